"""The student sharded with FSDP2 (`student.shard: true` under torchrun).

Units: every decoder layer (the model's `_no_split_modules` classes), the body without its layers (input
embeddings and final norm: opd calls the body, `model.base_model`, for hidden states), the LM head
when it is not tied (opd calls it as a module, chunk by chunk), and the root. Each of those is called
through its own forward, so its hooks gather its parameters, and after backward reduce-scatter its
gradients. FSDP2 averages gradients over ranks, and the loss is already divided by the tokens of every
rank, so the update multiplies each rank's loss by the world size (gloo has no pre-multiplied sum for
`set_gradient_divide_factor`).

Every rank must call each unit equally often: the update pads its LM-head chunks to the largest count
over ranks. Sampling keeps every unit gathered from the first decoding step to the last
(`gathered_for_sampling`), so ranks that stop decoding at different steps don't wait on each other,
and reshards after.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from opd.errors import ConfigError


def check_shardable(path: str, trust_remote_code: bool = False) -> None:
    """Before weights load: a student whose LM head shares its input embeddings can't be sharded yet.
    Its chunked LM head would need the shared unit's gathered weight after that unit's backward hook
    has run (measured: a crash); such students train replicated."""
    from transformers import AutoConfig

    if getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "tie_word_embeddings", False):
        raise ConfigError(f"student.shard: {path} ties its LM head to its input embeddings, which opd cannot shard "
                          "yet; set student.shard: false (the student is then replicated on every rank)")


def shard_student(model: torch.nn.Module, autocast_dtype: torch.dtype | None) -> None:
    """fully_shard the units above, in place; bf16 compute with fp32 master weights and fp32 gradient
    reduction under bf16."""
    policy = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32) if autocast_dtype \
        else MixedPrecisionPolicy()
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mp_policy=policy)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    if tied:
        raise ConfigError("student.shard: this student ties its LM head to its input embeddings, which opd "
                          "cannot shard yet; set student.shard: false")
    fully_shard(model.base_model, mp_policy=policy)
    if head is not None:
        fully_shard(head, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)


def units(model: torch.nn.Module) -> list[FSDPModule]:
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
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


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, gathered on every rank's call (a collective); rank 0 gets them."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state keyed by parameter names (not positions), sharded or not, so that a
    checkpoint from any world size and either layout loads into any other."""
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A whole optimizer state into this optimizer; a sharded one keeps its shard of it."""
    if all(isinstance(key, int) for key in state.get("state", {})):  # torch's own positional format
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
