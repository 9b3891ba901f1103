"""`opd report`: the curves users judge a distillation run by, as a PNG and a self-contained HTML page.

Panels: teacher perplexity of the student's samples, teacher log-prob, reverse KL, student
perplexity (the four curves of ArcticTraining's validation), the two that show a collapsing student
(its sampling entropy, and repeated 4-grams in its samples), held-out accuracy and throughput.
Training figures are lines; held-out (`eval/`) figures are markers of the same colour. Several run
directories overlay.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from opd.errors import DataError
from opd.io.sinks import read_metrics

PANELS = [
    ("perplexity/teacher", "teacher perplexity of student samples"),
    ("logprob/teacher", "teacher log-prob (nats/token)"),
    ("distill/seq_reverse_kl", "reverse KL (sequence, nats/token)"),
    ("perplexity/student", "student perplexity"),
    ("entropy/student", "entropy of the student's sampling distribution"),
    ("generation/repetition", "repeated 4-grams in the student's samples"),
    ("accuracy", "held-out accuracy"),
    ("throughput/tokens_per_s", "throughput (completion tokens/s)"),
]


def load_runs(run_dirs: list[str | Path]) -> dict[str, list[dict]]:
    runs = {}
    for run_dir in map(Path, run_dirs):
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            raise DataError(f"{run_dir}: no metrics.jsonl; is it an opd run directory?")
        try:
            rows = read_metrics(path)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON") from None
        if not rows:
            raise DataError(f"{path}: no rows yet")
        runs[_unique_name(run_dir, runs)] = rows
    return runs


def _unique_name(run_dir: Path, taken: dict) -> str:
    name = run_dir.resolve().name
    return name if name not in taken else str(run_dir)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def plot(runs: dict[str, list[dict]], png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 4, figsize=(20, 8), constrained_layout=True)
    for index, (name, rows) in enumerate(runs.items()):
        colour = f"C{index % 10}"
        for axis, (key, title) in zip(axes.flat, PANELS):
            steps, values = _series(rows, key)
            if steps:
                axis.plot(steps, values, color=colour, linewidth=1.2, label=f"{name} (train)")
            steps, values = _series(rows, f"eval/{key}")
            if steps:
                axis.plot(steps, values, color=colour, marker="o", linestyle="--", label=f"{name} (held-out)")
            axis.set_title(title)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
    for axis in axes.flat:
        if axis.lines:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes, color="grey")
    figure.savefig(png_path, dpi=90)
    plt.close(figure)


def _summary_rows(runs: dict[str, list[dict]]) -> list[list[str]]:
    table = []
    for name, rows in runs.items():
        evals = [row for row in rows if "eval/distill/seq_reverse_kl" in row or "eval/distill/reverse_kl" in row]
        first, last = (evals[0], evals[-1]) if evals else ({}, {})

        def show(row: dict, key: str, fmt: str) -> str:
            return format(row[key], fmt) if row.get(key) is not None else "–"

        table.append(
            [
                name,
                str(rows[-1]["step"]),
                show(first, "eval/accuracy", ".1%"),
                show(last, "eval/accuracy", ".1%"),
                show(first, _kl_key(first), ".3f"),
                show(last, _kl_key(last), ".3f"),
            ]
        )
    return table


def _kl_key(row: dict) -> str:
    """The held-out reverse KL: sequence-level (any teacher), or the per-token figure of runs before it existed."""
    return "eval/distill/seq_reverse_kl" if "eval/distill/seq_reverse_kl" in row else "eval/distill/reverse_kl"


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.png and report.html (the PNG embedded) to out_dir, default the first run dir."""
    runs = load_runs(run_dirs)
    out_dir = Path(out_dir or run_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    png_path, html_path = out_dir / "report.png", out_dir / "report.html"
    plot(runs, png_path)
    image = base64.b64encode(png_path.read_bytes()).decode("ascii")
    header = [
        "run",
        "last step",
        "accuracy (first eval)",
        "accuracy (last eval)",
        "reverse KL (first eval)",
        "reverse KL (last eval)",
    ]
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in _summary_rows(runs)
    )
    html_path.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>opd report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}</style>
</head><body>
<h1>opd report</h1>
<p>Healthy on-policy distillation: teacher perplexity falls, teacher log-prob rises, reverse KL falls;
student perplexity may rise first, then fall. A student whose entropy drops towards 0 or whose samples
repeat themselves is collapsing, whatever the reverse KL says. Lines are training batches, markers
held-out evaluations.</p>
<table><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr>{cells}</table>
<p><img alt="training curves" src="data:image/png;base64,{image}"></p>
</body></html>
""")
    return png_path, html_path
