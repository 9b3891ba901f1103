"""The student's weights as an engine loads them: under a plain checkpoint's names, LoRA merged in, and an
FSDP2-sharded student gathered one unit at a time. What every rollout engine that keeps its own copy of
the student (vLLM in this process, rollout servers) streams its weights from."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.distributed.fsdp import FSDPModule

from opd.distributed.sharding import is_sharded


def plain_weights(
    model: torch.nn.Module, keep: Callable[[str], bool] = lambda name: True
) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under a plain checkpoint's names: a LoRA layer's base weight with its
    adapters' delta added (peft's get_delta_weight, so embeddings and fan-in-fan-out layers come out
    right), and no adapter tensors. Tied weights come once (named_parameters drops the repeat).
    keep: which parameters (by their name in `model`) to read; the others are not touched."""
    lora_layers = {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")
    }
    for name, parameter in model.named_parameters():
        if ".lora_" in name or not keep(name):
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        if not owner:
            yield name, parameter.detach()
            continue
        layer = lora_layers[owner]
        weight = parameter.detach()
        if leaf == "weight" and not layer.merged:
            for adapter in layer.active_adapters:
                if adapter in layer.scaling:
                    weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        yield f"{owner}.{leaf}", weight


def engine_weights(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """plain_weights in the engine's dtype, a tensor at a time (engine_weight_units, flattened). A
    collective for an FSDP2-sharded student: every rank consumes it to the end, in the same order."""
    for unit in engine_weight_units(model, dtype):
        yield from unit


def engine_weight_units(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """plain_weights in the engine's dtype, a unit at a time: an FSDP2-sharded student's units (the root's
    embeddings, norm and head first, then each decoder layer), gathered one at a time and resharded
    before the next, so no more than one unit is ever whole beside the shards; an unsharded one's
    decoder layers, and what is outside them (before and after), so a sender holds one layer's
    converted copies at a time. For a sharded student this is a collective: every rank consumes it to
    the end, in the same order. The sharded tensors come as copies, since an engine may hold each until
    its layer is complete, and a reshard frees the gathered memory."""
    if not is_sharded(model):
        unit, unit_key = [], None
        for name, tensor in plain_weights(model):
            key = _layer_of(name)
            if unit and key != unit_key:
                yield unit
                unit = []
            unit_key = key
            unit.append((name, tensor.to(dtype)))
        if unit:
            yield unit
        return
    unit_of = {name: module for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    owner = {  # each parameter's innermost unit ("" is the root), found once for the whole sync
        parameter: max((unit for unit in unit_of if not unit or parameter.startswith(unit + ".")), key=len)
        for parameter, _ in model.named_parameters()
    }
    for unit_name, unit in unit_of.items():  # the root comes first, as FSDP2's lazy initialisation wants
        unit.unshard()
        try:
            yield [
                (name, tensor.to(dtype, copy=True))
                for name, tensor in plain_weights(model, keep=lambda name: owner[name] == unit_name)
            ]
        finally:
            unit.reshard()


def _layer_of(name: str) -> str | None:
    """A parameter's decoder layer ("model.layers.3"): the name up to its first number; None outside."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return None
