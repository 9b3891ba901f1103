"""Checkpoints: the student in Hugging Face format plus the trainer state, written atomically.

A checkpoint is assembled in a hidden temporary folder and renamed into place in one step, so a crash
mid-save never leaves a `step-N/` that looks complete. Resuming picks the highest complete step.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from opd.loading import LoadedModel

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _write_atomically(folder: Path, write) -> Path:
    """Call write(temporary_folder), flush it to disk, then rename it to `folder` in one step."""
    folder = Path(folder)
    temporary = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    write(temporary)
    _fsync_tree(temporary)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    return folder


def _write_model(student: LoadedModel, folder: Path, weights: dict | None = None) -> None:
    """The student's trained weights: the whole model, or with LoRA only its adapters (peft format).
    weights: the full state dict of a sharded student, gathered by the caller."""
    if student.adapter is not None:
        student.adapter.save_pretrained(folder, safe_serialization=True)
    elif weights is not None:
        student.model.save_pretrained(folder, safe_serialization=True, state_dict=dict(weights))  # it pops entries
    else:
        student.model.save_pretrained(folder, safe_serialization=True)
    student.tokenizer.save_pretrained(folder)


def save_model(student: LoadedModel, folder: Path, weights: dict | None = None) -> Path:
    """Write the student and its tokenizer to `folder` atomically (safetensors weights). With LoRA the
    folder holds the merged model, loadable by from_pretrained as it is, and the adapters in adapter/.
    Merging changes the model in place: call this when training is over."""

    def write(temporary: Path) -> None:
        if student.adapter is None:
            _write_model(student, temporary, weights)
            return
        _write_model(student, temporary / "adapter")
        merged = student.adapter.merge_and_unload()
        merged.save_pretrained(temporary, safe_serialization=True)
        student.tokenizer.save_pretrained(temporary)

    return _write_atomically(folder, write)


def rng_state() -> dict[str, Any]:
    """Global random states. Sampling needs none: its draws are keyed by the prompts' stream positions."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    student: LoadedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    prompts_consumed: int,
    flops: float = 0.0,
    guard_state: dict | None = None,
    weights: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """weights, optimizer_state: full (unsharded) states of a sharded student, gathered by the caller;
    a checkpoint always holds whole states, so any world size resumes it."""
    state = {
        "guard": guard_state,
        "step": step,
        "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "prompts_consumed": prompts_consumed,
        "flops": flops,
    }

    def write(temporary: Path) -> None:
        _write_model(student, temporary, weights)
        torch.save(state, temporary / STATE_FILE)

    return _write_atomically(Path(output_dir) / "checkpoints" / f"step-{step}", write)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _STEP_DIR.match(path.name)) and (path / STATE_FILE).is_file()
    ]
    return max(steps)[1] if steps else None


def load_trainer_state(folder: Path) -> dict[str, Any]:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
