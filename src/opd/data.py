"""Prompt data: JSONL rows with a `prompt` string or chat `messages`, and an optional `answer`.

Rows are read and checked up front, so a malformed line fails with its line number before any
weight loads. Prompts longer than `data.max_prompt_tokens` are skipped, and the count is reported.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from opd.errors import DataError


@dataclass
class Example:
    """One prompt. `messages` is set for chat rows; `answer` when the row carries a checkable one."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    answer: str | None
    line: int


@dataclass
class PromptSet:
    """Tokenized prompts ready for the sampler."""

    token_ids: list[list[int]]
    answers: list[str | None]
    skipped_too_long: int
    source: str

    def __len__(self) -> int:
        return len(self.token_ids)


def read_jsonl(path: str | Path, key: str) -> list[Example]:
    """Parse and check every row; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: no such file '{path}'")
    examples = []
    with path.open("rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{line_number}: not UTF-8 text (byte {exc.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_number}: malformed JSON ({exc.msg})") from None
            examples.append(_example_from_row(row, path, line_number))
    if not examples:
        raise DataError(f"{key}: '{path}' holds no rows")
    return examples


def _example_from_row(row: Any, path: Path, line_number: int) -> Example:
    where = f"{path}:{line_number}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt, messages = row.get("prompt"), row.get("messages")
    if prompt is None and messages is None:
        raise DataError(f"{where}: row needs a 'prompt' string or a 'messages' list (keys: {sorted(row)})")
    if prompt is not None and not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' must be a string")
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} strings")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    return Example(prompt=prompt, messages=messages, answer=answer, line=line_number)


def encode_prompt(example: Example, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Chat rows go through the tokenizer's chat template (with the generation prompt); plain
    prompts are tokenized as text, with the tokenizer's own special-token convention."""
    if example.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"line {example.line}: row has 'messages' but the student tokenizer has no chat template")
        try:
            return list(tokenizer.apply_chat_template(example.messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        except Exception as exc:  # jinja raises TemplateError and others for e.g. non-alternating roles
            raise DataError(f"line {example.line}: the chat template rejected the messages ({exc})") from None
    return tokenizer(example.prompt)["input_ids"]


def load_prompts(path: str, key: str, tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int) -> PromptSet:
    examples = read_jsonl(path, key)
    token_ids, answers, skipped = [], [], 0
    for example in examples:
        try:
            ids = encode_prompt(example, tokenizer)
        except DataError as exc:
            raise DataError(f"{path}:{str(exc).removeprefix('line ')}") from None
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        if not ids:
            raise DataError(f"{path}:{example.line}: prompt encodes to zero tokens")
        token_ids.append(ids)
        answers.append(example.answer)
    if not token_ids:
        raise DataError(
            f"{key}: all {len(examples)} prompts in '{path}' are longer than data.max_prompt_tokens={max_prompt_tokens}"
        )
    return PromptSet(token_ids=token_ids, answers=answers, skipped_too_long=skipped, source=path)


class PromptStream:
    """An endless, reproducible stream of prompt indices: a fresh shuffle each epoch.

    The state is just (seed, consumed): resuming with the same pair yields the same prompts.
    Rank r of w takes every w-th prompt of each step's global batch, so ranks never overlap.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, consumed: int = 0):
        self.size, self.seed, self.shuffle, self.consumed = size, seed, shuffle, consumed
        self._cached_epoch, self._cached_order = -1, []

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._cached_epoch:
            order = list(range(self.size))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._cached_epoch, self._cached_order = epoch, order
        return self._cached_order

    def take(self, count: int, rank: int = 0, world_size: int = 1) -> list[int]:
        indices = []
        for position in range(self.consumed, self.consumed + count * world_size):
            epoch, offset = divmod(position, self.size)
            indices.append(self._order(epoch)[offset])
        self.consumed += count * world_size
        return indices[rank::world_size]
