"""`opd sft`: the same loop with the NLL loss on the data's answers or on teacher samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from opd.config.files import load_config, validate
from opd.errors import ConfigError, DataError
from opd.io.sinks import read_metrics
from opd.train.setup import prepare
from opd.train.step import score
from opd.train.trainer import train
from opd.train.update import update_student

from conftest import recompute_logprobs, run_cli


def sft_config(tiny_config, **rollout) -> dict:
    return {
        **tiny_config,
        "loss": {"kind": "sft"},
        "rollout": {**tiny_config["rollout"], "source": "dataset", **rollout},
    }


def reference_nll(model, rollouts) -> float:
    """Mean -log p(answer token) from one plain full forward per row, no padding, no chunks."""
    return float(-recompute_logprobs(model, rollouts, 1.0).sum() / rollouts.completion_mask.sum())


def test_dataset_rollouts_are_the_answers_and_the_loss_is_their_nll(tiny_config):
    session = prepare(validate(sft_config(tiny_config)), resume=False, log=lambda *_: None)
    tokenizer = session.student.tokenizer
    rollouts = session.rollouts.primary.sample(session.train_prompts.batch([0, 1]), 2, 0)
    first_answer = session.train_prompts.answers[0]
    expected = tokenizer(first_answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    length = int(rollouts.completion_mask[0].sum())
    assert rollouts.completion_ids[0, :length].tolist() == expected[: session.rollouts.primary.max_new_tokens]
    assert torch.equal(rollouts.completion_ids[0], rollouts.completion_ids[1])  # two "samples" of one answer
    scored, _ = score(session, rollouts)
    expected_loss = reference_nll(session.student, rollouts)  # before the update changes the weights
    update = update_student(session, scored)
    assert update["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert update["student_logprob/dataset"] == pytest.approx(-update["loss"], rel=1e-6)


def test_long_answers_are_cut_and_marked_unfinished(tiny_config):
    session = prepare(validate(sft_config(tiny_config, max_new_tokens=5)), resume=False, log=lambda *_: None)
    rollouts = session.rollouts.primary.sample(session.train_prompts.batch([0, 1, 2]), 1, 0)
    assert rollouts.completion_ids.shape[1] == 5 and not rollouts.finished.any()
    assert (rollouts.completion_ids != session.student.tokenizer.eos_token_id).all()


def test_teacher_rollouts_carry_the_teachers_own_logprobs(tiny_config):
    config = validate(sft_config(tiny_config, source="teacher"))
    session = prepare(config, resume=False, log=lambda *_: None)
    rollouts = session.rollouts.primary.sample(session.train_prompts.batch([0, 1]), 2, 0)
    torch.testing.assert_close(rollouts.sampler_logprobs, session.teacher.score(rollouts).logprobs, atol=2e-5, rtol=0)


def test_loss_and_source_must_agree(tiny_config):
    with pytest.raises(ConfigError, match="loss.kind=sft with rollout.source=student"):
        validate({**tiny_config, "loss": {"kind": "sft"}})
    with pytest.raises(ConfigError, match="loss.kind=reverse_kl_pg with rollout.source=dataset"):
        validate({**tiny_config, "rollout": {"source": "dataset"}})


def test_dataset_source_needs_answers_before_any_weight_loads(tiny_config, tmp_path, monkeypatch):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Question : Tom has 2 pens ."}) + "\n")
    raw = sft_config(tiny_config)
    raw["data"] = {**raw["data"], "train": str(data)}
    monkeypatch.setattr(
        "opd.train.setup.load_model", lambda *a, **k: pytest.fail("weights loaded before the data check")
    )
    monkeypatch.setattr(
        "opd.teachers.build.load_teacher", lambda *a, **k: pytest.fail("weights loaded before the data check")
    )
    with pytest.raises(DataError, match="rollout.source=dataset needs an 'answer'"):
        prepare(validate(raw), resume=False, log=lambda *_: None)


@pytest.mark.e2e
def test_opd_sft_command_fills_loss_and_source_and_trains(tiny_config, tmp_path):
    raw = {**tiny_config, "run": {**tiny_config["run"], "max_steps": 3}, "optim": {"lr": 3e-3}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path, defaults={"loss.kind": "sft", "rollout.source": "dataset"})
    assert (config.loss.kind, config.rollout.source) == ("sft", "dataset")
    result = run_cli("sft", str(path))
    assert result.returncode == 0, result.stderr
    output_dir = Path(raw["run"]["output_dir"])
    assert (output_dir / "final" / "model.safetensors").exists()
    assert load_config(output_dir / "config.yaml").loss.kind == "sft"  # the resolved config repeats it with opd train
    rows = read_metrics(output_dir / "metrics.jsonl")
    train_rows = [row for row in rows if "loss" in row]
    assert len(train_rows) == 3
    for row in train_rows:
        assert "distill/reverse_kl" not in row and "distill/seq_reverse_kl" not in row  # not the student's samples
        assert row["loss"] == pytest.approx(-row["logprob/student"], rel=1e-5)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # the same answers get likelier
    assert "eval/distill/reverse_kl" in rows[0] and "eval/distill/reverse_kl" in rows[-1]  # eval stays on-policy


def test_dataset_sft_runs_without_a_teacher_and_reports_no_teacher_figures(tiny_config):
    raw = sft_config(tiny_config)
    raw["run"] = {**raw["run"], "max_steps": 2}
    del raw["teacher"]
    result = train(validate(raw), log=lambda *_: None)
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    train_rows = [row for row in rows if "loss" in row]
    assert len(train_rows) == 2
    for row in rows:
        assert not any(
            "teacher" in key or "reverse_kl" in key for key in row if not key.startswith(("compute/", "timing/"))
        )
    for row in train_rows:
        assert row["compute/teacher_flops"] == 0 and row["compute/rollout_flops"] == 0
        assert row["loss"] == pytest.approx(-row["logprob/student"], rel=1e-5)
    assert "eval/accuracy" in rows[-1]


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_every_other_run_needs_a_teacher(tiny_config, source):
    raw = {
        **tiny_config,
        "loss": {"kind": "sft" if source == "teacher" else "reverse_kl_pg"},
        "rollout": {"source": source},
    }
    del raw["teacher"]
    with pytest.raises(ConfigError, match=f"teacher.path: required for .* rollout.source={source}"):
        validate(raw)


@pytest.mark.parametrize("teacher_temperature", [1.0, 0.5])
def test_teacher_samples_are_scored_again_only_under_another_distribution(
    tiny_config, teacher_temperature, monkeypatch
):
    raw = sft_config(tiny_config, source="teacher")
    raw["teacher"] = {**raw["teacher"], "temperature": teacher_temperature}
    config = validate(raw)
    session = prepare(config, resume=False, log=lambda *_: None)
    rollouts = session.rollouts.primary.sample(session.train_prompts.batch([0, 1]), 2, 0)
    forwards = []
    original = session.teacher.score
    monkeypatch.setattr(session.teacher, "score", lambda *a, **k: forwards.append(1) or original(*a, **k))
    scored, flops = score(session, rollouts)
    if teacher_temperature == config.rollout.temperature:  # the sampling pass already gave ℓᵀ: reuse it
        assert not forwards and scored.teacher_logprobs is rollouts.sampler_logprobs and flops == 0
    else:
        assert forwards and flops > 0
        torch.testing.assert_close(scored.teacher_logprobs, original(rollouts).logprobs)
        assert not torch.allclose(scored.teacher_logprobs, rollouts.sampler_logprobs, atol=1e-3)
