"""A teacher on a server writing rollouts: `opd serve-teacher`'s sampling form of /v1/completions against
opd's own sampler on the same model (the same rows), a run whose teacher writes rows from its server
against the same run with the teacher in this process (the same weights), lambda auto's far start from
a server's samples, vLLM's answer format, and the bad requests a sampling server refuses."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from opd.config.files import validate  # noqa: E402
from opd.config.schema import TeacherConfig  # noqa: E402
from opd.data.prompts import PromptBatch  # noqa: E402
from opd.errors import ConfigError  # noqa: E402
from opd.io.sinks import read_metrics  # noqa: E402
from opd.ops.batch import TEACHER  # noqa: E402
from opd.rollout.sampler import ModelSampler, SamplingSettings  # noqa: E402
from opd.teachers.local import load_teacher  # noqa: E402
from opd.teachers.remote import RemoteTeacher  # noqa: E402
from opd.teachers.server_apis import parse_vllm_samples  # noqa: E402
from opd.train.served_teacher import ServedTeacherSampler  # noqa: E402
from opd.train.trainer import train  # noqa: E402

from conftest import CPU  # noqa: E402
from processes import served  # noqa: E402
from weights import assert_same_learning, final_weights  # noqa: E402


def prompts(vocab: int) -> PromptBatch:
    """Three prompts of different lengths, with stream keys that are not their positions."""
    generator = torch.Generator().manual_seed(3)
    ids = [torch.randint(3, vocab, (length,), generator=generator).tolist() for length in (5, 9, 3)]
    return PromptBatch(ids, [0, 1, 2], [None] * 3, [7, 2, 40])


@pytest.mark.e2e
@pytest.mark.parametrize("settings", [SamplingSettings(12), SamplingSettings(12, temperature=0.7, top_k=5)])
def test_the_server_samples_the_rows_opds_sampler_samples(tiny_models, settings):
    """Same model, seed and keys: the same tokens, stops and log-probs, through several requests."""
    teacher = load_teacher(str(tiny_models["teacher"]), "teacher", CPU).loaded
    batch = prompts(teacher.vocab_size)
    expected = ModelSampler(teacher, settings, CPU, source=TEACHER).sample(batch, 3, seed=11)
    with served(tiny_models["teacher"]) as url:
        remote = RemoteTeacher(TeacherConfig(url=url, request_tokens=60, retry_deadline_s=10), teacher.vocab_size)
        remote.check(teacher.tokenizer)
        sampler = ServedTeacherSampler(
            remote, settings, teacher.stop_token_ids, teacher.tokenizer.pad_token_id, CPU.device
        )
        got = sampler.sample(batch, 3, seed=11)
    width = int(expected.completion_mask.sum(1).max())
    assert torch.equal(got.completion_ids, expected.completion_ids[:, :width])
    assert torch.equal(got.completion_mask, expected.completion_mask[:, :width])
    assert torch.equal(got.finished, expected.finished)
    assert (got.row_sources() == TEACHER).all()
    mask = got.completion_mask.bool()
    torch.testing.assert_close(
        got.sampler_logprobs[mask], expected.sampler_logprobs[:, :width][mask], atol=1e-5, rtol=0
    )


def run_config(tiny_config, output_dir: Path, teacher: dict, rollout: dict, loss: dict) -> dict:
    return {
        **tiny_config,
        "run": {**tiny_config["run"], "output_dir": str(output_dir), "max_steps": 2},
        "teacher": teacher,
        "rollout": {**tiny_config["rollout"], **rollout},
        "loss": loss,
        "optim": {"lr": 1e-2, "schedule": "constant", "eps": 1e-3},
    }


@pytest.mark.e2e
@pytest.mark.parametrize("run", ["sequence-level KD", "lambda auto, measured far"])
def test_a_teacher_writing_rows_from_its_server_trains_as_the_local_teacher(tiny_config, tmp_path, run):
    """`rollout.source: teacher` (loss sft) and lambda auto's far start with the teacher on opd's server
    give the weights of the same run with the teacher here. Far from a server without its LM head, the
    teacher's rows train by NLL (off_policy_kind sft), which the local run is told."""
    if run == "sequence-level KD":
        rollout, loss, local_loss = {"source": "teacher"}, {"kind": "sft"}, {"kind": "sft"}
    else:  # a threshold that makes the tiny pair far; the local teacher could give forward_kl, so say sft
        rollout, loss = {"far_reverse_kl": 1e-6}, {"forward_kl_coef": 0.0}
        local_loss = {**loss, "off_policy_kind": "sft"}
    local = run_config(tiny_config, tmp_path / "local", tiny_config["teacher"], rollout, local_loss)
    train(validate(local), log=lambda *_: None)
    lines = []
    with served(Path(tiny_config["teacher"]["path"])) as url:
        remote = run_config(tiny_config, tmp_path / "remote", {"url": url, "retry_deadline_s": 30}, rollout, loss)
        train(validate(remote), log=lambda message: lines.append(str(message)))
    assert_same_learning(
        final_weights(tmp_path / "local"), final_weights(tmp_path / "remote"), tiny_config["student"]["path"]
    )
    rows = read_metrics(tmp_path / "remote" / "metrics.jsonl")
    if run.startswith("lambda"):
        assert [row["from_teacher/rows_fraction"] for row in rows if "from_teacher/rows_fraction" in row] == [1.0, 0.5]
        assert any("starts far" in line and "trained by NLL (loss.off_policy_kind sft)" in line for line in lines)
        resolved = (tmp_path / "remote" / "resolved.yaml").read_text()
        assert "off_policy_kind: sft" in resolved


@pytest.mark.e2e
def test_a_sampling_request_it_cannot_serve_gets_a_4xx_naming_the_field(tiny_models):
    teacher = load_teacher(str(tiny_models["teacher"]), "teacher", CPU).loaded
    good = {"prompt": [5, 6, 7], "n": 2, "max_tokens": 4, "logprobs": 0, "return_tokens_as_token_ids": True}
    bad = [
        ({"logprobs": 3}, "logprobs"),
        ({"return_tokens_as_token_ids": False}, "return_tokens_as_token_ids"),
        ({"n": 0}, "n:"),
        ({"temperature": 0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stream_key": [1, 2]}, "stream_key"),
        ({"stop_token_ids": "2"}, "stop_token_ids"),
        ({"max_tokens": 10**6}, "context"),
        ({"best_of": 3}, "best_of"),
        ({"repetition_penalty": 1.1}, "repetition_penalty"),
        ({"prompt": "text"}, "prompt"),
        ({"prompt": [5, teacher.vocab_size]}, "vocabulary"),
    ]
    with served(tiny_models["teacher"], "--max-batch-tokens", "64") as url:
        for change, named in bad:
            answer = httpx.post(url + "/v1/completions", json={**good, **change}, timeout=30)
            assert 400 <= answer.status_code < 500 and named in answer.json()["error"]["message"], (change, answer.text)
        # Over --max-batch-tokens the prompts are sampled in batches, a prompt over it alone.
        over = httpx.post(url + "/v1/completions", json={**good, "prompt": [[5, 6], [7]], "n": 20}, timeout=60)
        assert over.status_code == 200 and len(over.json()["choices"]) == 40, over.text
        neutral = {"repetition_penalty": 1.0, "presence_penalty": 0, "min_p": 0.0, "stream": False}
        answer = httpx.post(url + "/v1/completions", json={**good, **neutral, "stream_key": 4, "seed": 1}, timeout=30)
    assert answer.status_code == 200, answer.text  # it goes on serving
    choices = answer.json()["choices"]
    assert [choice["index"] for choice in choices] == [0, 1]
    for choice in choices:
        tokens = choice["logprobs"]["tokens"]
        assert 1 <= len(tokens) <= 4 and all(token.startswith("token_id:") for token in tokens)
        assert choice["finish_reason"] in ("stop", "length")


def vllm_samples_fixture() -> dict:
    """vLLM's completions answer for 2 samples of one prompt with logprobs 0 and token ids as text."""
    return {
        "choices": [
            {
                "index": 1,
                "text": "",
                "logprobs": {"tokens": ["token_id:9"], "token_logprobs": [-0.5], "top_logprobs": [{}]},
                "finish_reason": "length",
            },
            {
                "index": 0,
                "text": "",
                "logprobs": {"tokens": ["token_id:4", "token_id:2"], "token_logprobs": [-1.0, -2.0]},
                "finish_reason": "stop",
            },
        ]
    }


def test_the_client_reads_vllms_samples_and_refuses_a_partial_answer():
    assert parse_vllm_samples(vllm_samples_fixture(), 1, 2) == [[([4, 2], [-1.0, -2.0], True), ([9], [-0.5], False)]]
    missing = copy.deepcopy(vllm_samples_fixture())
    missing["choices"].pop()
    with pytest.raises(ValueError, match="1 samples came back"):
        parse_vllm_samples(missing, 1, 2)
    short = copy.deepcopy(vllm_samples_fixture())
    short["choices"][1]["logprobs"]["token_logprobs"] = [-1.0]
    with pytest.raises(ValueError, match="log-probs for 1 of 2"):
        parse_vllm_samples(short, 1, 2)
    json.dumps(vllm_samples_fixture())


class FakeServer:
    """What RemoteTeacher.sample gives: per prompt, per sample (ids, log-probs, a stop token ended it)."""

    def __init__(self, samples):
        self.samples, self.draws = samples, []

    def sample(self, prompts, draw):
        self.draws.append(draw)
        return self.samples


def test_served_rows_end_at_the_students_stop_tokens_and_keep_the_servers_stops():
    """A row is cut after its first stop token of the student's (finished), one the server ended on a
    stop token of the teacher's own stays finished, one cut at max_new_tokens is not; the draw carries
    each prompt's stream seed and the rollout settings."""
    from opd.rollout.sampler import stream_seed

    rows = [
        [([5, 2, 7], [-1.0, -2.0, -3.0], False), ([5, 9], [-1.0, -0.5], True)],  # a student's stop; a teacher's
        [([4] * 6, [-1.0] * 6, False), ([6], [-0.1], False)],  # past max_new_tokens; the server's length cut
    ]
    server = FakeServer(rows)
    sampler = ServedTeacherSampler(server, SamplingSettings(4, temperature=0.5), [2], 0, torch.device("cpu"))
    batch = sampler.sample(PromptBatch([[3, 3], [3]], [0, 1], [None, None], [10, 11]), 2, seed=7)
    assert batch.completion_ids.tolist() == [[5, 2, 0, 0], [5, 9, 0, 0], [4, 4, 4, 4], [6, 0, 0, 0]]
    assert batch.finished.tolist() == [True, True, False, False]
    assert batch.sampler_logprobs[0, :2].tolist() == [-1.0, -2.0]
    draw = server.draws[0]
    assert draw.stream_seeds == (stream_seed(7, 10), stream_seed(7, 11)) and draw.keys == (10, 11)
    assert (draw.max_tokens, draw.temperature, draw.stop_ids) == (4, 0.5, (2,))


def test_an_sglang_teacher_is_refused_as_a_writer_in_one_line(tiny_config, tmp_path):
    raw = run_config(
        tiny_config,
        tmp_path / "run",
        {"url": "http://127.0.0.1:9", "api": "sglang"},
        {"source": "teacher"},
        {"kind": "sft"},
    )
    with pytest.raises(ConfigError, match=r"teacher.api.*SGLang teacher for scores only"):
        validate(raw)
    vllm = {**raw, "teacher": {"url": "http://127.0.0.1:9", "api": "vllm"}}
    assert validate(vllm).rollout.source == "teacher"
