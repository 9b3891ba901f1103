"""Runs with rollout.engine: vllm_server through the CLI, as a user starts them, against real `opd
serve-student` processes: one rank against two FSDP2 ranks with batches sampled beside the update, the
servers holding the student's weights after each push; a server killed and restarted mid-run; a server
that refuses the weights."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch

from opd.demo.run import ASSETS, prepare_demo
from opd.io.sinks import read_metrics
from opd.models.loading import load_model

from conftest import checkpoint_state, make_tiny_model, write_problems
from processes import command, launch, running, served_student
from weights import assert_same_learning, assert_weights_close, final_weights

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


@pytest.fixture
def server_url(rollout_server_url):
    return rollout_server_url  # one server for the session (conftest)


@pytest.fixture(scope="module")
def second_server(tmp_path_factory):
    """Another rollout server: its url, port, log (where each request it answered shows) and process. The
    restart test kills it, so that test is the last in this file to use it."""
    with served_student(tmp_path_factory.mktemp("second-server") / "server.log") as server:
        yield server


def server_config(tmp_path: Path, urls: list[str], name: str = "run", **rollout) -> dict:
    """The demo's models on a few problems, sampled on rollout servers."""
    data = write_problems(tmp_path / "train.jsonl", 32, seed=1)
    return {
        "run": {"output_dir": str(tmp_path / name), "seed": 0, "max_steps": 3, "precision": "fp32", "progress": False},
        "student": {"path": str(ASSETS / "student")},
        "teacher": {"path": str(ASSETS / "teacher")},
        "data": {"train": str(data), "max_prompt_tokens": 64},
        "rollout": {
            "engine": "vllm_server",
            "vllm_server": {"urls": urls},
            "samples_per_prompt": 2,
            "max_new_tokens": 24,
            **rollout,
        },
        "batch": {"prompts_per_step": 2, "micro_batch_size": 4},
        "optim": {"lr": 1e-3, "schedule": "constant"},
    }


FIXED = [5, 6, 7, 8, 9, 10, 30, 31, 32, 100, 101, 7, 2]


def server_logprobs(url: str, ids: list[int]) -> torch.Tensor:
    answer = httpx.post(
        f"{url}/v1/completions",
        json={"model": str(ASSETS / "student"), "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0},
        timeout=60,
    ).json()
    steps = answer["choices"][0]["prompt_logprobs"][1:]
    return torch.tensor([step[str(token)]["logprob"] for step, token in zip(steps, ids[1:])])


def checkpoint_logprobs(folder: Path, ids: list[int]) -> torch.Tensor:
    student = load_model(str(ASSETS / "student"), "student.path", torch.device("cpu"))
    student.model.load_state_dict(checkpoint_state(folder)["model"], strict=False)
    with torch.no_grad():
        logits = student.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def test_two_sharded_ranks_on_two_servers_sampling_beside_the_update_equal_one_rank_on_one(
    server_url, second_server, tmp_path
):
    """max_staleness 1: the servers draw the next batch while the trainer updates. Each prompt's draws are
    seeded by its key, so 2 ranks x 1 prompt on 2 servers sample what 1 rank x 2 prompts do on 1 server
    and train the same weights (up to the order of floating-point sums); the FSDP2-sharded student is
    gathered a unit at a time for each push, which goes to both servers. After the run every server
    holds the weights of the last push: version 1 (step 3's batch was sampled at step 2, from the
    weights after one update), which the step-1 checkpoint holds."""
    second_url, second_log = second_server.url, second_server.log
    answered_before = second_log.read_text().count("/inference/v1/generate")
    runs = {}
    for ranks in (1, 2):
        urls = [server_url] if ranks == 1 else [server_url, second_url]
        config = server_config(tmp_path, urls, f"{ranks}-ranks", max_staleness=1)
        config["run"].update(save_every=1, keep_checkpoints=3)
        config["student"]["shard"] = ranks > 1
        result = launch(config, tmp_path, f"{ranks}-ranks", ranks)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[ranks] = read_metrics(tmp_path / f"{ranks}-ranks" / "metrics.jsonl")
        expected = checkpoint_logprobs(tmp_path / f"{ranks}-ranks" / "checkpoints" / "step-1", FIXED)
        for url in urls:
            assert httpx.get(f"{url}/weight_info").json()["weight_version"] == "1"
            assert (server_logprobs(url, FIXED) - expected).abs().max() <= 1e-4
    assert second_log.read_text().count("/inference/v1/generate") > answered_before  # the prompts were spread
    for one, two in zip(runs[1], runs[2]):
        assert two["generation/avg_length"] == one["generation/avg_length"]  # the same samples
        assert two["distill/reverse_kl"] == pytest.approx(one["distill/reverse_kl"], rel=1e-3, abs=1e-5)
    # Up to the order of the sharded sums, which Adam's first steps amplify where gradients are near zero.
    assert_same_learning(
        final_weights(tmp_path / "1-ranks"), final_weights(tmp_path / "2-ranks"), str(ASSETS / "student"), fraction=0.02
    )
    assert [row["staleness/max"] for row in runs[2]] == [0, 1, 1]
    # A push before batches 1 (version 0) and 3 (version 1); batch 2 was drawn with version 0 already there.
    assert ["timing/weight_sync_s" in row for row in runs[1]] == [True, False, True]


def test_a_server_killed_and_restarted_mid_run_changes_nothing(second_server, tmp_path):
    """The unfaulted run against one where the server is killed at step 2 and started again on its port:
    the restarted server holds its checkpoint's weights and no group with the trainer; the trainer
    waits for it (retry_deadline_s), connects again, pushes the current weights and samples the batch
    again, and ends with the same weights."""
    config = server_config(tmp_path, [second_server.url], "whole")
    config["run"]["max_steps"] = 5
    whole = launch(config, tmp_path, "whole", 1)
    assert whole.returncode == 0, whole.stderr[-3000:]
    faulted = {**config, "run": {**config["run"], "output_dir": str(tmp_path / "faulted")}}
    argv, env = command(faulted, tmp_path, "faulted", 1)
    with running(argv, env) as run:
        metrics = tmp_path / "faulted" / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert run.poll() is None, run.communicate()[1][-3000:]
            time.sleep(0.05)
        os.killpg(second_server.job.pid, signal.SIGKILL)
        second_server.job.wait()
        with served_student(tmp_path / "restarted.log", port=second_server.port) as restarted:
            stdout, stderr = run.communicate(timeout=600)
            assert run.returncode == 0, stderr[-3000:]
            assert restarted.job.poll() is None
    assert_weights_close(final_weights(tmp_path / "whole"), final_weights(tmp_path / "faulted"), atol=0)
    assert [row["step"] for row in read_metrics(tmp_path / "faulted" / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_a_server_that_refuses_the_weights_stops_the_run_in_one_line(server_url, tmp_path):
    """A student of another shape than the served model: the first push fails on the server, and the
    run stops before its first step with the server's URL and route, and no final model. The server
    abandons the update and takes the next one whole."""
    other = make_tiny_model(tmp_path / "wider", hidden=48)
    config = server_config(tmp_path, [server_url])
    config["student"]["path"] = str(other)
    config["teacher"]["path"] = str(other)
    result = launch(config, tmp_path, "refused", 1)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"{server_url}/update_weights: HTTP 500" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "final").exists()
    # The server kept its weights where the push failed, and serves on (the demo test after this one
    # pushes to it again).
    assert httpx.get(f"{server_url}/health").status_code == 200


def test_the_demo_with_a_rollout_server_learns_as_with_the_in_process_engine(server_url, tmp_path):
    """The demo's run (its data, models and config), sampled on a rollout server, 60 of its 150 steps:
    the floors the demo's own test asks of its 150 steps (docs/rollout_engine.md gives the whole run's
    figures beside the in-process engines')."""
    config = prepare_demo(tmp_path / "demo", steps=60, log=lambda *_: None)
    raw = config.model_dump(mode="json")
    raw["run"].update(output_dir=str(tmp_path / "demo" / "run"), progress=False)
    raw["rollout"].update(engine="vllm_server", vllm_server={"urls": [server_url]})
    result = launch(raw, tmp_path, "demo-server", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [row for row in read_metrics(tmp_path / "demo" / "run" / "metrics.jsonl") if "eval/accuracy" in row]
    first, last = evals[0], evals[-1]
    assert (first["step"], last["step"]) == (0, 60)
    assert last["eval/accuracy"] - first["eval/accuracy"] >= 0.20
    assert last["eval/distill/seq_reverse_kl"] <= 0.5 * first["eval/distill/seq_reverse_kl"]
