"""Where metrics go: metrics.jsonl always, and optionally TensorBoard and Weights & Biases.

Both trackers are optional extras (`pip install 'opd[tensorboard]'`, `'opd[wandb]'`), off unless
`run.report_to` names them. Their packages are imported before any weight loads, so a missing one
fails in seconds with the install line rather than after the models load.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Protocol

from opd.config.schema import Config
from opd.errors import ConfigError

_PACKAGES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}


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


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def check_trackers(report_to: list[str]) -> None:
    """Raise ConfigError naming the install line when a tracker's package can't be imported."""
    for name in report_to:
        try:
            importlib.import_module(_PACKAGES[name])
        except ImportError as exc:
            raise ConfigError(
                f"run.report_to: '{name}' needs its package ({exc}); install it with pip install 'opd[{name}]'"
            ) from None


class TensorBoardTracker:
    """Scalars under OUTPUT_DIR/tensorboard. On resume, events past the checkpoint are purged, as
    metrics.jsonl drops its rows past the checkpoint."""

    def __init__(self, output_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per run directory: its id is kept in OUTPUT_DIR/wandb_run_id, so `--resume`
    continues the same W&B run. (W&B ignores re-logged steps at or below its last one.)"""

    def __init__(self, config: Config, output_dir: Path):
        import wandb

        id_file = output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None  # None: W&B makes a new one
        self.run = wandb.init(
            project=config.run.wandb_project,
            name=output_dir.name,
            id=run_id,
            resume="allow",
            dir=str(output_dir),
            config=config.model_dump(mode="json"),
        )
        id_file.write_text(self.run.id + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def update_config(self, config: Config) -> None:
        self.run.config.update(config.model_dump(mode="json"), allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


class MetricSinks:
    """metrics.jsonl plus the trackers `run.report_to` names; write() sends one row to each."""

    def __init__(self, config: Config, output_dir: Path, start_step: int, enabled: bool = True):
        """enabled: False on every rank but the first, which alone writes."""
        self.jsonl = MetricsLog(output_dir / "metrics.jsonl", start_step) if enabled else None
        self.trackers: list[Tracker] = []
        if not enabled:
            return
        makers = {
            "tensorboard": lambda: TensorBoardTracker(output_dir, start_step),
            "wandb": lambda: WandbTracker(config, output_dir),
        }
        for name in config.run.report_to:
            try:
                self.trackers.append(makers[name]())
            except Exception as exc:  # e.g. W&B online without a login: one line, not a traceback
                self.close()
                raise ConfigError(f"run.report_to: {name} failed to start: {type(exc).__name__}: {exc}") from None

    def update_config(self, config: Config) -> None:
        """The run's config as it settled after the trackers started (rollout.student_fraction auto, decided
        at step 0: opd.train.start), for the trackers that keep one."""
        for tracker in self.trackers:
            if hasattr(tracker, "update_config"):
                tracker.update_config(config)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(step, metrics)
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
