"""A run's student as one plain Hugging Face folder: final/ of a sharded LoRA run, and `opd export`
of any checkpoint (DCP, any world size) into a folder that `from_pretrained` and vLLM load as is."""

from __future__ import annotations

from pathlib import Path

import torch

from opd.config.files import load_config
from opd.config.schema import Config
from opd.config.sections import StudentConfig
from opd.errors import ConfigError
from opd.io.checkpoint import load_checkpoint, save_model
from opd.models.loading import LoadedModel, load_model
from opd.models.lora import add_adapters


def plain_student(student: StudentConfig) -> LoadedModel:
    """The run's initial student in this process, on the CPU, in fp32: the weights of student.path, with
    new LoRA adapters where the run trains adapters."""
    loaded = load_model(student.path, "student.path", torch.device("cpu"), student.trust_remote_code)
    return add_adapters(loaded, student.lora) if student.lora is not None else loaded


def save_with_adapters(student: StudentConfig, adapters: dict[str, torch.Tensor], folder: Path) -> Path:
    """final/ of a sharded LoRA student: its gathered adapters put on a plain copy, merged and written."""
    copy = plain_student(student)
    unexpected = copy.model.load_state_dict(adapters, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"adapter weights the plain student lacks: {unexpected[:3]}")
    return save_model(copy, folder)


def export_checkpoint(checkpoint: Path, output: Path) -> Path:
    """checkpoints/step-N of a run -> a Hugging Face folder (with LoRA: merged, and adapter/ beside)."""
    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"{output}: already exists and is not an empty folder; choose another")
    config_path = checkpoint.parent.parent / "config.yaml"
    if not (checkpoint / "trainer_state.pt").is_file() or not config_path.is_file():
        raise ConfigError(
            f"{checkpoint}: not a complete checkpoint of an opd run (expected RUN/checkpoints/step-N "
            "with RUN/config.yaml)"
        )
    config: Config = load_config(config_path)
    student = plain_student(config.student)  # a relative student.path is read from where the run was launched
    load_checkpoint(checkpoint, student, optimizer=None)
    return save_model(student, output)
