"""The console's live progress bar: steps, time, and the key figures of the last step."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressBar:
    """A rich progress bar that shows the key figures; silent when disabled."""

    KEYS = ("loss", "distill/seq_reverse_kl", "logprob/teacher", "throughput/tokens_per_s")

    def __init__(self, total: int, start: int, enabled: bool, label: str = "opd train"):
        self.enabled = enabled
        if not enabled:
            return
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
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
