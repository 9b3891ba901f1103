"""Several processes under torchrun: which rank this is, and the few collectives the loop needs.

Data parallelism: every rank holds the whole student and teacher, samples and scores its own share of
each step's prompts, and the gradients are summed over ranks before the optimizer step. The loss is
normalized by the completion tokens of the whole step (all ranks), so 2 ranks x P prompts give the
update of 1 rank x 2P prompts. One process without torchrun is a world of one, and every collective
here is then the identity.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "World":
        """The world torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK; a world of one without them."""
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        """Join the process group: NCCL on CUDA, gloo on CPU. A rank that dies makes the others' next
        collective fail (and torchrun stop the job) rather than wait for ever."""
        if self.size > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend, timeout=datetime.timedelta(minutes=10), device_id=device if device.type == "cuda" else None
            )

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def _device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )

    def sum(self, value: float) -> float:
        """The sum over ranks of a number, in float64."""
        if self.size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(total)
        return float(total)

    def max(self, value: float) -> float:
        if self.size == 1:
            return value
        largest = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return float(largest)

    def sum_tensor(self, values: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return values
        total = values.to(self._device(), torch.float64)
        dist.all_reduce(total)
        return total.to(values.device, values.dtype)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order."""
        if self.size == 1:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def sum_gradients(self, parameters) -> None:
        """Sum each parameter's gradient over ranks, in one flat buffer (one collective per step)."""
        if self.size == 1:
            return
        parameters = [parameter for parameter in parameters if parameter.requires_grad]
        for parameter in parameters:  # a rank whose tokens missed a parameter still sends its zeros
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        gradients = [parameter.grad for parameter in parameters]
        flat = torch.cat([gradient.reshape(-1) for gradient in gradients])
        dist.all_reduce(flat)
        offset = 0
        for gradient in gradients:
            gradient.copy_(flat[offset : offset + gradient.numel()].view_as(gradient))
            offset += gradient.numel()
