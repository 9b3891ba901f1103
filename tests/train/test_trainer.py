"""Invariances of the training loop: micro-batching, chunking, resume after SIGKILL, atomic saves."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opd.config.files import validate
from opd.errors import TrainingDiverged
from opd.io import checkpoint as checkpoint_module
from opd.io.checkpoint import latest_checkpoint
from opd.io.sinks import read_metrics
from opd.train.trainer import train

from conftest import run_cli
from weights import assert_weights_close, final_weights, one_step


@pytest.mark.parametrize("kind", ["reverse_kl_pg", "jsd"])
def test_micro_batch_size_does_not_change_the_update(tiny_config, tmp_path, kind):
    """One step with micro_batch_size B and with B/4 gives the same weights (TRL #4719)."""
    base = {
        **tiny_config,
        "batch": {"prompts_per_step": 4, "micro_batch_size": 8},
        "loss": {"kind": kind, "discount": 0.9 if kind == "reverse_kl_pg" else 0.0},
    }
    # Adam's first step is lr * g / (|g| + eps): about sign(g) for gradients near zero, where float
    # noise of 1e-9 would flip whole steps. A larger eps keeps the update a smooth function of g.
    base["optim"] = {"lr": 1e-2, "max_grad_norm": None, "eps": 1e-3}
    whole = one_step(base, tmp_path, "whole")
    split = one_step(base, tmp_path, "split", batch={"micro_batch_size": 2})
    start = load_file(Path(tiny_config["student"]["path"]) / "model.safetensors")
    moved = max(float((whole[k] - start[k]).abs().max()) for k in whole)
    assert moved > 1e-4  # the step really changed the weights
    assert_weights_close(whole, split, atol=1e-6)


def test_chunk_size_does_not_change_the_update(tiny_config, tmp_path):
    base = {**tiny_config, "optim": {"lr": 1e-2, "eps": 1e-3}, "loss": {"kind": "forward_kl", "chunk_size": 256}}
    whole = one_step(base, tmp_path, "one-chunk")
    assert_weights_close(whole, one_step(base, tmp_path, "chunks", loss={"chunk_size": 3}), atol=1e-6)
    start = load_file(Path(tiny_config["student"]["path"]) / "model.safetensors")
    assert max(float((whole[k] - start[k]).abs().max()) for k in whole) > 1e-4  # the step really moved the weights


@pytest.mark.e2e
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_config, tmp_path):
    raw = {**tiny_config}
    raw["run"] = {**raw["run"], "max_steps": 40, "save_every": 1, "eval_every": 0}
    raw["data"] = {**raw["data"], "eval": None}
    raw["optim"] = {"lr": 1e-2}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))

    def run(*extra):
        return subprocess.run(
            [sys.executable, "-m", "opd", "train", str(config_path), *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )

    uninterrupted = run("--set", f"run.output_dir={tmp_path / 'uninterrupted'}")
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "opd", "train", str(config_path), "--set", f"run.output_dir={killed_dir}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (killed_dir / "checkpoints" / "step-3").exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "final").exists()
    killed_at = int(latest_checkpoint(killed_dir).name.split("-")[1])
    assert killed_at < 40

    resumed = run("--set", f"run.output_dir={killed_dir}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert_weights_close(final_weights(tmp_path / "uninterrupted"), final_weights(killed_dir), atol=0)
    rows = read_metrics(killed_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 41))  # no step logged twice, none missing
    # Cumulative compute carries over the kill: the same total as the uninterrupted run.
    assert rows[-1]["compute/flops"] == read_metrics(tmp_path / "uninterrupted" / "metrics.jsonl")[-1]["compute/flops"]


def test_crash_mid_save_leaves_no_complete_looking_checkpoint(tiny_config, tmp_path, monkeypatch):
    raw = {**tiny_config, "run": {**tiny_config["run"], "max_steps": 3, "save_every": 1}}
    real_write = checkpoint_module.write_trainer_state
    calls = {"count": 0}

    def crash_on_second(*args):  # after every rank's DCP shard of step 2 is written, before the rename
        calls["count"] += 1
        if calls["count"] == 2:
            raise OSError("disk full")
        return real_write(*args)

    monkeypatch.setattr(checkpoint_module, "write_trainer_state", crash_on_second)
    with pytest.raises(OSError):
        train(validate(raw), log=lambda *_: None)
    output_dir = Path(raw["run"]["output_dir"])
    complete = sorted(path.name for path in (output_dir / "checkpoints").iterdir() if not path.name.startswith("."))
    assert complete == ["step-1"]
    assert latest_checkpoint(output_dir).name == "step-1"
    assert not (output_dir / "final").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    """Divergence at step 3 raises before the update; step-2 stays the latest checkpoint, no final/."""
    from opd.objectives import losses as losses_module

    real = losses_module.discounted_advantages
    calls = {"count": 0}

    def poisoned(*args, **kwargs):
        calls["count"] += 1
        advantages = real(*args, **kwargs)
        return advantages * float("nan") if calls["count"] == 3 else advantages

    monkeypatch.setattr(losses_module, "discounted_advantages", poisoned)
    raw = {**tiny_config, "run": {**tiny_config["run"], "max_steps": 5, "save_every": 1}}
    with pytest.raises(TrainingDiverged, match="step 3.*not finite.*step-2"):
        train(validate(raw), log=lambda *_: None)
    output_dir = Path(raw["run"]["output_dir"])
    assert latest_checkpoint(output_dir).name == "step-2"
    assert not (output_dir / "checkpoints" / "step-3").exists()
    assert not (output_dir / "final").exists()


def test_metrics_file_has_every_named_figure(tiny_config):
    raw = {**tiny_config, "run": {**tiny_config["run"], "max_steps": 2, "eval_every": 1}}
    train(validate(raw), log=lambda *_: None)
    rows = read_metrics(Path(raw["run"]["output_dir"]) / "metrics.jsonl")
    names = [
        "loss",
        "logprob/student",
        "logprob/teacher",
        "perplexity/student",
        "perplexity/teacher",
        "distill/reverse_kl",
        "generation/avg_length",
        "generation/eos_fraction",
        "grad_norm",
        "lr",
        "timing/rollout_s",
        "timing/teacher_s",
        "timing/update_s",
        "throughput/tokens_per_s",
        "ratio/far_fraction",
        "ratio/max_abs_log",
        "entropy/student",
        "entropy/teacher",
        "generation/repetition",
    ]
    assert [row["step"] for row in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert set(names) <= row.keys()
        assert row["perplexity/teacher"] == pytest.approx(torch.tensor(-row["logprob/teacher"]).exp().item(), rel=1e-6)
    for row in rows:
        for name in names[1:8] + ["entropy/student", "entropy/teacher", "generation/repetition"]:
            assert f"eval/{name}" in row
        assert 0.0 <= row["eval/accuracy"] <= 1.0


def test_resume_refuses_a_changed_config_but_allows_more_steps(tiny_config):
    from opd.errors import ConfigError

    raw = {
        **tiny_config,
        "run": {**tiny_config["run"], "max_steps": 2, "save_every": 1},
        "data": {**tiny_config["data"], "eval": None},
        "optim": {"lr": 1e-3, "schedule": "constant"},
    }
    train(validate(raw), log=lambda *_: None)
    changed = {**raw, "optim": {**raw["optim"], "lr": 5e-3}}
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.005"):
        train(validate(changed), resume=True, log=lambda *_: None)
    lora = {**raw, "student": {**raw["student"], "lora": {"r": 4}}}  # a full checkpoint into adapters
    with pytest.raises(ConfigError, match=r"student.lora.r: None -> 4"):
        train(validate(lora), resume=True, log=lambda *_: None)
    longer = {**raw, "run": {**raw["run"], "max_steps": 3}}
    result = train(validate(longer), resume=True, log=lambda *_: None)
    assert result.steps_run == 1
    assert [row["step"] for row in read_metrics(Path(raw["run"]["output_dir"]) / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("recorded_in", ["resolved.yaml", "config.yaml"])
def test_resume_keeps_the_forward_kl_term_the_run_recorded(tiny_config, recorded_in):
    """A run recorded forward_kl_coef 0 (set by the user, or by a run from before the default, whose
    config.yaml held resolved values and which has no resolved.yaml); resumed with the default (null), it
    keeps 0 rather than being refused or switching the term on mid-run. A fresh run asks null and
    resolves to 1.0, and records both."""
    raw = {
        **tiny_config,
        "run": {**tiny_config["run"], "max_steps": 2, "save_every": 1},
        "data": {**tiny_config["data"], "eval": None},
        "optim": {"lr": 1e-3, "schedule": "constant"},
    }
    output_dir = Path(raw["run"]["output_dir"])
    train(validate({**raw, "loss": {"forward_kl_coef": 0.0}}), log=lambda *_: None)
    if recorded_in == "config.yaml":
        (output_dir / "resolved.yaml").unlink()
    result = train(validate({**raw, "run": {**raw["run"], "max_steps": 3}}), resume=True, log=lambda *_: None)
    assert result.steps_run == 1
    assert yaml.safe_load((output_dir / "resolved.yaml").read_text())["loss"]["forward_kl_coef"] == 0.0
    assert yaml.safe_load((output_dir / "config.yaml").read_text())["loss"]["forward_kl_coef"] is None
    fresh = {**raw, "run": {**raw["run"], "output_dir": raw["run"]["output_dir"] + "-fresh", "max_steps": 1}}
    train(validate(fresh), log=lambda *_: None)
    fresh_dir = Path(fresh["run"]["output_dir"])
    assert yaml.safe_load((fresh_dir / "config.yaml").read_text())["loss"]["forward_kl_coef"] is None
    assert yaml.safe_load((fresh_dir / "resolved.yaml").read_text())["loss"]["forward_kl_coef"] == 1.0


def test_resume_with_more_steps_keeps_the_cosine_schedule_the_saved_steps_followed(tiny_config):
    """A 4-step cosine run stopped after step 1, resumed with max_steps 8: stretching the schedule would
    raise step 3's lr from 0.5 to 0.85 of the base, so it is refused unless decay_steps keeps the horizon."""
    from opd.errors import ConfigError

    raw = {
        **tiny_config,
        "run": {**tiny_config["run"], "max_steps": 4, "save_every": 1},
        "data": {**tiny_config["data"], "eval": None},
        "optim": {"lr": 1e-3, "schedule": "cosine"},
    }
    output_dir = Path(raw["run"]["output_dir"])
    assert train(validate(raw), log=lambda *_: None, time_limit_s=0.0).steps_run == 1
    stretched = {**raw, "run": {**raw["run"], "max_steps": 8}}
    with pytest.raises(ConfigError, match=r"run.max_steps 4 -> 8 .*optim.decay_steps=4"):
        train(validate(stretched), resume=True, log=lambda *_: None)
    kept = {**stretched, "optim": {**raw["optim"], "decay_steps": 4}}
    train(validate(kept), resume=True, log=lambda *_: None)
    lrs = {row["step"]: row["lr"] for row in read_metrics(output_dir / "metrics.jsonl")}
    assert lrs[3] == pytest.approx(0.5e-3)  # (1 + cos(pi * 2/4)) / 2 of the base rate, as before the resume
    assert lrs[5] == pytest.approx(0.0, abs=1e-12)  # past the horizon: the floor


def test_resume_never_trains_over_a_finished_run_and_needs_a_checkpoint(tiny_config):
    from opd.errors import ConfigError

    """A finished run without checkpoints (save_every 0) is not retrained by --resume, nor its final/ or
    config.yaml rewritten; a run killed before its first checkpoint needs --resume-or-start to restart,
    and then restarts from 0 with no duplicated rows."""
    raw = {**tiny_config, "run": {**tiny_config["run"], "max_steps": 2, "save_every": 0}}
    train(validate(raw), log=lambda *_: None)
    output_dir = Path(raw["run"]["output_dir"])
    final_weights = (output_dir / "final" / "model.safetensors").read_bytes()
    recorded = (output_dir / "config.yaml").read_text()
    for resume in (True, "auto"):
        with pytest.raises(
            ConfigError, match=r"--resume: the run in .* is finished \(final/\) and saved no checkpoint"
        ):
            train(validate(raw), resume=resume, log=lambda *_: None)
    assert (output_dir / "final" / "model.safetensors").read_bytes() == final_weights
    assert (output_dir / "config.yaml").read_text() == recorded

    shutil.rmtree(output_dir / "final")  # as if killed before its first checkpoint
    with pytest.raises(ConfigError, match=r"--resume: no complete checkpoint in .*run.save_every=0.*--resume-or-start"):
        train(validate(raw), resume=True, log=lambda *_: None)
    messages = []
    train(validate(raw), resume="auto", log=messages.append)
    assert any("starting from step 0" in str(message) for message in messages)
    assert [row["step"] for row in read_metrics(output_dir / "metrics.jsonl")] == [0, 1, 2]


def test_checkpoints_beyond_keep_checkpoints_go_once_a_newer_one_is_complete(tiny_config):
    from opd.io.checkpoint import complete_checkpoints

    raw = {**tiny_config, "run": {**tiny_config["run"], "max_steps": 4, "save_every": 1, "keep_checkpoints": 2}}
    raw["data"] = {**raw["data"], "eval": None}
    train(validate(raw), log=lambda *_: None)
    output_dir = Path(raw["run"]["output_dir"])
    assert [path.name for path in complete_checkpoints(output_dir)] == ["step-3", "step-4"]
    assert sorted(path.name for path in (output_dir / "checkpoints").iterdir()) == ["step-3", "step-4"]


def test_resume_refuses_a_checkpoint_past_max_steps_and_a_finished_run(tiny_config):
    from opd.errors import ConfigError

    raw = {
        **tiny_config,
        "run": {**tiny_config["run"], "max_steps": 3, "save_every": 1},
        "optim": {"schedule": "constant"},
    }
    train(validate(raw), log=lambda *_: None)
    output_dir = Path(raw["run"]["output_dir"])
    recorded = (output_dir / "config.yaml").read_text()
    shorter = {**raw, "run": {**raw["run"], "max_steps": 2}}
    with pytest.raises(ConfigError, match=r"checkpoints/step-3\) is at step 3, past run.max_steps=2; .* 3 or more"):
        train(validate(shorter), resume=True, log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"is finished at run.max_steps=3 \(final/\); raise run.max_steps"):
        train(validate(raw), resume=True, log=lambda *_: None)
    assert (output_dir / "config.yaml").read_text() == recorded and (output_dir / "final").is_dir()


def test_first_update_is_on_policy_even_with_dropout(tiny_models, tiny_config, tmp_path):
    """The update's log pi_theta equals the sampler's ℓˢ on the first pass (rho = 1), with attention
    dropout configured: the update runs the student in eval mode, as the sampler did."""
    import shutil

    from transformers import AutoConfig

    from opd.train.setup import prepare
    from opd.train.step import score
    from opd.train.update import update_student

    student_dir = tmp_path / "dropout-student"
    shutil.copytree(tiny_models["student"], student_dir)
    model_config = AutoConfig.from_pretrained(student_dir)
    model_config.attention_dropout = 0.5
    model_config.save_pretrained(student_dir)
    raw = {
        **tiny_config,
        "student": {"path": str(student_dir)},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 8, "temperature": 0.7},
    }
    config = validate(raw)
    session = prepare(config, resume=False, log=lambda *_: None)
    batch = session.rollouts.primary.sample(session.train_prompts.batch([0, 1]), 2, 0)
    update = update_student(session, score(session, batch)[0])
    assert update["ratio/max_abs_log"] < 2e-5 and update["ratio/far_fraction"] == 0
    assert update["grad_norm"] > 0


def test_time_limit_stops_after_the_step_it_passes_in_and_writes_final(tiny_config):
    raw = {**tiny_config, "run": {**tiny_config["run"], "max_steps": 50, "log_every": 10}}
    result = train(validate(raw), log=lambda *_: None, time_limit_s=0.0)
    assert result.steps_run == 1
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1]  # the last step is logged and evaluated like a last step
    assert (
        "loss" in rows[1]
        and "eval/accuracy" in rows[1]
        and result.last_eval == {key: value for key, value in rows[1].items() if key.startswith("eval/")}
    )
    assert (result.output_dir / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("kind", ["reverse_kl", "reverse_kl_pg"])
def test_no_lm_head_call_sees_more_than_a_chunk_of_tokens(tiny_config, kind):
    """Teacher scoring and the loss never run an LM head, the student's or the teacher's, over more than
    `loss.chunk_size` positions (hooks on the head modules themselves, through a whole training step)."""
    from opd.ops.logprobs import tokens_per_chunk
    from opd.train.setup import prepare
    from opd.train.step import train_step

    assert (tokens_per_chunk(None, 151_936), tokens_per_chunk(None, 8192), tokens_per_chunk(7, 151_936)) == (
        110,
        2048,
        7,
    )
    raw = {
        **tiny_config,
        "loss": {"kind": kind, "chunk_size": 5},
        "data": {**tiny_config["data"], "eval": None},
        "batch": {"prompts_per_step": 2, "micro_batch_size": 4},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 8},
    }
    config = validate(raw)
    session = prepare(config, resume=False, log=lambda *_: None)
    seen = {"student": [], "teacher": []}
    for name, model in (("student", session.student.model), ("teacher", session.teacher.model)):
        model.get_output_embeddings().register_forward_hook(
            lambda module, inputs, output, name=name: seen[name].append(inputs[0].shape[:-1].numel())
        )
    metrics, _ = train_step(session, step=1)
    assert metrics["generation/avg_length"] * 4 > 5  # the step has more tokens than one chunk
    assert seen["student"] and seen["teacher"]
    assert max(seen["student"] + seen["teacher"]) <= 5, seen


@pytest.mark.e2e
def test_opd_export_writes_a_checkpoint_as_the_final_model_would_be(tiny_config, tmp_path):
    raw = {**tiny_config, "run": {**tiny_config["run"], "max_steps": 2, "save_every": 2}}
    train(validate(raw), log=lambda *_: None)
    output_dir = Path(raw["run"]["output_dir"])
    result = run_cli("export", str(output_dir / "checkpoints" / "step-2"), str(tmp_path / "exported"))
    assert result.returncode == 0, result.stderr
    exported, final = (
        load_file(folder / "model.safetensors") for folder in (tmp_path / "exported", output_dir / "final")
    )
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    bad = run_cli("export", str(output_dir), str(tmp_path / "nothing"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "not a complete checkpoint" in bad.stderr
    assert not (tmp_path / "nothing").exists()


def test_a_checkpoint_this_opd_cannot_read_is_refused_before_any_weight_loads(tiny_config, monkeypatch):
    from opd.errors import ConfigError

    raw = {
        **tiny_config,
        "run": {**tiny_config["run"], "max_steps": 1, "save_every": 1},
        "data": {**tiny_config["data"], "eval": None},
        "optim": {"lr": 1e-3, "schedule": "constant"},
    }
    train(validate(raw), log=lambda *_: None)
    checkpoint = Path(raw["run"]["output_dir"]) / "checkpoints" / "step-1"
    for item in (checkpoint / "state").iterdir():  # as written by an opd before DCP checkpoints
        item.unlink()
    (checkpoint / "state").rmdir()
    monkeypatch.setattr("opd.train.setup.load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    longer = {**raw, "run": {**raw["run"], "max_steps": 2}}
    with pytest.raises(ConfigError, match=r"--resume: .*step-1 has no state/"):
        train(validate(longer), resume=True, log=lambda *_: None)
