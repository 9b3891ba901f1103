"""Prompts as token ids: a data set's rows encoded for the student (`PromptSet`), a step's batch of them
(`PromptBatch`), and the reproducible stream that hands each step its prompts (`PromptStream`).
Prompts longer than `data.max_prompt_tokens` are skipped, and the count is reported.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from opd.data.rows import Example, read_rows
from opd.data.templates import encode_prompt
from opd.errors import DataError


@dataclass
class PromptBatch:
    """Prompts for one sampling call: token ids, where each came from (its PromptSet position and row),
    and each prompt's random-stream key. The key names the prompt's draw in the whole run (its position
    in the prompt stream), so its samples are the same whichever rank or micro-batch it lands in."""

    token_ids: list[list[int]]
    row_index: list[int]
    rows: list[Example]
    keys: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    def pick(self, indices: list[int]) -> "PromptBatch":
        """The prompts at `indices`, in that order."""
        return PromptBatch(
            [self.token_ids[i] for i in indices],
            [self.row_index[i] for i in indices],
            [self.rows[i] for i in indices],
            [self.keys[i] for i in indices] if self.keys else [],
        )

    def split(self, count: int) -> tuple["PromptBatch", "PromptBatch"]:
        """The first `count` prompts, and the rest."""
        return (
            PromptBatch(self.token_ids[:count], self.row_index[:count], self.rows[:count], self.keys[:count]),
            PromptBatch(self.token_ids[count:], self.row_index[count:], self.rows[count:], self.keys[count:]),
        )


@dataclass
class PromptSet:
    """Tokenized prompts ready for the sampler, with the rows they came from (skipped rows left out)."""

    token_ids: list[list[int]]
    examples: list[Example]
    skipped_too_long: int
    path: str  # the data file(s) or hub data set it was read from

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def answers(self) -> list[str | None]:
        return [example.answer for example in self.examples]

    def batch(self, indices: list[int], keys: list[int] | None = None) -> PromptBatch:
        """Prompts at `indices`; their random-stream keys default to the indices (held-out sets)."""
        return PromptBatch(
            [self.token_ids[i] for i in indices],
            list(indices),
            [self.examples[i] for i in indices],
            list(indices) if keys is None else list(keys),
        )


def load_prompts(
    path: str,
    key: str,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
    system_prompt: str | None = None,
    template_kwargs: dict | None = None,
) -> PromptSet:
    examples = read_rows(path, key)
    token_ids, kept, skipped = [], [], 0
    for example in examples:
        try:
            ids = encode_prompt(example, tokenizer, system_prompt, template_kwargs)
        except DataError as exc:
            raise DataError(f"{path}:{str(exc).removeprefix('line ')}") from None
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        if not ids:
            raise DataError(f"{path}:{example.line}: prompt encodes to zero tokens")
        token_ids.append(ids)
        kept.append(example)
    if not token_ids:
        raise DataError(
            f"{key}: all {len(examples)} prompts in '{path}' are longer than data.max_prompt_tokens={max_prompt_tokens}"
        )
    return PromptSet(token_ids=token_ids, examples=kept, skipped_too_long=skipped, path=path)


def load_train_prompts(train, key: str, *options) -> PromptSet:
    """data.train: one source, or a list of files (each perhaps naming the teacher of its rows), as one
    PromptSet in file order. options: as load_prompts'."""
    if isinstance(train, str):
        return load_prompts(train, key, *options)
    sets = []
    for index, file in enumerate(train):
        prompts = load_prompts(file.path, f"{key}[{index}]", *options)
        for example in prompts.examples:
            example.teacher = example.teacher or file.teacher
        sets.append(prompts)
    return PromptSet(
        token_ids=[ids for each in sets for ids in each.token_ids],
        examples=[example for each in sets for example in each.examples],
        skipped_too_long=sum(each.skipped_too_long for each in sets),
        path=", ".join(each.path for each in sets),
    )


@dataclass(frozen=True)
class StepPrompts:
    """One step's prompts for one rank: their PromptSet indices and keys (stream positions), and the
    stream positions of the whole step, every rank's (`positions.stop`: where the stream stands once
    the step's update has consumed them)."""

    indices: list[int]
    keys: list[int]
    positions: range


class PromptStream:
    """An endless, reproducible stream of prompt indices: a fresh shuffle each epoch.

    The stream is global: every rank advances it by the whole step's count, and rank r of w keeps every
    w-th index of the step, so the ranks' shares are disjoint and together are the step.

    Two positions: `taken`, how far prompts have been handed to sampling, and `consumed`, how far the
    updates have used them (`consume`). A batch can be sampled ahead of its update, so a checkpoint
    saves `consumed`, never `taken`: a resumed run samples again what was taken but not yet used, and
    repeats or skips nothing. The state is (seed, consumed): resuming with the same pair yields the
    same prompts.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, consumed: int = 0):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.taken = self.consumed = consumed
        self._cached_epoch, self._cached_order = -1, []

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._cached_epoch:
            order = list(range(self.size))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._cached_epoch, self._cached_order = epoch, order
        return self._cached_order

    def take(self, count: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """The next step's indices for `rank`: `count` per rank, `count * world_size` in all; consumed
        at once (a step sampled and used together)."""
        step = self.take_step(count, rank, world_size)
        self.consume(step)
        return step.indices

    def take_step(self, count: int, rank: int = 0, world_size: int = 1) -> StepPrompts:
        """The next step's prompts for `rank`, each with its position in the stream: a key that names its
        draw in the whole run, whatever the world size (the random stream of its samples). Advances
        `taken` only."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        positions = range(self.taken, self.taken + count * world_size)
        indices = [self._order(position // self.size)[position % self.size] for position in positions]
        self.taken = positions.stop
        return StepPrompts(indices[rank::world_size], list(positions[rank::world_size]), positions)

    def mark_taken(self, position: int) -> None:
        """Prompts up to `position` are taken already (a resumed run's batches sampled before the checkpoint)."""
        if position < self.consumed:
            raise ValueError(f"taken position {position} is behind the consumed position {self.consumed}")
        self.taken = position

    def consume(self, step: StepPrompts) -> None:
        """The update of `step` has used its prompts (steps are consumed in the order they were taken)."""
        if step.positions.start != self.consumed:
            raise ValueError(
                f"prompts at {step.positions.start} consumed with the stream at {self.consumed}: "
                "steps are consumed in the order they were taken"
            )
        self.consumed = step.positions.stop
