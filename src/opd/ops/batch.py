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

# Who wrote a row's completion. Only the student's own samples are on-policy.
STUDENT, TEACHER, DATASET = 0, 1, 2
SOURCE_NAMES = {STUDENT: "student", TEACHER: "teacher", DATASET: "dataset"}

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
    source:            (B,) who wrote each completion: STUDENT, TEACHER or DATASET.
    finished:          (B,) True where the completion ended with a stop token.
    prompt_index:      (B,) rows with equal values share a prompt (a prompt's samples).
    row_index:         (B,) position of each row's prompt in its PromptSet.
    rows:              B data set rows (`opd.data.rows.Example`: messages, answer, every field of the row).
    sampler_entropy:   (B, T) exact entropy of the distribution that drew each token; None for answers.
    teacher_entropy:   (B, T) entropy of the teacher's next-token distribution, where a teacher gives it.
    teacher_logprobs:  (B, T) ℓᵀ of the completion tokens; 0 outside the mask. None until scored.
    teacher_hidden:    (B, T, H) the teacher's final hidden states, kept only for full-vocabulary losses.
    teacher_topk_ids, teacher_topk_logprobs: (B, T, K) the teacher's top-k, where a scorer gives them.
    advantages:        (B, T) per-token advantages, for losses that use them.
    rewards:           (B,) the verifier's grade of each student-written completion (NaN for other rows),
                       where the run has a reward (opd.rewards); None otherwise.
    chunk_index:       (B, T) with a teacher of another tokenizer (opd.teachers.alignment): each token's chunk in
                       its row, or a negative code for a token left out of the loss; then
                       teacher_logprobs holds each chunk's Σ ℓᵀ at its last token. None: per token.
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
    source: torch.Tensor | None = field(default=None, metadata=ROW)
    sampler_entropy: torch.Tensor | None = field(default=None, metadata=COMPLETION)
    teacher_entropy: torch.Tensor | None = field(default=None, metadata=COMPLETION)
    teacher_logprobs: torch.Tensor | None = field(default=None, metadata=COMPLETION)
    teacher_hidden: torch.Tensor | None = field(default=None, metadata=COMPLETION)
    teacher_topk_ids: torch.Tensor | None = field(default=None, metadata=COMPLETION)
    teacher_topk_logprobs: torch.Tensor | None = field(default=None, metadata=COMPLETION)
    advantages: torch.Tensor | None = field(default=None, metadata=COMPLETION)
    chunk_index: torch.Tensor | None = field(default=None, metadata=COMPLETION)
    rewards: torch.Tensor | None = field(default=None, metadata=ROW)

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

    def completion_texts(self, tokenizer) -> list[str]:
        """Each row's completion inside the mask, decoded without special tokens."""
        return [
            tokenizer.decode([token for token, keep in zip(ids, mask) if keep], skip_special_tokens=True)
            for ids, mask in zip(self.completion_ids.tolist(), self.completion_mask.tolist())
        ]

    def replace(self, **changes: Any) -> "StepBatch":
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> "StepBatch":
        """Every tensor field on `device` (the rows stay as they are)."""
        return replace(
            self,
            **{
                each.name: getattr(self, each.name).to(device)
                for each in fields(self)
                if isinstance(getattr(self, each.name), torch.Tensor)
            },
        )

    def token_chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Flat row-major indices into (B, T) of the completion tokens inside the mask, `size` at a
        time: full-vocabulary work runs on these only, never on padding or past EOS."""
        index = self.completion_mask.flatten().nonzero().squeeze(-1)  # (n,)
        return (index[start : start + size] for start in range(0, index.numel(), size))

    def tokens_at(self, flat_index: torch.Tensor) -> "TokenChunk":
        """Every completion-layout field at flat positions `flat_index` (c,) of (B, T), and each token's source."""
        values = {}
        for name in TokenChunk.FIELDS:
            value = getattr(self, name)
            values[name] = None if value is None else value.flatten(0, 1)[flat_index]
        return TokenChunk(**values, source=self.row_sources()[flat_index // self.completion_ids.shape[1]])

    def row_sources(self) -> torch.Tensor:
        """(B,) the source of each row (STUDENT where no sampler said otherwise)."""
        if self.source is not None:
            return self.source
        return torch.full((len(self),), STUDENT, dtype=torch.long, device=self.completion_ids.device)

    def rows_from(self, source: int) -> torch.Tensor:
        """Indices of the rows that `source` wrote."""
        return (self.row_sources() == source).nonzero().squeeze(-1)

    @staticmethod
    def concat(batches: list["StepBatch"], pad_id: int) -> "StepBatch":
        """Rows of several batches in one: prompts left-padded and completions right-padded to the widest,
        prompt groups kept apart. Fields absent from any batch are absent from the result."""
        if len(batches) == 1:
            return batches[0]
        prompt_width = max(batch.prompt_ids.shape[1] for batch in batches)
        completion_width = max(batch.completion_ids.shape[1] for batch in batches)
        joined, group_offset = {}, 0
        groups = []
        for batch in batches:
            groups.append(batch.prompt_index + group_offset)
            group_offset += int(batch.prompt_index.max()) + 1 if len(batch) else 0
        for spec in fields(StepBatch):
            values = [getattr(batch, spec.name) for batch in batches]
            layout = spec.metadata["layout"]
            if spec.name == "prompt_index":
                joined[spec.name] = torch.cat(groups)
            elif spec.name == "source":
                joined[spec.name] = torch.cat([batch.row_sources() for batch in batches])
            elif all(value is None for value in values) or (layout != "completion" and None in values):
                joined[spec.name] = None
            elif any(value is None for value in values):  # e.g. no sampler entropy for the data's answers
                present = next(value for value in values if value is not None)
                values = [
                    present.new_zeros((*batch.completion_ids.shape, *present.shape[2:])) if value is None else value
                    for batch, value in zip(batches, values)
                ]
                joined[spec.name] = torch.cat(
                    [_pad_columns(value, completion_width, 0, left=False) for value in values]
                )
            elif isinstance(values[0], list):
                joined[spec.name] = [item for value in values for item in value]
            elif layout == "row":
                joined[spec.name] = torch.cat(values)
            else:
                width = prompt_width if layout == "prompt" else completion_width
                fill = pad_id if spec.name in ("prompt_ids", "completion_ids") else 0
                joined[spec.name] = torch.cat(
                    [_pad_columns(value, width, fill, left=layout == "prompt") for value in values]
                )
        return StepBatch(**joined)

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
    teacher_hidden (c, H), teacher_topk_ids / teacher_topk_logprobs (c, K); and source (c,)."""

    FIELDS = (
        "completion_ids",
        "sampler_logprobs",
        "teacher_logprobs",
        "teacher_hidden",
        "teacher_topk_ids",
        "teacher_topk_logprobs",
        "advantages",
    )

    completion_ids: torch.Tensor
    sampler_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor | None
    teacher_hidden: torch.Tensor | None
    teacher_topk_ids: torch.Tensor | None
    teacher_topk_logprobs: torch.Tensor | None
    advantages: torch.Tensor | None
    source: torch.Tensor  # (c,) the source of each token's row

    @property
    def tokens(self) -> torch.Tensor:
        return self.completion_ids

    def subset(self, keep: torch.Tensor) -> "TokenChunk":
        """The tokens where `keep` (c,) is True."""
        return TokenChunk(
            **{
                name: None if getattr(self, name) is None else getattr(self, name)[keep]
                for name in (*self.FIELDS, "source")
            }
        )


def _pad_columns(value: torch.Tensor, width: int, fill, left: bool) -> torch.Tensor:
    """(B, W, ...) -> (B, width, ...), padded with `fill` on the left or the right of dim 1."""
    missing = width - value.shape[1]
    if missing == 0:
        return value
    padding = value.new_full((value.shape[0], missing, *value.shape[2:]), fill)
    return torch.cat([padding, value] if left else [value, padding], dim=1)


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
