"""Teacher scoring: per-token log-probs of exactly the completion tokens of a step.

Two capabilities, so a teacher can live elsewhere:
- `TokenScorer`: ℓᵀ of every completion token (and optionally the teacher's top-k). All that
  `reverse_kl_pg` needs, and all that a teacher behind a server can give.
- `FullDistributionTeacher`: also the teacher's full next-token distribution at every position, for
  forward_kl / reverse_kl / jsd; only a teacher in this process has it.
Each reports its name and the FLOPs its scoring cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from opd.batch import StepBatch
from opd.flops import forward_flops, matmul_parameters
from opd.forward import completion_hidden_states_of, logits_from_hidden
from opd.loading import LoadedModel
from opd.losses import token_logprobs_and_entropy
from opd.precision import Precision
from opd.sharding import through_root


@dataclass
class TeacherScores:
    """logprobs: (B, T) ℓᵀ of the completion tokens, 0 outside the completion mask; entropy: (B, T) of
    the teacher's distribution there, where the whole distribution is at hand.
    hidden: (B, T, H) final hidden states, kept only when a full-vocabulary loss asks for them.
    topk_ids, topk_logprobs: (B, T, K), where a scorer gives the teacher's top-k.
    chunk_index: (B, T) for a teacher of another tokenizer: each token's chunk (see opd.alignment); its
    logprobs are then each chunk's Σ ℓᵀ at the chunk's last token."""

    logprobs: torch.Tensor
    hidden: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None  # (B, T), where the whole distribution is at hand
    chunk_index: torch.Tensor | None = None

    def attach(self, batch: StepBatch) -> StepBatch:
        return batch.replace(teacher_logprobs=self.logprobs, teacher_hidden=self.hidden,
                             teacher_topk_ids=self.topk_ids, teacher_topk_logprobs=self.topk_logprobs,
                             teacher_entropy=self.entropy, chunk_index=self.chunk_index)


@runtime_checkable
class TokenScorer(Protocol):
    name: str

    def score(self, batch: StepBatch) -> TeacherScores: ...

    def scoring_flops(self, batch: StepBatch) -> float: ...


@runtime_checkable
class FullDistributionTeacher(TokenScorer, Protocol):
    def score(self, batch: StepBatch, keep_hidden: bool = False) -> TeacherScores: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) logits at the teacher's temperature."""
        ...


class LocalTeacher:
    """A Hugging Face model in this process, run without gradients: a FullDistributionTeacher.

    One forward over (prompt, completion), each prompt encoded once for all its samples, yields
    hidden states of the completion positions only; the LM head then runs over chunks of
    `chunk_size` completion tokens (padding skipped), so the teacher's [B x T x V] logits never exist
    at once.
    """

    def __init__(self, loaded: LoadedModel, temperature: float, chunk_size: int, precision: Precision, top_k: int = 0):
        """top_k: also give the teacher's top-k log-probs at every completion position."""
        self.loaded = loaded
        self.top_k = top_k
        self.name = loaded.source
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.precision = precision
        loaded.model.eval()
        loaded.model.requires_grad_(False)
        self._matmul_parameters = matmul_parameters(loaded.model)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def scoring_flops(self, batch: StepBatch) -> float:
        return forward_flops(self._matmul_parameters, batch)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            raw = logits_from_hidden(self.loaded.model, hidden, self.loaded.vocab_size)
        return raw.float() / self.temperature

    @torch.no_grad()
    def score(self, batch: StepBatch, keep_hidden: bool = False) -> TeacherScores:
        # A sharded teacher (teacher.shard) runs all of it inside its root's forward, which gathers its LM head.
        return through_root(self.loaded.model, lambda: self._score(batch, keep_hidden))

    def _score(self, batch: StepBatch, keep_hidden: bool) -> TeacherScores:
        with self.precision.autocast():
            hidden = completion_hidden_states_of(self.loaded.model, batch.prompt_ids, batch.prompt_mask,
                                                 batch.completion_ids, batch.completion_mask,
                                                 batch.prompt_index)  # (B, T, H)
        flat_hidden, flat_tokens = hidden.flatten(0, 1), batch.completion_ids.flatten()
        flat_logprobs = torch.zeros(flat_tokens.shape, device=hidden.device)  # (B*T,)
        flat_entropy = torch.zeros(flat_tokens.shape, device=hidden.device)  # (B*T,)
        k = self.top_k
        flat_topk_ids = torch.zeros(*flat_tokens.shape, k, dtype=torch.long, device=hidden.device)  # (B*T, K)
        flat_topk_logprobs = torch.zeros(*flat_tokens.shape, k, device=hidden.device)  # (B*T, K)
        for chunk in batch.token_chunks(self.chunk_size):  # (c,) flat indices
            logits = self.logits(flat_hidden[chunk])  # (c, V)
            flat_logprobs[chunk], flat_entropy[chunk] = token_logprobs_and_entropy(logits, flat_tokens[chunk])
            if k:
                flat_topk_logprobs[chunk], flat_topk_ids[chunk] = logits.log_softmax(-1).topk(k, dim=-1)
        shape = batch.completion_ids.shape
        topk = (flat_topk_ids.view(*shape, k), flat_topk_logprobs.view(*shape, k)) if k else (None, None)
        return TeacherScores(logprobs=flat_logprobs.view(shape), hidden=hidden if keep_hidden else None,
                             entropy=flat_entropy.view(shape),  # (B, T) each, 0 outside the mask
                             topk_ids=topk[0], topk_logprobs=topk[1])  # (B, T, K) each
