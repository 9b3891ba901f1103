"""Models sharded with FSDP2 under torchrun: the student (`student.shard`), the teacher (`teacher.shard`).

Units: every decoder layer (the model's `_no_split_modules` classes), and the root, which keeps the
rest: input embeddings, final norm and LM head, tied to the embeddings or not. opd calls the body and
the LM head itself (hidden states of completion positions only, logits chunk by chunk), so a sharded
model's loss or scoring runs inside the root's forward (`through_root`): the root's hooks gather its
parameters for the whole computation, each layer's hooks gather that layer, and in backward FSDP2
gathers again and reduce-scatters the gradients. Every rank must call a sharded model equally often.

FSDP2 averages gradients over ranks; the update divides the loss by the tokens of every rank, so it
multiplies each rank's loss by the world size (gloo has no pre-multiplied sum for
`set_gradient_divide_factor`). Sampling keeps every unit gathered from the first decoding step to the
last (`gathered_for_sampling`), so ranks that stop decoding at different steps don't wait on each
other, and reshards after.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

Result = TypeVar("Result")
_ROOT_CALL = "opd_root_call"


def layer_classes(model: torch.nn.Module) -> set[str]:
    return set(getattr(model, "_no_split_modules", None) or [])


def shard_model(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype | None = None) -> None:
    """fully_shard the units above, in place, every one resharding after its forward (set on the root
    too: left unset, a root's parameters stay gathered after a forward without gradients).
    compute_dtype: bf16 compute on fp32 master weights, with gradients reduced in fp32; None computes in
    the weights' own dtype (a bf16 teacher, or fp32). The mesh is on `device`'s type (a CPU run on a
    machine with GPUs stays on the CPU)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if compute_dtype
        else MixedPrecisionPolicy()
    )
    classes = layer_classes(model)
    for module in model.modules():
        if type(module).__name__ in classes:
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    model.opd_root_call = types.MethodType(lambda self, function: function(), model)
    register_fsdp_forward_method(model, _ROOT_CALL)


def through_root(model: torch.nn.Module, function: Callable[[], Result]) -> Result:
    """function() inside the root's forward of a sharded model, so its hooks gather the embeddings, final
    norm and LM head for it (and, where the result needs gradients, for its backward); plainly otherwise."""
    return getattr(model, _ROOT_CALL)(function) if is_sharded(model) else function()


def units(model: torch.nn.Module) -> list[FSDPModule]:
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def is_sharded(model: torch.nn.Module | None) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def gathered_for_sampling(model: torch.nn.Module):
    """Keep every unit's parameters gathered after its forward while sampling (one all-gather per unit
    per sampling call, not per token), and reshard them after."""
    if not is_sharded(model):
        yield
        return
    sharded = units(model)
    for unit in sharded:
        unit.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in sharded:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def full_model_state(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's whole weights on the CPU (a collective: every rank calls it; rank 0 gets them).
    trainable_only: only the parameters that train (a LoRA student's adapters)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)
