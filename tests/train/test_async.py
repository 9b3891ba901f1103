"""rollout.max_staleness: batches sampled ahead and scored on a thread of their own change when a stage
runs, never the arithmetic. The trainer's weights must equal a plain serial loop that samples each step's
batch from the weights of its recorded version and applies the batches in order; 0 is today's loop."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from opd.config.files import validate
from opd.errors import ConfigError
from opd.io.sinks import read_metrics
from opd.objectives.kinds import PolicyGradient
from opd.ops.batch import STUDENT, TokenChunk
from opd.train.setup import prepare
from opd.train.step import consume_batch, produce_batch
from opd.train.trainer import train

from conftest import run_cli
from weights import assert_weights_close, final_weights

STEPS = 6


def async_config(tiny_config: dict, output_dir: Path, staleness: int, steps: int = STEPS, **loss) -> dict:
    raw = {key: dict(value) for key, value in tiny_config.items()}
    raw["run"].update(output_dir=str(output_dir), max_steps=steps)
    raw["data"]["eval"] = None
    raw["rollout"]["max_staleness"] = staleness
    raw["optim"] = {"lr": 1e-2, "schedule": "constant", "eps": 1e-3}
    raw["loss"] = loss
    return raw


def serial_reference(raw: dict, staleness: int) -> tuple[dict, list[int]]:
    """The student after a loop that, for each step j in turn, samples and scores its batch from a copy of
    the weights of version max(0, j - 1 - staleness), then updates the current weights with it."""
    session = prepare(validate(raw), resume=False, log=lambda *_: None)
    model = session.student.model
    versions = [{name: value.clone() for name, value in model.state_dict().items()}]
    staleness_seen = []
    for step in range(1, raw["run"]["max_steps"] + 1):
        version = max(0, step - 1 - staleness)
        current = {name: value.clone() for name, value in model.state_dict().items()}
        model.load_state_dict(versions[version])
        scored = produce_batch(session, step, policy_version=version)
        model.load_state_dict(current)
        metrics, _ = consume_batch(session, scored, 0.0)
        staleness_seen.append(int(metrics["staleness/max"]))
        versions.append({name: value.detach().clone() for name, value in model.state_dict().items()})
    return versions[-1], staleness_seen


@pytest.mark.parametrize(
    "staleness, loss",
    [
        (0, {}),
        (1, {}),  # resolves to the recomputed advantage
        (2, {"advantage_logprobs": "sampler", "ratio_clip": 2.0}),
        (2, {"forward_kl_coef": 0.0, "advantage_logprobs": "current"}),
    ],
)
def test_the_pipeline_equals_a_serial_loop_over_the_same_versions(tiny_config, tmp_path, staleness, loss):
    raw = async_config(tiny_config, tmp_path / "pipelined", staleness, **loss)
    train(validate(raw), log=lambda *_: None)
    rows = read_metrics(tmp_path / "pipelined" / "metrics.jsonl")
    expected_staleness = [min(step - 1, staleness) for step in range(1, STEPS + 1)]
    assert [row["staleness/max"] for row in rows] == expected_staleness
    assert all(row["staleness/mean"] <= staleness for row in rows)
    if staleness:  # the scoring thread's figures
        assert all(row["timing/wait_s"] >= 0 and row["timing/teacher_idle_s"] >= 0 for row in rows)

    reference, seen = serial_reference(async_config(tiny_config, tmp_path / "serial", staleness, **loss), staleness)
    assert seen == expected_staleness
    pipelined = final_weights(tmp_path / "pipelined")
    start = validate(raw).student.path
    moved = pipelined["model.norm.weight"] - final_weights_of(start)["model.norm.weight"]
    assert float(moved.abs().max()) > 1e-3  # the steps really trained
    assert_weights_close(pipelined, {name: reference[name] for name in pipelined}, atol=0)


def final_weights_of(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(model_dir) / "model.safetensors")


def test_a_stale_run_trains_differently_from_an_on_policy_one(tiny_config, tmp_path):
    """The versions are really older: N = 1 does not quietly run on-policy."""
    for staleness in (0, 1):
        train(validate(async_config(tiny_config, tmp_path / str(staleness), staleness)), log=lambda *_: None)
    difference = max(
        float((a - b).abs().max())
        for a, b in zip(final_weights(tmp_path / "0").values(), final_weights(tmp_path / "1").values())
    )
    assert difference > 1e-4


def test_evaluation_between_stale_steps_keeps_the_arithmetic(tiny_config, tmp_path):
    """Evaluating every step borrows the teacher between scorings: the weights of a run without evaluation."""
    plain = async_config(tiny_config, tmp_path / "plain", 1)
    evaluated = async_config(tiny_config, tmp_path / "evaluated", 1)
    evaluated["data"]["eval"] = tiny_config["data"]["eval"]
    evaluated["run"]["eval_every"] = 1
    for raw in (plain, evaluated):
        train(validate(raw), log=lambda *_: None)
    assert_weights_close(final_weights(tmp_path / "plain"), final_weights(tmp_path / "evaluated"), atol=0)
    rows = read_metrics(tmp_path / "evaluated" / "metrics.jsonl")
    assert all("eval/distill/reverse_kl" in row for row in rows)


def test_the_recomputed_advantage_is_the_current_reverse_kl_reweighted_by_the_clipped_ratio():
    """Brute force on one chunk: loss = -min(rho, C) * A with A = -c(ℓθ - ℓᵀ) (ℓθ detached) and
    rho = exp(ℓθ - ℓˢ); its gradient is min(rho, C) * A * grad ℓθ."""
    torch.manual_seed(0)
    logits = torch.randn(5, 7, requires_grad=True)
    tokens = torch.tensor([1, 3, 0, 6, 2])
    sampler = torch.log_softmax(torch.randn(5, 7), -1).gather(1, tokens[:, None]).squeeze(1)
    teacher = torch.log_softmax(torch.randn(5, 7), -1).gather(1, tokens[:, None]).squeeze(1)
    chunk = TokenChunk(
        completion_ids=tokens,
        sampler_logprobs=sampler,
        teacher_logprobs=teacher,
        teacher_hidden=None,
        teacher_topk_ids=None,
        teacher_topk_logprobs=None,
        advantages=torch.zeros(5),
        source=torch.full((5,), STUDENT),
    )
    objective = PolicyGradient(1.0, 0, 1.0, 1.5, kl_coef=0.7, discount=0.0, recompute=True)
    values, logprobs = objective.per_token(logits, chunk, None)
    values.sum().backward()
    got = logits.grad.clone()

    logits.grad = None
    current = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    rho = torch.exp(current.detach() - sampler)
    advantage = -0.7 * (current.detach() - teacher)
    expected_values = -torch.minimum(rho, torch.tensor(1.5)) * advantage
    (-(torch.minimum(rho, torch.tensor(1.5)) * advantage * current)).sum().backward()
    torch.testing.assert_close(values.detach(), expected_values)
    torch.testing.assert_close(got, logits.grad)
    torch.testing.assert_close(logprobs.detach(), current.detach())


@pytest.mark.parametrize(
    "staleness, loss, asked, resolved",
    [
        (0, {}, None, "sampler"),
        (1, {}, None, "current"),
        (1, {"discount": 0.9}, None, "sampler"),  # not per token: the default stays on the sampler's
        (1, {}, "sampler", "sampler"),
        (0, {}, "current", "current"),
    ],
)
def test_the_advantage_default_follows_the_staleness(tiny_config, tmp_path, staleness, loss, asked, resolved):
    from opd.config.resolve import resolve

    raw = async_config(tiny_config, tmp_path / "run", staleness, **loss)
    if asked:
        raw["loss"]["advantage_logprobs"] = asked
    assert resolve(validate(raw)).loss.advantage_logprobs == resolved


def test_a_recomputed_advantage_that_cannot_be_per_token_is_refused_before_weights_load(tiny_config, tmp_path, capsys):
    from opd.cli import main

    raw = async_config(tiny_config, tmp_path / "run", 1, discount=0.9, advantage_logprobs="current")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: loss.advantage_logprobs: current recomputes a per-token advantage, and loss.discount is 0.9: the "
        "advantage sums later tokens' log-probs, which the update computes a chunk at a time; use sampler"
    )
    with pytest.raises(ConfigError):
        train(validate(raw), log=lambda *_: None)


@pytest.mark.e2e
def test_resume_after_sigkill_with_batches_in_flight_equals_the_uninterrupted_run(tiny_config, tmp_path):
    """Killed while step 4's batch is sampled (during step 3, after step 2's checkpoint, with step 3's
    batch in flight), and killed while it is scored on the scoring thread; resumed, each run is the
    uninterrupted one."""
    raw = async_config(tiny_config, tmp_path / "whole", 1, steps=8)
    raw["run"]["save_every"] = 1
    train(validate(raw), log=lambda *_: None)
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    killer = Path(__file__).parent.parent / "sigkill_at_step.py"
    for kill in ("sampling", "scoring"):
        output_dir = tmp_path / kill
        path = tmp_path / f"{kill}.yaml"
        path.write_text(yaml.safe_dump({**raw, "run": {**raw["run"], "output_dir": str(output_dir)}}))
        env = {
            **os.environ,
            "OPD_SIGKILL_AT_STEP": "4",
            **({"OPD_SIGKILL_WHILE_SCORING": "1"} if kill == "scoring" else {}),
        }
        died = subprocess.run(
            [sys.executable, str(killer), "train", str(path)], env=env, capture_output=True, timeout=300
        )
        assert died.returncode == -9, died.stderr[-2000:]
        assert not (output_dir / "final").exists()
        resumed = run_cli("train", str(path), "--resume")
        assert resumed.returncode == 0, resumed.stderr
        # The sampling kill comes after step 2's checkpoint; the scoring thread's (racing step 3's update)
        # after step 2's or step 3's.
        assert re.search(r"resuming from \S+ \(step [23],", resumed.stdout), resumed.stdout
        assert_weights_close(final_weights(tmp_path / "whole"), final_weights(output_dir), atol=0)
        rows = read_metrics(output_dir / "metrics.jsonl")
        assert [row["step"] for row in rows] == list(range(1, 9))
        assert [row["staleness/max"] for row in rows] == [row["staleness/max"] for row in whole]
