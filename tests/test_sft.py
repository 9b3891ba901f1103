"""`opd sft`: the same loop with the NLL loss on the data's answers or on teacher samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import recompute_logprobs, run_cli
from opd.config import load_config, validate
from opd.errors import ConfigError, DataError
from opd.metrics import read_metrics
from opd.setup import prepare
from opd.trainer import update_student


def sft_config(tiny_config, **rollout) -> dict:
    return {**tiny_config, "loss": {"kind": "sft"}, "rollout": {**tiny_config["rollout"], "source": "dataset", **rollout}}


def reference_nll(model, rollouts) -> float:
    """Mean -log p(answer token) from one plain full forward per row, no padding, no chunks."""
    return float(-recompute_logprobs(model, rollouts, 1.0).sum() / rollouts.completion_mask.sum())


def test_dataset_rollouts_are_the_answers_and_the_loss_is_their_nll(tiny_config):
    session = prepare(validate(sft_config(tiny_config)), resume=False, log=lambda *_: None)
    tokenizer = session.student.tokenizer
    prompts = session.train_prompts.token_ids[:2]
    rollouts = session.sampler.sample(prompts, 2, session.generator)
    first_answer = session.train_prompts.answers[0]
    expected = tokenizer(first_answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    length = int(rollouts.completion_mask[0].sum())
    assert rollouts.completion_ids[0, :length].tolist() == expected[: session.sampler.max_new_tokens]
    assert torch.equal(rollouts.completion_ids[0], rollouts.completion_ids[1])  # two "samples" of one answer
    scores = session.teacher.score(rollouts)
    expected_loss = reference_nll(session.student, rollouts)  # before the update changes the weights
    update = update_student(session, validate(sft_config(tiny_config)), rollouts, scores)
    assert update["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert update["student_logprob"] == pytest.approx(-update["loss"], rel=1e-6)


def test_long_answers_are_cut_and_marked_unfinished(tiny_config):
    session = prepare(validate(sft_config(tiny_config, max_new_tokens=5)), resume=False, log=lambda *_: None)
    rollouts = session.sampler.sample(session.train_prompts.token_ids[:3], 1, session.generator)
    assert rollouts.completion_ids.shape[1] == 5 and not rollouts.finished.any()
    assert (rollouts.completion_ids != session.student.tokenizer.eos_token_id).all()


def test_teacher_rollouts_carry_the_teachers_own_logprobs(tiny_config):
    config = validate(sft_config(tiny_config, source="teacher"))
    session = prepare(config, resume=False, log=lambda *_: None)
    rollouts = session.sampler.sample(session.train_prompts.token_ids[:2], 2, session.generator)
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
    monkeypatch.setattr("opd.setup.load_model", lambda *a, **k: pytest.fail("weights loaded before the data check"))
    with pytest.raises(DataError, match="rollout.source=dataset needs an 'answer'"):
        prepare(validate(raw), resume=False, log=lambda *_: None)


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
        assert "distill/reverse_kl" not in row  # not the student's samples: no reverse-KL estimate
        assert row["loss"] == pytest.approx(-row["logprob/student"], rel=1e-5)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # the same answers get likelier
    assert "eval/distill/reverse_kl" in rows[0] and "eval/distill/reverse_kl" in rows[-1]  # eval stays on-policy
