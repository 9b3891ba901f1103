"""`opd demo` end to end: it meets its numbers, and its run directory repeats through `opd train`."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from conftest import run_cli
from opd.config import load_config


def test_demo_distills_and_its_config_repeats_the_run(tmp_path):
    out = tmp_path / "demo"
    demo = run_cli("demo", "--out", str(out), timeout=1200)  # ~45 s alone; generous for a loaded CI machine
    assert demo.returncode == 0, demo.stderr
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["teacher_accuracy"] >= 0.80
    assert summary["student_accuracy_after"] - summary["student_accuracy_before"] >= 0.20
    assert summary["reverse_kl_after"] <= 0.5 * summary["reverse_kl_before"]
    assert "student accuracy" in demo.stdout and "held-out reverse KL" in demo.stdout

    config = load_config(out / "config.yaml")
    for path in (config.student.path, config.teacher.path, config.data.train, config.data.eval):
        assert Path(path).exists(), path
    repeat = run_cli("train", str(out / "config.yaml"), "--set", f"run.output_dir={tmp_path / 'repeat'}", "run.progress=false",
                     timeout=1200)
    assert repeat.returncode == 0, repeat.stderr
    original = load_file(out / "final" / "model.safetensors")
    repeated = load_file(tmp_path / "repeat" / "final" / "model.safetensors")
    assert original.keys() == repeated.keys()
    for name in original:
        assert (original[name] == repeated[name]).all(), name
