"""The teacher as a service: `opd serve-teacher` as a real process on 127.0.0.1, the client against it
(same ℓᵀ as the local teacher, same weights after training), its protocol's errors, auth and faults."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import CPU, make_batch  # noqa: E402
from opd.config import TeacherConfig  # noqa: E402
from opd.factory import load_teacher  # noqa: E402
from opd.remote_teacher import RemoteTeacher  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served(model: Path, *options: str, port: int | None = None):
    """`opd serve-teacher MODEL` in its own process group; yields its base URL once /health answers."""
    port = port or free_port()
    job = subprocess.Popen([sys.executable, "-m", "opd", "serve-teacher", str(model), "--port", str(port),
                            "--precision", "fp32", "--device", "cpu", *options],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, job)
        yield url
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.communicate()


def wait_healthy(url: str, job: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if job is not None and job.poll() is not None:
            raise AssertionError(f"the server exited: {job.communicate()[1][-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def scoring_batch(vocab: int) -> object:
    """Two prompts (left-padded, one shorter) x two completions of different lengths."""
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (2, 6), generator=generator).repeat_interleave(2, 0)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[2:, :2] = 0
    prompt_ids[2:, :2] = 0
    completion_ids = torch.randint(3, vocab, (4, 5), generator=generator)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 3:] = 0
    completion_mask[3, 1:] = 0
    return make_batch(prompt_ids, prompt_mask, completion_ids, completion_mask,
                      prompt_index=torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 3)])
def test_the_remote_teacher_gives_the_local_teachers_scores(tiny_models, temperature, top_k):
    """The tiny teacher has 7 padding rows past its tokenizer: neither side may score them."""
    local = load_teacher(str(tiny_models["teacher"]), "teacher", CPU, temperature, top_k=top_k)
    batch = scoring_batch(local.loaded.vocab_size)
    expected = local.score(batch)
    with served(tiny_models["teacher"]) as url:
        remote = RemoteTeacher(TeacherConfig(url=url, temperature=temperature, top_k=top_k, request_tokens=12,
                                             retry_deadline_s=10),
                               local.loaded.vocab_size)
        remote.check(local.loaded.tokenizer)
        scores = remote.score(batch)
    mask = batch.completion_mask.bool()
    assert (scores.logprobs[~mask] == 0).all()
    torch.testing.assert_close(scores.logprobs[mask], expected.logprobs[mask], atol=1e-5, rtol=0)
    if top_k:
        torch.testing.assert_close(scores.topk_logprobs[mask], expected.topk_logprobs[mask], atol=1e-5, rtol=0)
        assert torch.equal(scores.topk_ids[mask], expected.topk_ids[mask])


def post(url: str, body, key: str | None = None, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(url + "/v1/completions", content=raw, headers={**headers, "content-type": "application/json"})
    return httpx.post(url + "/v1/completions", json=body, headers=headers)


def test_bad_requests_get_a_4xx_and_the_server_goes_on(tiny_models):
    good = {"prompt": [5, 6, 7, 8], "max_tokens": 1, "prompt_logprobs": 2}
    with served(tiny_models["teacher"], "--max-batch-tokens", "64", "--api-key", "sesame") as url:
        assert post(url, good).status_code == 401
        assert post(url, good, key="wrong").status_code == 401
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # health needs no key, as vLLM's
        bad = {"malformed JSON": (None, b"{not json"), "token out of range": ({**good, "prompt": [5, 10**6]}, None),
               "empty prompt": ({**good, "prompt": []}, None), "text prompt": ({**good, "prompt": "hello"}, None),
               "oversized": ({**good, "prompt": [5] * 65}, None), "no prompt_logprobs": ({"prompt": [5, 6]}, None),
               "unknown model": ({**good, "model": "other"}, None)}
        for name, (body, raw) in bad.items():
            response = post(url, body, key="sesame", raw=raw)
            assert 400 <= response.status_code < 500, name
            assert response.json()["error"]["message"], name
        answer = post(url, good, key="sesame")
        assert answer.status_code == 200
        entries = answer.json()["choices"][0]["prompt_logprobs"]
        assert entries[0] is None and len(entries) == 4
        assert str(good["prompt"][1]) in entries[1] and len(entries[1]) in (2, 3)  # its token and the top 2
        assert {item["rank"] for item in entries[2].values()} >= {1, 2}


def test_it_binds_to_loopback_by_default(tiny_models):
    with served(tiny_models["teacher"]) as url:
        port = int(url.rsplit(":", 1)[1])
        listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
        lines = [line for line in listening.splitlines() if f":{port} " in line]
        assert lines and all("127.0.0.1:" in line for line in lines), lines


def vllm_fixture() -> dict:
    """The shape of vLLM's /v1/completions answer with prompt_logprobs=2 for prompt [11, 12, 13]
    (vLLM docs, OpenAI-compatible server, 'prompt_logprobs' extra parameter; DESIGN.md §7): one entry per
    prompt position, the first null; the position's own token is always a key, with its rank, beside the
    top 2 (here token 13 is ranked 5th at its position, so that entry has 3 keys)."""
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m", "choices": [{
        "index": 0, "text": "!", "logprobs": None, "finish_reason": "length", "stop_reason": None,
        "prompt_logprobs": [
            None,
            {"12": {"logprob": -0.1, "rank": 1, "decoded_token": "b"},
             "40": {"logprob": -2.5, "rank": 2, "decoded_token": "x"}},
            {"13": {"logprob": -3.0, "rank": 5, "decoded_token": "c"},
             "7": {"logprob": -0.5, "rank": 1, "decoded_token": "y"},
             "9": {"logprob": -1.5, "rank": 2, "decoded_token": "z"}}]}],
        "usage": {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1}}


def sglang_fixture() -> list:
    """SGLang's /generate answer for input_ids [[11, 12, 13]], logprob_start_len [0], top_logprobs_num 2
    (sglang docs/references/sampling_params.md for the request; the scheduler's output processor builds
    input_token_logprobs as [None] + values[:-1] aligned with input_ids[logprob_start_len:], each
    [logprob, token_id, text]). Text is null unless return_text_in_logprobs."""
    return [{"text": "", "meta_info": {
        "id": "r1", "prompt_tokens": 3, "completion_tokens": 0,
        "input_token_logprobs": [[None, 11, None], [-0.1, 12, None], [-3.0, 13, None]],
        "input_top_logprobs": [None, [[-0.1, 12, None], [-2.5, 40, None]], [[-0.5, 7, None], [-1.5, 9, None]]],
        "output_token_logprobs": [], "output_top_logprobs": []}}]


def test_the_client_reads_vllm_and_sglang_answers():
    from opd.remote_teacher import parse_sglang, parse_vllm

    rows = [([11, 12, 13], 1)]
    expected = [([-0.1, -3.0], [[12, 40], [7, 9]], [[-0.1, -2.5], [-0.5, -1.5]])]
    assert parse_vllm(vllm_fixture(), rows, 2) == expected
    assert parse_sglang(sglang_fixture(), rows, 2) == expected
    assert parse_vllm(vllm_fixture(), [([11, 12, 13], 2)], 0) == [([-3.0], [], [])]
    broken = vllm_fixture()
    broken["choices"][0]["prompt_logprobs"].pop()  # a truncated body is an error (and retried), never zeros
    with pytest.raises(ValueError):
        parse_vllm(broken, rows, 2)
    json.dumps(sglang_fixture())  # both are plain JSON
