"""Sampling: a model turns a batch of prompts into a StepBatch of completions.

`Sampler` is what writes a step's completions (the student's engine, the teacher, the data's answers),
and `RolloutEngine` what `rollout.engine` names: how to check, build and plan the memory of the
student's sampler (opd.rollout.engines registers them). `ModelSampler` is opd's own engine: one batched
call samples every rollout of a step (prompts x samples) with a KV cache, and each sampled token's
log-probability is recorded under exactly the distribution that drew it (temperature, top-k, top-p:
`opd.ops.logprobs.process_logits`), so nothing needs recomputing before the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from opd.config.schema import Config
from opd.config.sections import RolloutConfig
from opd.data.prompts import PromptBatch
from opd.distributed.sharding import gathered_for_sampling, is_sharded
from opd.errors import TrainingDiverged
from opd.models.loading import LoadedModel
from opd.models.precision import LowPrecisionCopy, Precision
from opd.models.shapes import ModelShape
from opd.ops.batch import STUDENT, StepBatch, left_pad
from opd.ops.flops import forward_flops, matmul_parameters
from opd.ops.logprobs import process_logits
from opd.rollout.decoding import HFDecoder, LeanDecoder, make_decoder

# A sampler's callback for prompts whose samples have all stopped: (their rows in the batch the call will
# return, a StepBatch of just those rows). Each row is handed over once; the whole batch is returned as usual.
GroupsDone = Callable[[list[int], StepBatch], None]


class Sampler(Protocol):
    """Writes a step's completions: `samples_per_prompt` rows per prompt, in prompt order.

    source: what its rows are marked as (STUDENT, TEACHER or DATASET).
    gives_entropy: its batches carry `sampler_entropy`, the exact entropy of the distribution each token
    was drawn from; where False they carry None and the update computes it from the student's logits
    (a run's ranks all agree on it, as it is the sampler's, not the batch's).
    """

    source: int
    gives_entropy: bool

    def sample(self, prompts: PromptBatch, samples_per_prompt: int, seed: int) -> StepBatch: ...

    def sampling_flops(self, batch: StepBatch) -> float: ...

    def sync_weights(self, version: int) -> float | None:
        """Bring the engine's copy of the policy up to its current weights, `version` (the optimizer steps
        they hold), before a rollout (under torchrun every rank calls it together). Returns the seconds
        it took, or None where the sampler reads the policy's weights directly and has nothing to sync."""
        ...

    def close(self) -> None:
        """Release what the sampler holds beyond the policy (an engine); called once, at the run's end."""
        ...


@dataclass(frozen=True)
class EngineMemoryInputs:
    """What a rollout engine's lines of the memory plan (opd.train.memory) depend on, per rank."""

    config: Config
    student: ModelShape
    device: str  # "cuda" or "cpu"
    rows: int  # the rank's rollouts of a step
    sequence: int  # prompt + completion tokens of a rollout at most
    bf16_on_gpu: bool  # the run computes in bf16 on a GPU
    compute_bytes: int  # 2 under bf16, else 4
    sharded: bool  # the student is sharded with FSDP2
    device_memory: float | None  # bytes of the device (host memory on a CPU), where known


@dataclass(frozen=True)
class EngineMemory:
    resident: dict[str, float]  # bytes held for the whole run
    sampling: dict[str, float]  # bytes added while sampling
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RolloutEngine:
    """A value of `rollout.engine`: what samples the student's training rollouts.

    check: before any weight loads (installed, implements the student's architecture); ConfigError else.
    build: the Sampler, over the student that trains (its weights synced before every rollout).
    memory: its lines of the memory plan.
    """

    check: Callable[[Config], None]
    build: Callable[[Config, LoadedModel, Precision], Sampler]
    memory: Callable[[EngineMemoryInputs], EngineMemory]


def completions_batch(
    prompts: PromptBatch,
    samples_per_prompt: int,
    pad_id: int,
    tokens: torch.Tensor,
    live: torch.Tensor,
    logprobs: torch.Tensor,
    finished: torch.Tensor,
    source: int,
    entropies: torch.Tensor | None = None,
) -> StepBatch:
    """A sampler's completions as a StepBatch: rows in prompt order, each prompt's samples consecutive,
    its prompt left-padded once and repeated. tokens, live (mask), logprobs, entropies: (B, T) on the
    batch's device; finished: (B,)."""
    device, rows = tokens.device, tokens.shape[0]
    unique_ids, unique_mask = left_pad(prompts.token_ids, pad_id, device)  # (n, P)
    return StepBatch(
        prompt_ids=unique_ids.repeat_interleave(samples_per_prompt, 0),  # (B, P)
        prompt_mask=unique_mask.repeat_interleave(samples_per_prompt, 0),  # (B, P)
        completion_ids=tokens,
        completion_mask=live,
        sampler_logprobs=logprobs,
        finished=finished,
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(samples_per_prompt),
        row_index=torch.tensor(prompts.row_index, device=device).repeat_interleave(samples_per_prompt),
        rows=[row for row in prompts.rows for _ in range(samples_per_prompt)],
        source=torch.full((rows,), source, dtype=torch.long, device=device),
        sampler_entropy=entropies,
    ).trimmed()


def listed_completions_batch(
    prompts: PromptBatch,
    samples_per_prompt: int,
    samples: list[tuple[list[int], list[float]]],
    pad_id: int,
    stop_ids: list[int],
    device: torch.device,
    source: int = STUDENT,
) -> StepBatch:
    """completions_batch from an engine's answers as lists: (token ids, their log-probs) per row, rows in
    prompt order, each prompt's samples consecutive. A row is finished where its last token stops."""
    rows, length = len(samples), max(1, max((len(ids) for ids, _ in samples), default=1))
    tokens = torch.full((rows, length), pad_id, dtype=torch.long)
    logprobs = torch.zeros((rows, length))
    live = torch.zeros((rows, length), dtype=torch.long)
    finished = torch.zeros(rows, dtype=torch.bool)
    stops = set(stop_ids)
    for row, (ids, values) in enumerate(samples):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logprobs[row, : len(ids)] = torch.tensor(values, dtype=torch.float32)
        live[row, : len(ids)] = 1
        finished[row] = bool(ids) and ids[-1] in stops
    return completions_batch(
        prompts, samples_per_prompt, pad_id, tokens.to(device), live.to(device), logprobs.to(device),
        finished.to(device), source,
    )  # fmt: skip


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def of(cls, rollout: RolloutConfig, max_new_tokens: int | None = None) -> SamplingSettings:
        """The config's `rollout` settings (max_new_tokens: another length, e.g. for evaluation)."""
        return cls(max_new_tokens or rollout.max_new_tokens, rollout.temperature, rollout.top_k, rollout.top_p)


def stream_seed(seed: int, key: int) -> int:
    """A 63-bit seed for the random stream of one prompt's samples, from the run's seed and the prompt's key."""
    return (seed * 0x9E3779B97F4A7C15 + (key + 1) * 0xBF58476D1CE4E5B9) % (2**63)


def uniforms(prompts: PromptBatch, samples_per_prompt: int, steps: int, seed: int, device) -> torch.Tensor:
    """(B, steps) float64 uniform numbers, one per row and decoding step, each prompt's rows from its own
    stream (`stream_seed(seed, key)`): the draws do not depend on which prompts share the batch."""
    rows = [
        torch.rand(
            samples_per_prompt,
            steps,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(stream_seed(seed, key)),
        )
        for key in prompts.keys
    ]
    return torch.cat(rows).to(device)


def draw(logits: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row of softmax(logits) (B, V) by inverse-CDF sampling with the row's uniform number
    uniform (B,) in [0, 1); returns the tokens (B,), their log-probabilities (B,) and the distribution's
    entropy (B,).

    torch.multinomial draws an exponential number per vocabulary entry, which on a CPU costs more than
    the rest of a small model's decoding step. The CDF is summed in float64 so that even tiny
    probabilities keep their share of it; -inf logits have probability 0 and are never drawn.
    """
    shifted = logits - logits.amax(-1, keepdim=True)  # (B, V), the largest is 0
    weights = shifted.exp()  # (B, V) unnormalized probabilities
    cdf = weights.double().cumsum(-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    target = uniform.to(torch.float64).view(-1, 1) * total
    tokens = torch.searchsorted(cdf, target, right=True).clamp(max=logits.shape[-1] - 1)  # (B, 1)
    no_mass = weights.gather(-1, tokens) == 0  # (B, 1)
    if bool(no_mass.any()):  # rounding put the target at the very top: the last token with mass then
        last_with_mass = logits.shape[-1] - 1 - (weights.flip(-1) > 0).int().argmax(-1, keepdim=True)
        tokens = torch.where(no_mass, last_with_mass, tokens)
    log_total = total.log().to(shifted.dtype)  # (B, 1)
    logprobs = shifted.gather(-1, tokens) - log_total  # (B, 1)
    # H = log Z - sum_v w_v s_v / Z with w = exp(s); a -inf entry has w = 0 and adds nothing (clamped, not NaN).
    weighted = torch.linalg.vecdot(weights, shifted.clamp(min=torch.finfo(shifted.dtype).min))  # (B,)
    entropy = log_total.squeeze(-1) - weighted / total.squeeze(-1).to(shifted.dtype)
    return tokens.squeeze(-1), logprobs.squeeze(-1), entropy


class ModelSampler:
    """Samples with a Hugging Face causal LM (the student, or for SFT on its samples the teacher) and
    its KV cache, recording each token's log-prob as it goes.

    Decoding goes through `opd.rollout.decoding` (a lean step for Llama-style models, checked against the
    model's own forward; Hugging Face's forward otherwise). Each prompt is encoded once and its
    KV-cache rows are shared by its samples. Under bf16 on a GPU an fp32 model samples from a bf16
    copy of its weights (`precision.LowPrecisionCopy`), refreshed at every call. On a CPU, decoding at
    sampling widths is bound by overheads rather than matrix products: the copy gave no consistent
    gain there (docs/performance.md), and fp32 keeps the recorded log-probs exact.
    """

    gives_entropy = True
    streams = True  # sample() takes on_groups

    def __init__(
        self,
        policy: LoadedModel,
        settings: SamplingSettings,
        precision: Precision,
        low_precision_copy: bool | None = None,
        source: int = STUDENT,
        extra_stop_ids: tuple[int, ...] = (),
    ):
        """low_precision_copy: sample from a bf16 copy of fp32 weights; None = on GPUs only.
        source: what the rows are marked as (STUDENT, or TEACHER when the teacher samples).
        extra_stop_ids: tokens that end a sample besides the model's own stop tokens."""
        self.policy = policy
        self.source = source
        self.stop_ids = sorted({*policy.stop_token_ids, *extra_stop_ids})
        self.settings = settings
        first = next(policy.model.parameters())
        wanted = low_precision_copy if low_precision_copy is not None else first.device.type == "cuda"
        # A sharded student samples in bf16 through FSDP2's own param_dtype (and cannot be copied).
        use_copy = (
            wanted
            and precision.autocast_dtype is not None
            and first.dtype != precision.autocast_dtype
            and not is_sharded(policy.model)
        )
        self._copy = LowPrecisionCopy(policy.model, precision.autocast_dtype) if use_copy else None
        self._decoder: LeanDecoder | HFDecoder | None = None
        self._matmul_parameters = matmul_parameters(policy.model)

    def sampling_flops(self, batch: StepBatch) -> float:
        return forward_flops(self._matmul_parameters, batch)

    def sync_weights(self, version: int) -> None:
        """Nothing to sync: it samples the policy itself (its bf16 copy is refreshed at every call)."""
        return None

    def close(self) -> None:
        return None

    @property
    def samples_together(self) -> bool:
        """Sampling is a collective: a sharded model gathers its units in a call's first forward, so
        every rank must call sample() or join() while any rank samples with it."""
        return is_sharded(self.policy.model)

    @torch.no_grad()
    def join(self) -> None:
        """A sampling call's collectives without prompts of this rank's: one token through the model, so
        the ranks that do sample (a GKD mixture gives some ranks none of a sampler's prompts) proceed."""
        with gathered_for_sampling(self.policy.model):
            device = next(self.policy.model.parameters()).device
            self.policy.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)

    def sampling_model(self) -> torch.nn.Module:
        """The model to sample with: the policy itself, or its low-precision copy with the current weights."""
        return self._copy.current() if self._copy is not None else self.policy.model

    def sample(
        self, prompts: PromptBatch, samples_per_prompt: int, seed: int, on_groups: GroupsDone | None = None
    ) -> StepBatch:
        """seed: the run's sampling seed; with each prompt's key it fixes that prompt's draws. on_groups:
        called with the prompts whose samples have all stopped, as soon as they have (see GroupsDone)."""
        with gathered_for_sampling(self.policy.model):  # a sharded student gathers once per call
            return self._sample(prompts, samples_per_prompt, seed, on_groups)

    @torch.no_grad()
    def _sample(
        self, prompts: PromptBatch, samples_per_prompt: int, seed: int, on_groups: GroupsDone | None = None
    ) -> StepBatch:
        model, tokenizer, settings = self.sampling_model(), self.policy.tokenizer, self.settings
        if self._decoder is None or self._decoder.model is not model:
            self._decoder = make_decoder(model)
        device = next(model.parameters()).device
        pad_id = tokenizer.pad_token_id
        unique_ids, unique_mask = left_pad(prompts.token_ids, pad_id, device)  # (n, P)
        vocab = self.policy.vocab_size
        # Each prompt is encoded once; its samples share the KV-cache rows it produced.
        logits = self._decoder.start(unique_ids, unique_mask, samples_per_prompt, settings.max_new_tokens)[:, :vocab]
        batch = len(prompts) * samples_per_prompt
        stop_ids = torch.tensor(self.stop_ids, device=device)

        tokens = torch.full((batch, settings.max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, T)
        logprobs = torch.zeros((batch, settings.max_new_tokens), device=device)  # (B, T)
        entropies = torch.zeros((batch, settings.max_new_tokens), device=device)  # (B, T)
        live = torch.zeros((batch, settings.max_new_tokens), dtype=torch.long, device=device)  # (B, T)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
        random = uniforms(prompts, samples_per_prompt, settings.max_new_tokens, seed, device)  # (B, T)
        reported = [False] * len(prompts)  # prompts handed to on_groups

        def report(done: list[bool], width: int) -> None:
            groups = [index for index, is_done in enumerate(done) if is_done and not reported[index]]
            if not groups:
                return
            rows = [group * samples_per_prompt + sample for group in groups for sample in range(samples_per_prompt)]
            on_groups(
                rows,
                completions_batch(
                    prompts.pick(groups),
                    samples_per_prompt,
                    pad_id,
                    tokens[rows, :width],
                    live[rows, :width],
                    logprobs[rows, :width],
                    finished[rows],
                    self.source,
                    entropies[rows, :width],
                ),
            )
            for group in groups:
                reported[group] = True

        for t in range(settings.max_new_tokens):
            logits = process_logits(logits, settings.temperature, settings.top_k, settings.top_p)  # (B, V)
            next_token, next_logprob, entropy = draw(logits, random[:, t])  # (B,) each
            if not bool(torch.isfinite(next_logprob).all()):  # NaN or +inf logits make the whole row NaN
                raise TrainingDiverged("the sampling model's logits are not finite")
            live[:, t] = (~finished).long()
            tokens[:, t] = torch.where(finished, pad_id, next_token)
            logprobs[:, t] = torch.where(finished, 0.0, next_logprob)
            entropies[:, t] = torch.where(finished, 0.0, entropy)
            finished |= torch.isin(next_token, stop_ids)
            if bool(finished.all()) or t == settings.max_new_tokens - 1:
                break
            if on_groups is not None:
                report(finished.view(len(prompts), samples_per_prompt).all(1).tolist(), t + 1)
            logits = self._decoder.step(tokens[:, t : t + 1])[:, :vocab]
        self._decoder.release()
        if on_groups is not None:  # the rest: stopped at the last step, or cut at max_new_tokens
            report([True] * len(prompts), settings.max_new_tokens)
        return completions_batch(
            prompts, samples_per_prompt, pad_id, tokens, live, logprobs, finished, self.source, entropies
        )


def _opd_memory(inputs: EngineMemoryInputs) -> EngineMemory:
    """opd's sampler: a bf16 copy of the weights under bf16 on a GPU (a replicated student), the KV cache
    of the rank's rollouts, a decoding step's logits, and a sharded student gathered whole."""
    student, rows, sequence = inputs.student, inputs.rows, inputs.sequence
    resident = {}
    if inputs.bf16_on_gpu and not inputs.sharded:
        resident["student bf16 copy for sampling"] = 2 * student.parameters
    cache_bytes = inputs.compute_bytes if inputs.bf16_on_gpu or inputs.sharded else 4
    sampling = {
        f"KV cache of {rows} rollouts x {sequence} tokens": 2
        * rows
        * sequence
        * student.layers
        * student.kv_width
        * cache_bytes,
        "logits of one decoding step": 3 * rows * student.vocab * 4,
    }
    if inputs.sharded:
        sampling["student gathered for sampling"] = inputs.compute_bytes * student.parameters
    return EngineMemory(resident, sampling)


OPD_ENGINE = RolloutEngine(
    check=lambda config: None,
    build=lambda config, policy, precision: ModelSampler(policy, SamplingSettings.of(config.rollout), precision),
    memory=_opd_memory,
)
