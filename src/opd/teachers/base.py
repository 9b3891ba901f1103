"""Teacher scoring: per-token log-probs of exactly the completion tokens of a step.

Two capabilities, so a teacher can live elsewhere:
- `TokenScorer`: ℓᵀ of every completion token (and optionally the teacher's top-k). All that
  `reverse_kl_pg` needs, and all that a teacher behind a server can give.
- `FullDistributionTeacher`: also the teacher's full next-token distribution at every position, for
  forward_kl / reverse_kl / jsd; only a teacher in this process has it.
Each reports its name; its scores carry the FLOPs they cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from opd.ops.batch import StepBatch


@dataclass
class TeacherScores:
    """logprobs: (B, T) ℓᵀ of the completion tokens, 0 outside the completion mask; entropy: (B, T) of
    the teacher's distribution there, where the whole distribution is at hand.
    hidden: (B, T, H) final hidden states, kept only when a full-vocabulary loss asks for them.
    topk_ids, topk_logprobs: (B, T, K), where a scorer gives the teacher's top-k.
    chunk_index: (B, T) for a teacher of another tokenizer: each token's chunk (see opd.teachers.alignment); its
    logprobs are then each chunk's Σ ℓᵀ at the chunk's last token."""

    logprobs: torch.Tensor
    hidden: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None  # (B, T), where the whole distribution is at hand
    chunk_index: torch.Tensor | None = None
    flops: float = 0.0  # what this scoring cost in this process (a server's work is not counted)

    def attach(self, batch: StepBatch) -> StepBatch:
        return batch.replace(
            teacher_logprobs=self.logprobs,
            teacher_hidden=self.hidden,
            teacher_topk_ids=self.topk_ids,
            teacher_topk_logprobs=self.topk_logprobs,
            teacher_entropy=self.entropy,
            chunk_index=self.chunk_index,
        )


def assemble_scores(shape: torch.Size, device, parts: list[tuple[list[int], TeacherScores]]) -> TeacherScores:
    """One (B, T) TeacherScores from the scores of parts of a batch: (the part's rows in the batch, its
    scores), each part as wide as its own longest completion. The teacher's entropy is kept only where
    every part has it; a part without chunks (another tokenizer's) counts each token as its own chunk.
    Hidden states are not assembled: the parts' scorers are servers or routed teachers, which send none."""
    logprobs, entropy = torch.zeros(shape, device=device), None
    topk_ids = topk_logprobs = chunk_index = None
    every_entropy, flops = True, 0.0
    for rows, scores in parts:
        flops += scores.flops
        width = scores.logprobs.shape[1]  # a part is trimmed past its own last EOS
        logprobs[rows, :width] = scores.logprobs.to(device)
        every_entropy &= scores.entropy is not None
        if scores.entropy is not None:
            entropy = torch.zeros_like(logprobs) if entropy is None else entropy
            entropy[rows, :width] = scores.entropy.to(device)
        if scores.chunk_index is not None:
            if chunk_index is None:
                chunk_index = torch.arange(shape[1], device=device).expand(shape).clone()
            chunk_index[rows, :width] = scores.chunk_index.to(device)
        if scores.topk_ids is not None:
            if topk_ids is None:
                k = scores.topk_ids.shape[-1]
                topk_ids = torch.zeros(*shape, k, dtype=torch.long, device=device)
                topk_logprobs = torch.zeros(*shape, k, device=device)
            topk_ids[rows, :width] = scores.topk_ids.to(device)
            topk_logprobs[rows, :width] = scores.topk_logprobs.to(device)
    return TeacherScores(
        logprobs=logprobs,
        entropy=entropy if every_entropy else None,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        chunk_index=chunk_index,
        flops=flops,
    )


@runtime_checkable
class TokenScorer(Protocol):
    name: str

    def score(self, batch: StepBatch, keep_hidden: bool = False) -> TeacherScores:
        """The batch's scores. keep_hidden: also the final hidden states, for a full-vocabulary loss (a
        scorer that can't give them, a server, is never asked: opd.config.capabilities rules that out)."""
        ...


@runtime_checkable
class FullDistributionTeacher(TokenScorer, Protocol):
    hidden_size: int  # H of the hidden states its scores keep, which `logits` reads

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) logits at the teacher's temperature."""
        ...
