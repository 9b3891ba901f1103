"""opd's side inside vLLM: a weight-transfer backend over torch's gloo, and the in-place reload details
that every way of handing vLLM the student's weights shares.

`register` is a vLLM general plugin (the `vllm.general_plugins` entry point in opd's pyproject): every
vLLM process where opd is installed runs it, so `vllm serve --weight-transfer-config
'{"backend": "gloo"}'` (what `opd serve-student` passes on a machine without a GPU) finds the backend.
It only names the class: the module is imported when a server asks for the backend.

Why gloo beside vLLM's own `nccl`: NCCL needs GPUs on both sides. Gloo moves the same tensors over TCP
between any two processes, so on a CPU the rollout servers take their weights through the very
protocol they use on GPUs (init, start, update, finish), and the tests exercise it for real. It is
also the way to feed a server whose devices share no NCCL fabric with the trainer, at TCP's speed.

The wire, per `update_weights` call: the trainer posts the names, dtypes and shapes of one unit of
the model (a decoder layer, or the embeddings and head) and broadcasts those tensors from its rank 0,
in that order, over the group set up at init; each server worker receives them into fresh tensors
and loads them through the model's own `load_weights`, inside vLLM's layerwise reload.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from opd.rollout.weight_transfer import GLOO_BACKEND, gloo_broadcast, gloo_group


def register() -> None:
    """The vLLM plugin: registers the gloo weight-transfer backend. vLLM may call this more than once in
    a process."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if GLOO_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(GLOO_BACKEND, __name__, "GlooWeightTransferEngine")


def shared_weight_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers whose weight another layer also holds (a tied LM head beside its embedding), but the
    first. vLLM's reload processes a shared weight again through one of its layers only; on a CPU the
    others keep a packed copy of the old weights, so the caller processes them again after a reload."""
    sharers: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight, method = getattr(module, "weight", None), getattr(module, "quant_method", None)
        if isinstance(weight, torch.nn.Parameter) and method is not None:
            sharers.setdefault(id(weight), []).append(module)
    return [module for modules in sharers.values() if len(modules) > 1 for module in modules[1:]]


class ExpectedReloadWarnings(logging.Filter):
    """Drops vLLM's "<layer>: Failed to load weights" for the layers that never receive a tensor of their
    own on a reload, and are right to: a tied LM head (its weight is the embedding's, loaded through the
    embedding and processed again by the caller) and the rotary embedding (its cos/sin cache is computed,
    never in a checkpoint). Any other layer, an untied head included, still warns. The sync tests compare
    the engine's log-probs with the student's after each reload."""

    LOGGER = "vllm.model_executor.model_loader.reload.layerwise"

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        layers = ("RotaryEmbedding", "ParallelLMHead") if shared_weight_modules(model) else ("RotaryEmbedding",)
        self.messages = {f"{layer}: Failed to load weights" for layer in layers}

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.messages

    def __enter__(self) -> ExpectedReloadWarnings:
        logging.getLogger(self.LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(self.LOGGER).removeFilter(self)


def reprocess_shared_weights(model: torch.nn.Module) -> None:
    for module in shared_weight_modules(model):
        module.quant_method.process_weights_after_loading(module)


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """master_address:master_port: the TCPStore the trainer hosts; this server's workers are ranks
    rank_offset.. of world_size (the trainer's sender is rank 0)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 600.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError("names, dtype_names and shapes must be of one length")
        for dtype in self.dtype_names:
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"dtype_names: {dtype!r} is not a torch dtype")


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """vLLM's worker side of the gloo backend (see the module's docstring)."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.warnings: ExpectedReloadWarnings | None = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        parallel = self.parallel_config  # this worker's rank among every data-parallel replica's workers
        rank = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.shutdown()  # a trainer that reconnects (after its own restart) replaces the old group
        self.group = gloo_group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
        )

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.warnings = ExpectedReloadWarnings(self.model).__enter__()
        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: init_weight_transfer_engine was not called")
        try:
            for name, dtype, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
                tensor = torch.empty(shape, dtype=getattr(torch, dtype))
                gloo_broadcast(self.group, tensor)
                self.model.load_weights([(name, tensor.to(self.device))])
        except BaseException:
            self._abandon_update()
            raise

    def _abandon_update(self) -> None:
        """After a failed update (weights of another model, a trainer gone): every layer not yet reloaded
        gets its tensors back and leaves vLLM's reload, so the server keeps serving and the next update
        starts clean (else the next one would finish with this one's tensors). The trainer counts the
        server's weights as unknown and sends them all again."""
        from vllm.model_executor.model_loader.reload import layerwise

        for layer in self.model.modules():
            info = layerwise.get_layerwise_info(layer)
            if info.can_load():
                if info.kernel_tensors is not None:
                    layerwise._place_kernel_tensors(layer, info)
                info.reset()
        layerwise.LOADING_LAYERS.clear()
        if self.warnings is not None:
            self.warnings.__exit__(None, None, None)
            self.warnings = None

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        try:
            finalize_layerwise_reload(self.model, self.model_config)
            reprocess_shared_weights(self.model)
        finally:
            if self.warnings is not None:
                self.warnings.__exit__(None, None, None)
                self.warnings = None

    def shutdown(self) -> None:
        self.group = None  # gloo closes its connections when the group goes
