"""`opd report`: a PNG and a self-contained HTML page of one or several runs."""

from __future__ import annotations

import base64
import json

import pytest

from opd.config.files import validate
from opd.train.trainer import train

from conftest import run_cli

pytestmark = pytest.mark.e2e  # every test here runs opd in processes of its own


def test_report_overlays_runs_into_png_and_self_contained_html(tiny_config, tmp_path):
    runs = []
    for name, lr in (("run-a", 1e-3), ("run-b", 3e-3)):
        raw = {**tiny_config, "run": {**tiny_config["run"], "output_dir": str(tmp_path / name), "max_steps": 3}}
        raw["optim"] = {"lr": lr}
        train(validate(raw), log=lambda *_: None)
        runs.append(tmp_path / name)
    result = run_cli("report", *map(str, runs), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    png = (tmp_path / "report" / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    page = (tmp_path / "report" / "report.html").read_text()
    assert base64.b64encode(png).decode() in page  # the picture is embedded, not linked
    assert "run-a" in page and "run-b" in page
    first_eval = json.loads((runs[0] / "metrics.jsonl").read_text().splitlines()[0])
    assert f"{first_eval['eval/distill/reverse_kl']:.3f}" in page
    from opd.io.report import PANELS, _series, load_runs

    drawn = {key for key, _ in PANELS}
    assert {"entropy/student", "generation/repetition"} <= drawn
    for rows in load_runs(runs).values():  # every panel has a curve to draw
        for key in drawn - {"accuracy"}:
            assert _series(rows, key)[0], key
        assert _series(rows, "eval/accuracy")[0]


def test_report_on_a_folder_without_metrics_is_a_one_line_error(tmp_path):
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2 and "no metrics.jsonl" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "report.png").exists()
