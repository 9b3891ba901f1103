"""The batch that carries one step: rollouts, and everything computed about them on the way to the loss.

Shape convention throughout opd: B rows (rollouts), P prompt columns, T completion columns, H hidden
size, V vocabulary entries, K top-k entries, written as `# (B, T)` comments.

Every field declares its layout, and `StepBatch.select` trims each one by its layout, so a micro-batch
is cut in one place and every later reader (the loss, the metrics, the dataset-answer replay) sees
fields of the same rows and columns. A field added later (a teacher's name, its top-k log-probs) only
declares its layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

ROW = {"layout": "row"}  # (B, ...) tensor or a Python list of B items
PROMPT = {"layout": "prompt"}  # (B, P): left-padded prompt columns
COMPLETION = {"layout": "completion"}  # (B, T, ...): completion columns, right-padded


@dataclass
class StepBatch:
    """A step's rollouts. Filled by a sampler; the teacher adds its scores, the objective its advantages.

    prompt_ids:        (B, P) left-padded prompts.
    prompt_mask:       (B, P) 1 on real prompt tokens.
    completion_ids:    (B, T) completion tokens; pad after EOS.
    completion_mask:   (B, T) 1 on completion tokens up to and including EOS, 0 after it.
    sampler_logprobs:  (B, T) log-prob of each token under the distribution that drew it (ℓˢ for the
                       student's samples; 0 for the data set's answers); 0 where the mask is 0.
    finished:          (B,) True where the completion ended with a stop token.
    prompt_index:      (B,) rows with equal values share a prompt (a prompt's samples).
    row_index:         (B,) position of each row's prompt in its PromptSet.
    rows:              B data set rows (`opd.data.Example`: messages, answer, every field of the row).
    teacher_logprobs:  (B, T) ℓᵀ of the completion tokens; 0 outside the mask. None until scored.
    teacher_hidden:    (B, T, H) the teacher's final hidden states, kept only for full-vocabulary losses.
    teacher_topk_ids, teacher_topk_logprobs: (B, T, K) the teacher's top-k, where a scorer gives them.
    advantages:        (B, T) per-token advantages, for losses that use them.
    """

    prompt_ids: torch.Tensor = field(metadata=PROMPT)
    prompt_mask: torch.Tensor = field(metadata=PROMPT)
    completion_ids: torch.Tensor = field(metadata=COMPLETION)
    completion_mask: torch.Tensor = field(metadata=COMPLETION)
    sampler_logprobs: torch.Tensor = field(metadata=COMPLETION)
    finished: torch.Tensor = field(metadata=ROW)
    prompt_index: torch.Tensor = field(metadata=ROW)
    row_index: torch.Tensor = field(metadata=ROW)
    rows: list[Any] = field(metadata=ROW)
    teacher_logprobs: torch.Tensor | None = field(default=None, metadata=COMPLETION)
    teacher_hidden: torch.Tensor | None = field(default=None, metadata=COMPLETION)
    teacher_topk_ids: torch.Tensor | None = field(default=None, metadata=COMPLETION)
    teacher_topk_logprobs: torch.Tensor | None = field(default=None, metadata=COMPLETION)
    advantages: torch.Tensor | None = field(default=None, metadata=COMPLETION)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (B, P + T)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # (B, P + T)

    @property
    def num_tokens(self) -> int:
        """Completion tokens inside the mask: the tokens the loss and the metrics count."""
        return int(self.completion_mask.sum())

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def replace(self, **changes: Any) -> "StepBatch":
        return replace(self, **changes)

    def token_chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Flat row-major indices into (B, T) of the completion tokens inside the mask, `size` at a
        time: full-vocabulary work runs on these only, never on padding or past EOS."""
        index = self.completion_mask.flatten().nonzero().squeeze(-1)  # (n,)
        return (index[start : start + size] for start in range(0, index.numel(), size))

    def tokens_at(self, flat_index: torch.Tensor) -> "TokenChunk":
        """Every completion-layout field at flat positions `flat_index` (c,) of (B, T)."""
        values = {}
        for name in TokenChunk.FIELDS:
            value = getattr(self, name)
            values[name] = None if value is None else value.flatten(0, 1)[flat_index]
        return TokenChunk(**values)

    def select(self, rows: slice | torch.Tensor | list[int]) -> "StepBatch":
        """Rows `rows`, trimmed to the prompt columns they use and the completion columns before
        their last EOS. Every field is cut by its declared layout."""
        picked = {}
        positions = _positions(rows, len(self))
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value is None:
                picked[spec.name] = None
            elif isinstance(value, list):
                picked[spec.name] = [value[i] for i in positions]
            else:
                picked[spec.name] = value[positions]
        return StepBatch(**picked).trimmed()

    def trimmed(self) -> "StepBatch":
        """Drop prompt columns that are padding in every row and completion columns past every EOS."""
        prompt_used = (self.prompt_mask.sum(0) > 0).nonzero()
        first_prompt_col = int(prompt_used.min()) if len(prompt_used) else 0
        completion_used = self.completion_mask.sum(0).nonzero()
        last_col = int(completion_used.max()) + 1 if len(completion_used) else 1
        cut = {}
        for spec in fields(self):
            value, layout = getattr(self, spec.name), spec.metadata["layout"]
            if value is None or layout == "row":
                cut[spec.name] = value
            elif layout == "prompt":
                cut[spec.name] = value[:, first_prompt_col:]
            else:
                cut[spec.name] = value[:, :last_col]
        return StepBatch(**cut)


@dataclass
class TokenChunk:
    """Completion-layout fields of a StepBatch at a chunk of c token positions, flattened:
    tokens (c,), sampler_logprobs (c,), and where present teacher_logprobs (c,), advantages (c,),
    teacher_hidden (c, H), teacher_topk_ids / teacher_topk_logprobs (c, K)."""

    FIELDS = ("completion_ids", "sampler_logprobs", "teacher_logprobs", "teacher_hidden", "teacher_topk_ids",
              "teacher_topk_logprobs", "advantages")

    completion_ids: torch.Tensor
    sampler_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor | None
    teacher_hidden: torch.Tensor | None
    teacher_topk_ids: torch.Tensor | None
    teacher_topk_logprobs: torch.Tensor | None
    advantages: torch.Tensor | None

    @property
    def tokens(self) -> torch.Tensor:
        return self.completion_ids


def _positions(rows: slice | torch.Tensor | list[int], count: int) -> list[int]:
    if isinstance(rows, slice):
        return list(range(count))[rows]
    if isinstance(rows, torch.Tensor):
        return rows.tolist()
    return list(rows)


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), each (B, P_max), padded on the left so completions line up."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.tensor(sequence)
            mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), each (B, T_max), padded on the right, as completions are."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids.to(device), mask.to(device)
