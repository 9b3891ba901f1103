"""`opd demo` end to end: it meets its numbers, and its run directory repeats through `opd train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.config.files import load_config
from opd.io.sinks import read_metrics

from conftest import run_cli

pytestmark = pytest.mark.e2e  # every test here runs opd in processes of its own


# The tests run 60 of the demo's 150 steps: every floor holds at 60 over seeds 0-4 (the main demo: accuracy after
# 44.5-51.0 %, up 31-36 points; reverse KL falls 59-70 %), measured with
# python benchmarks/demo_seeds.py --variants same other self --steps 60.
SHORT = ("--steps", "60")


def test_demo_distills_and_its_config_repeats_the_run(tmp_path):
    out = tmp_path / "demo"
    demo = run_cli("demo", "--out", "demo", *SHORT, cwd=tmp_path, timeout=1200)  # ~20 s alone; generous under load
    assert demo.returncode == 0, demo.stderr
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["teacher_accuracy"] >= 0.80
    assert summary["student_accuracy_after"] - summary["student_accuracy_before"] >= 0.20
    assert summary["reverse_kl_after"] <= 0.5 * summary["reverse_kl_before"]
    assert "student accuracy" in demo.stdout and "held-out reverse KL" in demo.stdout

    config = load_config(out / "config.yaml")
    for path in (config.student.path, config.teacher.path, config.data.train, config.data.eval):
        assert Path(path).exists(), path
    # Its first 10 steps again, from another folder than the demo's (its config's paths hold wherever it
    # is run), without the held-out evaluations (they draw from streams of their own) and on the same
    # cosine horizon: every step's figures equal bit for bit.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    repeat = run_cli(
        "train",
        str(out / "config.yaml"),
        "--set",
        f"run.output_dir={tmp_path / 'repeat'}",
        "run.progress=false",
        "data.eval=null",
        "run.max_steps=10",
        "optim.decay_steps=60",
        cwd=elsewhere,
        timeout=1200,
    )
    assert repeat.returncode == 0, repeat.stderr
    timing = ("timing/", "throughput/", "memory/", "compute/")
    original = [row for row in read_metrics(out / "metrics.jsonl") if 1 <= row["step"] <= 10]
    repeated = read_metrics(tmp_path / "repeat" / "metrics.jsonl")
    assert [row["step"] for row in repeated] == [row["step"] for row in original] == list(range(1, 11))
    for first, second in zip(original, repeated):
        for key, value in second.items():
            if not key.startswith(timing) and not key.startswith("eval/"):
                assert first[key] == value, (first["step"], key)


def test_demo_with_a_teacher_of_another_tokenizer_distills(tmp_path):
    """The cross-tokenizer demo: a byte-level BPE teacher, the word-level student, the chunk estimator."""
    out = tmp_path / "cross"
    demo = run_cli("demo", "--out", str(out), "--teacher-tokenizer", "other", *SHORT, timeout=1200)
    assert demo.returncode == 0, demo.stderr
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["teacher_accuracy"] >= 0.80
    assert summary["student_accuracy_after"] - summary["student_accuracy_before"] >= 0.20
    assert summary["reverse_kl_after"] <= 0.6 * summary["reverse_kl_before"]  # sequence-level, falls >= 40%
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert "eval/distill/reverse_kl" not in last and last["align/tokens_per_chunk"] >= 1


def test_demo_self_distillation_with_the_answer_shown_to_the_teacher_only_improves_the_student(tmp_path):
    out = tmp_path / "self"
    demo = run_cli("demo", "--out", str(out), "--self-distill", *SHORT, timeout=1200)
    assert demo.returncode == 0, demo.stderr
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["student_accuracy_after"] - summary["student_accuracy_before"] >= 0.10
    config = load_config(out / "config.yaml")
    assert config.teacher.path == "student"  # as asked; it reads the student's own initial weights:
    assert config.teacher_path("teacher") == config.student.path
    rows = [json.loads(line) for line in Path(config.data.train).read_text().splitlines()[:3]]
    assert all(row["teacher_context"].startswith("####") and "####" not in row["prompt"] for row in rows)
