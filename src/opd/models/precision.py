"""Where and in what precision the models run: the device, bf16 autocast, and the sampler's weight copy.

Resolved once per command (`Precision.resolve`) and handed to every sampler, teacher and update, so
`opd train`, `opd sft`, `opd eval` and the demo make the same choices.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from opd.errors import ConfigError


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """cpu, or under torchrun this process's own GPU (LOCAL_RANK)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' was asked for but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"run.device: local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(choice)


def resolve_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (fp32 master weights) where the hardware does bf16 fast, else None (fp32)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if precision == "bf16" and not supported:
        raise ConfigError(f"run.precision: bf16 is not supported on this {device.type} device")
    return torch.bfloat16 if supported else None


@dataclass(frozen=True)
class Precision:
    """device, and autocast_dtype: bf16 for autocast with fp32 master weights, or None for plain fp32."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def resolve(cls, precision: str = "auto", device: str = "auto", local_rank: int = 0) -> "Precision":
        resolved = resolve_device(device, local_rank)
        return cls(resolved, resolve_autocast(precision, resolved))

    @property
    def frozen_weights_dtype(self) -> torch.dtype:
        """Weights of a model without an optimizer (the teacher): bf16 under bf16, since memory is
        all that fp32 copies would buy it."""
        return self.autocast_dtype or torch.float32

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        )


class LowPrecisionCopy:
    """A bf16 copy of an fp32 model's weights for sampling, refreshed from the master weights on every
    `current()`: casting each weight once per sampling call is cheaper than autocast casting it at
    every decoding step. Buffers (RoPE frequencies) stay fp32."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self._copy: torch.nn.Module | None = None

    @torch.no_grad()
    def current(self) -> torch.nn.Module:
        if self._copy is None:
            self._copy = copy.deepcopy(self.model).requires_grad_(False)
            for parameter in self._copy.parameters():
                parameter.data = parameter.data.to(self.dtype)
        for target, source in zip(self._copy.parameters(), self.model.parameters()):
            target.copy_(source)
        return self._copy
