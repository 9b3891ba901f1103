"""Metrics of a batch of rollouts, the JSONL log, and the console progress bar.

Every mean is over completion tokens (the mask), so prompt, pad and post-EOS positions never count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from opd.rollout import Rollouts


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of values (B, T) where mask (B, T) is set; where(), not multiply, so -inf can't make NaN."""
    count = mask.sum()
    return float(torch.where(mask.bool(), values, 0.0).sum() / count) if count > 0 else float("nan")


def rollout_metrics(rollouts: Rollouts, teacher_logprobs: torch.Tensor | None, prefix: str = "") -> dict[str, float]:
    """The distillation figures of DESIGN.md §1 for one batch. teacher_logprobs: (B, T), or None
    without a teacher (then only the student's and the length figures)."""
    mask = rollouts.completion_mask
    student_lp = masked_mean(rollouts.sampler_logprobs, mask)
    metrics = {f"{prefix}logprob/student": student_lp, f"{prefix}perplexity/student": math.exp(-student_lp)}
    if teacher_logprobs is not None:
        teacher_lp = masked_mean(teacher_logprobs, mask)
        metrics.update({
            f"{prefix}logprob/teacher": teacher_lp,
            f"{prefix}perplexity/teacher": math.exp(-teacher_lp),
            f"{prefix}distill/reverse_kl": masked_mean(rollouts.sampler_logprobs - teacher_logprobs, mask),
        })
    return {
        **metrics,
        f"{prefix}generation/avg_length": float(mask.sum(1).float().mean()),
        f"{prefix}generation/eos_fraction": float(rollouts.finished.float().mean()),
    }


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl."""

    def __init__(self, path: Path, start_step: int = 0):
        self.path = path
        if path.exists():
            # A run killed after its last checkpoint logged steps that will be redone: drop them,
            # and a torn last line with them. Starting from step 0 drops everything.
            steps = [(line, _step_of(line)) for line in path.read_text().splitlines()]
            kept = [line for line, step in steps if start_step > 0 and step is not None and step <= start_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        # NaN and inf are not JSON; null keeps the file readable by strict parsers such as jq.
        row = {key: value if math.isfinite(value) else None for key, value in metrics.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **row}) + "\n")


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressBar:
    """A rich progress bar that shows the key figures; silent when disabled."""

    KEYS = ("loss", "distill/reverse_kl", "logprob/teacher", "throughput/tokens_per_s")

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]opd train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[figures]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, figures="")
        self.progress.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        figures = "  ".join(f"{key.split('/')[-1]}={metrics[key]:.3g}" for key in self.KEYS if key in metrics)
        self.progress.update(self.task, completed=step, figures=figures)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
