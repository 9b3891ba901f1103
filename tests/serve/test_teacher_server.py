"""The teacher as a service: `opd serve-teacher` as a real process on 127.0.0.1, the client against it
(same ℓᵀ as the local teacher, same weights after training), its protocol's errors, auth and faults."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from opd.config.schema import TeacherConfig  # noqa: E402
from opd.io.sinks import read_metrics  # noqa: E402
from opd.teachers.local import load_teacher  # noqa: E402
from opd.teachers.remote import RemoteTeacher  # noqa: E402

from conftest import CPU, free_port, make_batch  # noqa: E402
from processes import running, served  # noqa: E402
from weights import assert_same_learning, final_weights  # noqa: E402


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
    return make_batch(prompt_ids, prompt_mask, completion_ids, completion_mask, prompt_index=torch.tensor([0, 0, 1, 1]))


@pytest.mark.e2e
@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 3)])
def test_the_remote_teacher_gives_the_local_teachers_scores(tiny_models, temperature, top_k):
    """The tiny teacher has 7 padding rows past its tokenizer: neither side may score them."""
    local = load_teacher(str(tiny_models["teacher"]), "teacher", CPU, temperature, top_k=top_k)
    batch = scoring_batch(local.loaded.vocab_size)
    expected = local.score(batch)
    with served(tiny_models["teacher"]) as url:
        remote = RemoteTeacher(
            TeacherConfig(url=url, temperature=temperature, top_k=top_k, request_tokens=12, retry_deadline_s=10),
            local.loaded.vocab_size,
        )
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


@pytest.mark.e2e
def test_bad_requests_get_a_4xx_and_the_server_goes_on(tiny_models):
    good = {"prompt": [5, 6, 7, 8], "max_tokens": 1, "prompt_logprobs": 2}
    with served(tiny_models["teacher"], "--max-batch-tokens", "64", "--api-key", "sesame") as url:
        assert post(url, good).status_code == 401
        assert post(url, good, key="wrong").status_code == 401
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # health needs no key, as vLLM's
        bad = {  # each with a piece of the message that names what is wrong
            "malformed JSON": (None, b"{not json", "JSON"),
            "a JSON array": (None, b"[1, 2]", "JSON object"),
            "token out of range": ({**good, "prompt": [5, 10**6]}, None, "outside this model's vocabulary"),
            "negative token": ({**good, "prompt": [5, -1]}, None, "outside this model's vocabulary"),
            "boolean token": ({**good, "prompt": [5, True]}, None, "not booleans"),
            "empty prompt": ({**good, "prompt": []}, None, "prompt: expected"),
            "text prompt": ({**good, "prompt": "hello"}, None, "not text"),
            "oversized": ({**good, "prompt": [5] * 65}, None, "--max-batch-tokens"),
            "no prompt_logprobs": ({"prompt": [5, 6]}, None, "prompt_logprobs: expected an integer"),
            "prompt_logprobs too large": ({**good, "prompt_logprobs": 10**6}, None, "prompt_logprobs"),
            "prompt_logprobs a float": ({**good, "prompt_logprobs": 2.5}, None, "prompt_logprobs"),
            "unknown model": ({**good, "model": "other"}, None, "not served here"),
            "start past the end": ({**good, "logprob_start": 5}, None, "logprob_start: 5 is past"),
            "start negative": ({**good, "logprob_start": -1}, None, "logprob_start"),
            "NaN temperature": (None, b'{"prompt": [5, 6], "prompt_logprobs": 1, "temperature": NaN}', "temperature"),
            "infinite temperature": (
                None,
                b'{"prompt": [5, 6], "prompt_logprobs": 1, "temperature": Infinity}',
                "finite",
            ),
            "zero temperature": ({**good, "temperature": 0}, None, "temperature: expected a finite positive"),
            "text temperature": ({**good, "temperature": "hot"}, None, "temperature"),
            "max_tokens huge": (None, b'{"prompt": [5, 6], "prompt_logprobs": 1, "max_tokens": 1e10}', "max_tokens"),
            "max_tokens negative": ({**good, "max_tokens": -5}, None, "max_tokens: expected 1 or 0"),
            "max_tokens text": ({**good, "max_tokens": "many"}, None, "max_tokens"),
            "max_tokens 5": ({**good, "max_tokens": 5}, None, "it generates nothing"),
            "n of 2": ({**good, "n": 2}, None, "n: expected 1"),
            "streaming": ({**good, "stream": True}, None, "stream: expected False"),
            "sampling top_p": ({**good, "top_p": 0.5}, None, "top_p"),
            "OpenAI's echo + logprobs": (
                {**good, "echo": True, "logprobs": 1, "max_tokens": 0},
                None,
                "prompt_logprobs=K",
            ),
            "unknown field": ({**good, "frobnicate": 1}, None, "frobnicate: not a field"),
        }
        for name, (body, raw, says) in bad.items():
            response = post(url, body, key="sesame", raw=raw)
            assert 400 <= response.status_code < 500, name
            assert says in response.json()["error"]["message"], (name, response.json())
        neutral = {**good, "n": 1, "stream": False, "top_p": 1.0, "top_k": -1, "echo": False, "max_tokens": 0}
        assert post(url, neutral, key="sesame").status_code == 200  # what clients send by default passes
        nothing = post(url, {**good, "logprob_start": 4}, key="sesame")  # no position asked: all null
        assert nothing.status_code == 200 and nothing.json()["choices"][0]["prompt_logprobs"] == [None] * 4
        answer = post(url, good, key="sesame")
        assert answer.status_code == 200
        entries = answer.json()["choices"][0]["prompt_logprobs"]
        assert entries[0] is None and len(entries) == 4
        assert str(good["prompt"][1]) in entries[1] and len(entries[1]) in (2, 3)  # its token and the top 2
        assert {item["rank"] for item in entries[2].values()} >= {1, 2}


@pytest.mark.e2e
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
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "text": "!",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": [
                    None,
                    {
                        "12": {"logprob": -0.1, "rank": 1, "decoded_token": "b"},
                        "40": {"logprob": -2.5, "rank": 2, "decoded_token": "x"},
                    },
                    {
                        "13": {"logprob": -3.0, "rank": 5, "decoded_token": "c"},
                        "7": {"logprob": -0.5, "rank": 1, "decoded_token": "y"},
                        "9": {"logprob": -1.5, "rank": 2, "decoded_token": "z"},
                    },
                ],
            }
        ],
        "usage": {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1},
    }


def sglang_fixture() -> list:
    """SGLang's /generate answer for input_ids [[11, 12, 13]], logprob_start_len [0], top_logprobs_num 2
    (sglang docs/references/sampling_params.md for the request; the scheduler's output processor builds
    input_token_logprobs as [None] + values[:-1] aligned with input_ids[logprob_start_len:], each
    [logprob, token_id, text]). Text is null unless return_text_in_logprobs."""
    return [
        {
            "text": "",
            "meta_info": {
                "id": "r1",
                "prompt_tokens": 3,
                "completion_tokens": 0,
                "input_token_logprobs": [[None, 11, None], [-0.1, 12, None], [-3.0, 13, None]],
                "input_top_logprobs": [None, [[-0.1, 12, None], [-2.5, 40, None]], [[-0.5, 7, None], [-1.5, 9, None]]],
                "output_token_logprobs": [],
                "output_top_logprobs": [],
            },
        }
    ]


def test_the_client_reads_vllm_and_sglang_answers():
    from opd.teachers.server_apis import parse_sglang, parse_vllm

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


def remote_config(tiny_config, output_dir: Path, url: str, steps: int = 3, **teacher) -> dict:
    return {
        **tiny_config,
        "run": {**tiny_config["run"], "output_dir": str(output_dir), "max_steps": steps},
        "teacher": {"url": url, "retry_deadline_s": 60, "timeout_s": 5, **teacher},
        "loss": {
            "forward_kl_coef": 0.0
        },  # the plain reward on both sides (tests/serve/test_hidden_states.py: the term)
        "optim": {"lr": 1e-2, "schedule": "constant", "eps": 1e-3},
    }


def local_config(tiny_config, output_dir: Path, steps: int = 3, **teacher) -> dict:
    """The same run with the teacher in this process, without the default's forward-KL term (so is the
    remote run: the term's top-k estimate is measured apart, in benchmarks/far_apart.py --served)."""
    return {
        **tiny_config,
        "run": {**tiny_config["run"], "output_dir": str(output_dir), "max_steps": steps},
        "teacher": {**tiny_config["teacher"], **teacher},
        "loss": {"forward_kl_coef": 0.0},
        "optim": {"lr": 1e-2, "schedule": "constant", "eps": 1e-3},
    }


@pytest.mark.e2e
@pytest.mark.parametrize("teacher", [{}, {"temperature": 0.8}, {"top_k": 4}])
def test_training_against_the_server_equals_training_against_the_local_teacher(tiny_config, tmp_path, teacher):
    from opd.config.files import validate
    from opd.train.trainer import train

    # reverse_kl_pg runs carry a task reward as well: graded from the student's text, whoever the teacher is
    loss = {"loss": {"kind": "topk_forward_kl"}} if teacher.get("top_k") else {"reward": {"verifier": "gsm8k"}}
    train(validate({**local_config(tiny_config, tmp_path / "local", **teacher), **loss}), log=lambda *_: None)
    with served(Path(tiny_config["teacher"]["path"])) as url:
        train(
            validate({**remote_config(tiny_config, tmp_path / "remote", url, **teacher), **loss}), log=lambda *_: None
        )
    if "reward" in loss:
        assert "reward/mean" in read_metrics(tmp_path / "remote" / "metrics.jsonl")[-1]
    assert_same_learning(
        final_weights(tmp_path / "local"), final_weights(tmp_path / "remote"), tiny_config["student"]["path"]
    )


@contextmanager
def training(config: dict, tmp_path: Path, name: str):
    """`opd train` on `config` as a process, killed on the way out if it is still running."""
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    with running([sys.executable, "-m", "opd", "train", str(path)]) as job:
        yield job


def wait_for_step(output_dir: Path, step: int, job: subprocess.Popen, timeout: float = 120) -> None:
    from opd.io.sinks import read_metrics

    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = output_dir / "metrics.jsonl"
        if metrics.exists() and any(row["step"] >= step for row in read_metrics(metrics)):
            return
        assert job.poll() is None, job.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError(f"step {step} never came")


def staleness(config: dict, steps: int) -> dict:
    return {**config, "rollout": {**config["rollout"], "max_staleness": steps}}


@pytest.mark.e2e
def test_a_server_killed_and_restarted_mid_run_changes_nothing(tiny_config, tmp_path):
    """Every step scored once, completely: the weights of an uninterrupted run, each metrics row once.
    With batches scored ahead on the scoring thread (rollout.max_staleness 1), which retries while the
    trainer waits; retries on the trainer's own thread are test_errors_delays_and_dropped_connections'."""
    ahead = 1
    from opd.config.files import validate
    from opd.io.sinks import read_metrics
    from opd.train.trainer import train

    steps, teacher = 24, Path(tiny_config["teacher"]["path"])
    train(validate(staleness(local_config(tiny_config, tmp_path / "local", steps), ahead)), log=lambda *_: None)
    port = free_port()
    with ExitStack() as cleanup:  # the run outlives the first server, and is killed last
        with served(teacher, port=port) as url:
            remote = staleness(remote_config(tiny_config, tmp_path / "remote", url, steps), ahead)
            job = cleanup.enter_context(training(remote, tmp_path, "remote"))
            wait_for_step(tmp_path / "remote", 3, job)
        assert job.poll() is None, "the run ended before the server was killed"
        time.sleep(1.0)  # the run retries against a dead port meanwhile
        with served(teacher, port=port):
            _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-2000:]
    assert_same_learning(
        final_weights(tmp_path / "local"), final_weights(tmp_path / "remote"), tiny_config["student"]["path"]
    )
    assert [row["step"] for row in read_metrics(tmp_path / "remote" / "metrics.jsonl")] == list(range(steps + 1))


@pytest.mark.e2e
@pytest.mark.parametrize("ahead", [0, 1])
def test_past_the_deadline_the_run_stops_with_one_line_and_no_final_model(tiny_config, tmp_path, ahead):
    with ExitStack() as cleanup:  # the run outlives the server, and is killed last
        with served(Path(tiny_config["teacher"]["path"])) as url:
            config = staleness(remote_config(tiny_config, tmp_path / "run", url, 200, retry_deadline_s=2), ahead)
            config["run"]["save_every"] = 1
            job = cleanup.enter_context(training(config, tmp_path, "doomed"))
            wait_for_step(tmp_path / "run", 2, job)
        _, stderr = job.communicate(timeout=120)
    assert job.returncode == 2 and "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: step ") and f"teacher server {url} gave no usable answer for 2 s" in line
    assert "last good checkpoint: " in line and "step-" in line
    assert not (tmp_path / "run" / "final").exists()


class FaultyProxy:
    """An HTTP proxy on 127.0.0.1 in front of the server that spoils the first attempt of every scoring
    request, in turn with a 500, a reply slower than the client's timeout, a dropped connection and a
    truncated body; retries, and the other requests, pass through."""

    FAULTS = ("error", "slow", "drop", "truncate")

    def __init__(self, target: str, delay_s: float):
        import http.server
        import threading

        proxy = self
        self.target, self.delay_s, self.spoiled, self.seen = target, delay_s, 0, set()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def forward(self, method: str):
                body = self.rfile.read(int(self.headers.get("content-length", 0) or 0))
                fault = None
                if self.path == "/v1/completions" and body not in proxy.seen:
                    proxy.seen.add(body)
                    fault = proxy.FAULTS[len(proxy.seen) % len(proxy.FAULTS)]
                if fault == "drop":
                    proxy.spoiled += 1
                    self.connection.close()
                    return
                if fault == "error":
                    proxy.spoiled += 1
                    self.send_response(500)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                if fault == "slow":
                    proxy.spoiled += 1
                    time.sleep(proxy.delay_s)
                answer = httpx.request(
                    method,
                    proxy.target + self.path,
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=60,
                )
                content = answer.content
                if fault == "truncate":
                    proxy.spoiled += 1
                    content = content[: len(content) // 2]
                self.send_response(answer.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def do_GET(self):
                self.forward("GET")

            def do_POST(self):
                self.forward("POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.mark.e2e
def test_errors_delays_and_dropped_connections_change_nothing(tiny_config, tmp_path):
    from opd.config.files import validate
    from opd.train.trainer import train

    train(validate(local_config(tiny_config, tmp_path / "local")), log=lambda *_: None)
    with served(Path(tiny_config["teacher"]["path"])) as url:
        proxy = FaultyProxy(url, delay_s=2.5)
        try:
            config = remote_config(tiny_config, tmp_path / "remote", proxy.url, timeout_s=1, request_tokens=64)
            train(validate(config), log=lambda *_: None)
        finally:
            proxy.close()
    assert proxy.spoiled >= 8  # every kind of fault, at least twice
    assert_same_learning(
        final_weights(tmp_path / "local"), final_weights(tmp_path / "remote"), tiny_config["student"]["path"]
    )


def test_a_server_that_never_answered_fails_in_seconds_naming_it(tiny_config, tmp_path):
    """Nothing listens at the URL: not a transient fault, so not the 300 s retry deadline."""
    from opd.config.files import validate
    from opd.errors import ConfigError
    from opd.teachers.remote import NEVER_ANSWERED_GRACE_S
    from opd.train.trainer import train

    url = f"http://127.0.0.1:{free_port()}"
    raw = remote_config(tiny_config, tmp_path / "run", url, retry_deadline_s=300)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"teacher.url: nothing answers at {url} \(ConnectError: .*\); start the"):
        train(validate(raw), log=lambda *_: None)
    assert time.monotonic() - started < NEVER_ANSWERED_GRACE_S + 15
    assert not (tmp_path / "run").exists()
