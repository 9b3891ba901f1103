"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically; final/ in Hugging Face format.

`checkpoints/step-N/` holds:
- `state/`: the student's weights (a LoRA student's adapters only) and the optimizer's state, written
  by DCP, each rank its own shard, with the metadata to load them on any number of ranks in any layout
  (replicated or sharded);
- `trainer_state.pt`: the step, the scheduler, the data position, the collapse guard, the FLOPs so far
  and every rank's random state.
A checkpoint is assembled in a hidden `.step-N.partial/` folder and renamed into place once every rank
has written its part, so a crash mid-save never leaves a `step-N/` that looks complete. Resuming picks
the highest complete step. Under several machines, run.output_dir must be one shared file system.
`opd export` turns a checkpoint into a Hugging Face folder like final/.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from opd.distributed.world import World
from opd.errors import ConfigError
from opd.models.loading import LoadedModel

STATE_FILE = "trainer_state.pt"
STATE_DIR = "state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _partial(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.partial"


def _begin(folder: Path) -> Path:
    temporary = _partial(folder)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    return temporary


def _commit(folder: Path) -> Path:
    """Flush the partial folder to disk, then rename it to `folder` in one step."""
    temporary = _partial(folder)
    _fsync_tree(temporary)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    return folder


def _write_model(student: LoadedModel, folder: Path, weights: dict | None = None) -> None:
    """The student's weights in Hugging Face format, and its tokenizer. weights: the full state dict of
    a sharded student, gathered by the caller."""
    if weights is not None:  # a tied LM head is written once, under the embeddings' name, as Hugging Face does
        model = student.model
        tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - dict(
            model.named_parameters()
        ).keys()
        weights = {name: value for name, value in weights.items() if name not in tied}  # a copy: it pops entries
        model.save_pretrained(folder, safe_serialization=True, state_dict=weights)
    else:
        student.model.save_pretrained(folder, safe_serialization=True)
    student.tokenizer.save_pretrained(folder)


def save_model(student: LoadedModel, folder: Path, weights: dict | None = None) -> Path:
    """Write the student and its tokenizer to `folder` atomically (safetensors weights). With LoRA the
    folder holds the merged model, loadable by from_pretrained as it is, and the adapters in adapter/.
    Merging changes the model in place: call this when training is over."""
    folder = Path(folder)
    temporary = _begin(folder)
    if student.adapter is None:
        _write_model(student, temporary, weights)
    else:
        student.adapter.save_pretrained(temporary / "adapter", safe_serialization=True)
        student.tokenizer.save_pretrained(temporary / "adapter")
        merged = LoadedModel(student.adapter.merge_and_unload(), student.tokenizer, student.path)
        _write_model(merged, temporary)
    return _commit(folder)


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


def _one_process_quietly(function, *args, **kwargs):
    """DCP without a process group warns that it assumes one process, which is what opd means then."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return function(*args, **kwargs)


def _training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, trainable_only: bool) -> dict:
    """What DCP saves and loads in place: {"model": …} and, given an optimizer, {"optimizer": …}, keyed by
    parameter names, sharded where the model is."""
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    model_state, optimizer_state = get_state_dict(model, optimizer or [], options=options)
    return {"model": model_state, "optimizer": optimizer_state} if optimizer is not None else {"model": model_state}


def save_checkpoint(
    output_dir: Path,
    step: int,
    student: LoadedModel,
    optimizer: torch.optim.Optimizer,
    world: World,
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Every rank calls this. trainer_state: the scheduler, data position and the like, written by rank 0
    beside the DCP state, with every rank's random state added. keep: how many complete checkpoints stay
    (None: all); older ones are deleted only once this one is complete."""
    folder = Path(output_dir) / "checkpoints" / f"step-{step}"
    if world.is_main:
        _begin(folder)
    world.barrier()
    _one_process_quietly(
        dcp.save,
        _training_state(student.model, optimizer, student.adapter is not None),
        checkpoint_id=_partial(folder) / STATE_DIR,
    )
    random_states = world.gather(rng_state())
    world.barrier()  # every rank's shard is written
    if world.is_main:
        write_trainer_state(
            _partial(folder), {**trainer_state, "step": step, "rng": random_states, "world_size": world.size}
        )
        _commit(folder)
        if keep is not None:
            for old in complete_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    world.barrier()
    return folder


def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    torch.save(state, folder / STATE_FILE)


def check_checkpoint(folder: Path) -> None:
    """Before any weight loads: the checkpoint is one this opd can load."""
    if not (Path(folder) / STATE_DIR).is_dir():
        raise ConfigError(f"--resume: {folder} has no {STATE_DIR}/ (written by an older opd); start a new run")


def load_checkpoint(
    folder: Path, student: LoadedModel, optimizer: torch.optim.Optimizer | None, world: World = World()
) -> dict[str, Any]:
    """Load a checkpoint's weights (and optimizer state) into the student in place, resharded to this
    world, restore this rank's random state if the checkpoint has one for it, and return the trainer
    state. Raises ConfigError when the checkpoint does not fit the student."""
    check_checkpoint(folder)
    trainable_only = student.adapter is not None
    state = _training_state(student.model, optimizer, trainable_only)
    try:
        _one_process_quietly(dcp.load, state, checkpoint_id=Path(folder) / STATE_DIR)
    except Exception as exc:  # DCP reports a mismatch (missing keys, shapes) as a long multi-rank error
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--resume: {folder} does not fit the student of this config ({first_line[:300]})") from None
    # Adapters alone: the frozen base weights are the ones missing, by design.
    set_state_dict(
        student.model,
        optimizer or [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
        options=StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only),
    )
    trainer_state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    random_states = trainer_state.get("rng") or []
    if world.rank < len(random_states):
        restore_rng(random_states[world.rank])
    return trainer_state


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint folder (checkpoints/step-N) holds."""
    return int(_STEP_DIR.match(Path(folder).name).group(1))


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints, by step."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    steps = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _STEP_DIR.match(path.name)) and (path / STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(steps)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    return (complete_checkpoints(output_dir) or [None])[-1]
