"""Sampling: the student turns a batch of prompts into Rollouts.

One batched call samples every rollout of a step (prompts x samples) with a KV cache. Each sampled
token's log-probability ℓˢ is recorded under exactly the distribution that drew it (temperature,
top-k, top-p: `losses.process_logits`), so nothing needs recomputing before the loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from collections.abc import Iterator
from typing import Protocol

import torch

from opd.data import PromptSet
from opd.decoding import HFDecoder, LeanDecoder, make_decoder
from opd.errors import DataError, TrainingDiverged
from opd.losses import process_logits
from opd.models import LoadedModel


@dataclass
class Rollouts:
    """A batch of sampled completions. B rollouts, P prompt columns, T completion columns.

    prompt_ids:        (B, P) left-padded prompts.
    prompt_mask:       (B, P) 1 on real prompt tokens.
    completion_ids:    (B, T) sampled tokens; pad after EOS.
    completion_mask:   (B, T) 1 on sampled tokens up to and including EOS, 0 after it.
    sampler_logprobs:  (B, T) ℓˢ under the sampling distribution; 0 where the mask is 0.
    finished:          (B,) True where the completion ended with EOS.
    prompt_index:      (B,) index of each rollout's prompt in the batch of prompts.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    finished: torch.Tensor
    prompt_index: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (B, P + T)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # (B, P + T)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def token_chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Flat row-major indices into (B, T) of the completion tokens inside the mask, `size` at a
        time: full-vocabulary work runs on these only, never on padding or past EOS."""
        index = self.completion_mask.flatten().nonzero().squeeze(-1)  # (n,)
        return (index[start : start + size] for start in range(0, index.numel(), size))

    def select(self, rows: slice) -> "Rollouts":
        """A micro-batch of rows, trimmed to the columns it uses."""
        part = Rollouts(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})
        return part.trimmed()

    def trimmed(self) -> "Rollouts":
        """Drop prompt columns that are padding in every row and completion columns past every EOS."""
        first_prompt_col = int((self.prompt_mask.sum(0) > 0).nonzero().min()) if self.prompt_mask.any() else 0
        used = self.completion_mask.sum(0).nonzero()
        last_col = int(used.max()) + 1 if len(used) else 1
        return Rollouts(
            prompt_ids=self.prompt_ids[:, first_prompt_col:],
            prompt_mask=self.prompt_mask[:, first_prompt_col:],
            completion_ids=self.completion_ids[:, :last_col],
            completion_mask=self.completion_mask[:, :last_col],
            sampler_logprobs=self.sampler_logprobs[:, :last_col],
            finished=self.finished,
            prompt_index=self.prompt_index,
        )


class Sampler(Protocol):
    def sample(self, prompts: list[list[int]], samples_per_prompt: int, generator: torch.Generator) -> Rollouts: ...


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), each (B, P_max), padded on the left so completions line up."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), each (B, T_max), padded on the right, as completions are."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def draw(logits: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of softmax(logits) (B, V) by inverse-CDF sampling with one uniform number per
    row; returns the tokens (B,) and their log-probabilities (B,).

    torch.multinomial draws an exponential number per vocabulary entry, which on a CPU costs more than
    the rest of a small model's decoding step. The CDF is summed in float64 so that even tiny
    probabilities keep their share of it; -inf logits have probability 0 and are never drawn.
    """
    shifted = logits - logits.amax(-1, keepdim=True)  # (B, V), the largest is 0
    weights = shifted.exp()  # (B, V) unnormalized probabilities
    cdf = weights.double().cumsum(-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    target = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device, dtype=torch.float64) * total
    tokens = torch.searchsorted(cdf, target, right=True).clamp(max=logits.shape[-1] - 1)  # (B, 1)
    no_mass = weights.gather(-1, tokens) == 0  # (B, 1)
    if bool(no_mass.any()):  # rounding put the target at the very top: the last token with mass then
        last_with_mass = logits.shape[-1] - 1 - (weights.flip(-1) > 0).int().argmax(-1, keepdim=True)
        tokens = torch.where(no_mass, last_with_mass, tokens)
    logprobs = shifted.gather(-1, tokens) - total.log().to(shifted.dtype)  # (B, 1)
    return tokens.squeeze(-1), logprobs.squeeze(-1)


class HFSampler:
    """Samples with a Hugging Face causal LM and its KV cache, recording ℓˢ as it goes.

    Decoding goes through `opd.decoding` (a lean step for Llama-style models, checked against the
    model's own forward; Hugging Face's forward otherwise). Each prompt is encoded once and its
    KV-cache rows are shared by its samples. Under bf16 on a GPU an fp32 model samples from a bf16
    copy of its weights, refreshed from the master weights at every call: casting every weight once
    per call is cheaper than autocast casting it at every decoding step.
    """

    def __init__(
        self,
        student: LoadedModel,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        autocast_dtype: torch.dtype | None = None,
        low_precision_copy: bool | None = None,
    ):
        """low_precision_copy: sample from an autocast_dtype copy of fp32 weights; None = on GPUs only.
        On a CPU, decoding at sampling widths is bound by overheads rather than matrix products: the
        copy gave no consistent gain there (benchmarks/speed_choices.py), and fp32 keeps ℓˢ exact."""
        self.student = student
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.autocast_dtype = autocast_dtype
        self.use_copy = low_precision_copy
        self._low_precision_copy: torch.nn.Module | None = None
        self._decoder: LeanDecoder | HFDecoder | None = None

    def _sampling_model(self) -> torch.nn.Module:
        """The model to sample with: the model itself, or its bf16 copy with the current weights."""
        model = self.student.model
        first = next(model.parameters())
        wanted = self.use_copy if self.use_copy is not None else first.device.type == "cuda"
        if not wanted or self.autocast_dtype is None or first.dtype == self.autocast_dtype:
            return model
        if self._low_precision_copy is None:
            self._low_precision_copy = copy.deepcopy(model).requires_grad_(False)
            for parameter in self._low_precision_copy.parameters():  # buffers (e.g. RoPE frequencies) stay fp32
                parameter.data = parameter.data.to(self.autocast_dtype)
        for target, source in zip(self._low_precision_copy.parameters(), model.parameters()):
            target.copy_(source)
        return self._low_precision_copy

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], samples_per_prompt: int, generator: torch.Generator) -> Rollouts:
        model, tokenizer = self._sampling_model(), self.student.tokenizer
        if self._decoder is None or self._decoder.model is not model:
            self._decoder = make_decoder(model)
        device = next(model.parameters()).device
        pad_id = tokenizer.pad_token_id
        unique_ids, unique_mask = left_pad(prompts, pad_id, device)  # (n, P)
        vocab = self.student.vocab_size
        # Each prompt is encoded once; its samples share the KV-cache rows it produced.
        logits = self._decoder.start(unique_ids, unique_mask, samples_per_prompt, self.max_new_tokens)[:, :vocab]
        prompt_ids = unique_ids.repeat_interleave(samples_per_prompt, 0)  # (B, P)
        prompt_mask = unique_mask.repeat_interleave(samples_per_prompt, 0)  # (B, P)
        batch = prompt_ids.shape[0]
        stop_ids = torch.tensor(self.student.stop_token_ids, device=device)

        tokens = torch.full((batch, self.max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, T)
        logprobs = torch.zeros((batch, self.max_new_tokens), device=device)  # (B, T)
        live = torch.zeros((batch, self.max_new_tokens), dtype=torch.long, device=device)  # (B, T)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
        for t in range(self.max_new_tokens):
            logits = process_logits(logits, self.temperature, self.top_k, self.top_p)  # (B, V)
            next_token, next_logprob = draw(logits, generator)  # (B,), (B,)
            if not bool(torch.isfinite(next_logprob).all()):  # NaN or +inf logits make the whole row NaN
                raise TrainingDiverged("the student's logits are not finite while sampling")
            live[:, t] = (~finished).long()
            tokens[:, t] = torch.where(finished, pad_id, next_token)
            logprobs[:, t] = torch.where(finished, 0.0, next_logprob)
            finished |= torch.isin(next_token, stop_ids)
            if bool(finished.all()) or t == self.max_new_tokens - 1:
                break
            logits = self._decoder.step(tokens[:, t : t + 1])[:, :vocab]
        self._decoder.release()
        return Rollouts(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=tokens,
            completion_mask=live,
            sampler_logprobs=logprobs,
            finished=finished,
            prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(samples_per_prompt),
        ).trimmed()


class ReferenceSampler:
    """Rollouts whose completions are the data set's reference answers (for `opd sft`).

    Each prompt's answer is looked up by its token ids, tokenized, cut to max_new_tokens and closed
    with EOS. sampler_logprobs are 0: no model drew these tokens.
    """

    def __init__(self, prompts: PromptSet, tokenizer, max_new_tokens: int, device: torch.device):
        self.max_new_tokens, self.device, self.pad_id = max_new_tokens, device, tokenizer.pad_token_id
        self.answers: dict[tuple[int, ...], list[int]] = {}
        for token_ids, answer in zip(prompts.token_ids, prompts.answers):
            if answer is None:
                raise DataError(f"{prompts.source}: rollout.source=dataset needs an 'answer' on every row")
            # A plain-text prompt ends in "Answer:"; the answer then starts after a space.
            text = answer if answer[:1].isspace() or getattr(tokenizer, "chat_template", None) else " " + answer
            self.answers[tuple(token_ids)] = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def sample(self, prompts: list[list[int]], samples_per_prompt: int, generator: torch.Generator) -> Rollouts:
        answers = [self.answers[tuple(prompt)][: self.max_new_tokens] for prompt in prompts for _ in range(samples_per_prompt)]
        full = [len(self.answers[tuple(prompt)]) <= self.max_new_tokens for prompt in prompts for _ in range(samples_per_prompt)]
        prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(samples_per_prompt)], self.pad_id, self.device)
        completion_ids, completion_mask = right_pad(answers, self.pad_id, self.device)  # (B, T) each
        return Rollouts(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
            completion_mask=completion_mask, sampler_logprobs=torch.zeros(completion_ids.shape, device=self.device),
            finished=torch.tensor(full, device=self.device),
            prompt_index=torch.arange(len(prompts), device=self.device).repeat_interleave(samples_per_prompt),
        )
