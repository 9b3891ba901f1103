"""Prompt data: rows with a `prompt` string, chat `messages`, or a GSM8K-style `question`, and an
optional `answer`, from a local JSONL file or from the Hugging Face hub (`hf:NAME[:CONFIG]:SPLIT`,
through the optional `datasets` package).

Rows are read and checked up front, so a malformed line fails with its line number before any
weight loads. Prompts longer than `data.max_prompt_tokens` are skipped, and the count is reported.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from opd.errors import DataError


@dataclass
class Example:
    """One data set row: exactly one of `prompt`, `messages`, `question` is set. `answer` when the row
    has one; `line` is the JSONL line (or the hub row number, from 1); `fields` is the whole row, so
    any extra field (a reference solution, a domain tag) stays reachable from a rollout."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    answer: str | None
    line: int
    question: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file (or hub data set) it came from
    teacher: str | None = None  # the named teacher that scores it: its `teacher` field, or its file's


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

    def split(self, count: int) -> tuple["PromptBatch", "PromptBatch"]:
        """The first `count` prompts, and the rest."""
        return (PromptBatch(self.token_ids[:count], self.row_index[:count], self.rows[:count], self.keys[:count]),
                PromptBatch(self.token_ids[count:], self.row_index[count:], self.rows[count:], self.keys[count:]))


@dataclass
class PromptSet:
    """Tokenized prompts ready for the sampler, with the rows they came from (skipped rows left out)."""

    token_ids: list[list[int]]
    examples: list[Example]
    skipped_too_long: int
    source: str

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def answers(self) -> list[str | None]:
        return [example.answer for example in self.examples]

    def batch(self, indices: list[int], keys: list[int] | None = None) -> PromptBatch:
        """Prompts at `indices`; their random-stream keys default to the indices (held-out sets)."""
        return PromptBatch([self.token_ids[i] for i in indices], list(indices), [self.examples[i] for i in indices],
                           list(indices) if keys is None else list(keys))


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
    prompt, messages, question = row.get("prompt"), row.get("messages"), row.get("question")
    if prompt is None and messages is None and question is None:
        raise DataError(f"{where}: row needs a 'prompt' string, a 'messages' list or a 'question' (keys: {sorted(row)})")
    for name, value in (("prompt", prompt), ("question", question)):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: '{name}' must be a string")
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} strings")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    if row.get("teacher_context") is not None and not isinstance(row["teacher_context"], str):
        raise DataError(f"{where}: 'teacher_context' must be a string (text only the teacher sees)")
    teacher = row.get("teacher")
    if teacher is not None and not isinstance(teacher, str):
        raise DataError(f"{where}: 'teacher' must be a teacher's name (a string)")
    origin = {"line": line_number, "fields": row, "source": str(path), "teacher": teacher}
    if prompt is None and messages is None:
        return Example(prompt=None, messages=None, answer=answer, question=question, **origin)
    return Example(prompt=prompt, messages=messages, answer=answer, **origin)


def read_hub(source: str, key: str) -> list[Example]:
    """Rows of a hub data set named `hf:NAME[:CONFIG]:SPLIT`, e.g. `hf:openai/gsm8k:main:test`."""
    parts = source.removeprefix("hf:").split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"{key}: '{source}' should read hf:NAME[:CONFIG]:SPLIT, e.g. hf:openai/gsm8k:main:train")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets
    except ImportError:
        raise DataError(f"{key}: '{source}' needs the `datasets` package: pip install 'opd[hub]'") from None
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name or split: the user needs one line
        raise DataError(f"{key}: could not load '{source}' from the hub: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    examples = [_example_from_row(dict(row), Path(source), index) for index, row in enumerate(rows, start=1)]
    if not examples:
        raise DataError(f"{key}: '{source}' holds no rows")
    return examples


def read_rows(source: str, key: str) -> list[Example]:
    return read_hub(source, key) if source.startswith("hf:") else read_jsonl(source, key)


def encode_prompt(
    example: Example, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None, template_kwargs: dict | None = None
) -> list[int]:
    """Token ids of a row's prompt: `render_prompt`'s text, tokenized as its template (or the plain
    tokenizer) would."""
    text, add_special_tokens = render_prompt(example, tokenizer, system_prompt, template_kwargs)
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def place_context(context_format: str, context: str, prompt: str) -> str:
    """`context_format` with {context} and {prompt} filled in one pass (neither text's braces are read)."""
    return re.sub(r"\{(context|prompt)\}", lambda match: context if match.group(1) == "context" else prompt,
                  context_format)


def render_prompt(
    example: Example, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None,
    template_kwargs: dict | None = None, context: str | None = None, context_format: str = "{context}\n\n{prompt}",
) -> tuple[str, bool]:
    """A row's prompt as text, and whether the tokenizer should add its own special tokens (BOS) to it.

    - `messages`: the chat template, with the generation prompt (and `system_prompt` first, unless
      the row has its own system message); the template writes every special token itself.
    - `question` (GSM8K): a user turn through the chat template when the tokenizer has one, else
      plain text "Question: ...\nAnswer:".
    - `prompt`: plain text, with the tokenizer's own special-token convention; no template.
    context: text only a teacher sees (a reference solution); `context_format` places it around the
    last user turn, the question or the prompt text ({context} and {prompt}).
    """
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def with_context(text: str) -> str:
        return text if context is None else place_context(context_format, context, text)

    if example.question is not None:
        question = with_context(example.question)
        if not getattr(tokenizer, "chat_template", None):
            header = f"{system_prompt}\n\n" if system_prompt else ""
            return f"{header}Question: {question}\nAnswer:", True
        messages = [*system, {"role": "user", "content": question}]
    elif example.messages is not None:
        messages = list(example.messages)
        if context is not None:
            last_user = max((index for index, message in enumerate(messages) if message["role"] == "user"), default=None)
            if last_user is None:
                raise DataError(f"line {example.line}: the row has teacher_context but no user turn to add it to")
            messages[last_user] = {**messages[last_user], "content": with_context(messages[last_user]["content"])}
        if system and not (messages and messages[0]["role"] == "system"):
            messages = [*system, *messages]
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"line {example.line}: row has 'messages' but the tokenizer has no chat template")
    else:
        return with_context(example.prompt), True
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             **(template_kwargs or {})), False
    except Exception as exc:  # jinja raises TemplateError and others for e.g. non-alternating roles
        raise DataError(f"line {example.line}: the chat template rejected the messages ({exc})") from None


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
    return PromptSet(token_ids=token_ids, examples=kept, skipped_too_long=skipped, source=path)


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
    return PromptSet(token_ids=[ids for each in sets for ids in each.token_ids],
                     examples=[example for each in sets for example in each.examples],
                     skipped_too_long=sum(each.skipped_too_long for each in sets),
                     source=", ".join(each.source for each in sets))


class PromptStream:
    """An endless, reproducible stream of prompt indices: a fresh shuffle each epoch.

    The state is just (seed, consumed): resuming with the same pair yields the same prompts. The
    stream is global: every rank advances it by the whole step's count, and rank r of w keeps every
    w-th index of the step, so the ranks' shares are disjoint and together are the step.
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
        """The next step's indices for `rank`: `count` per rank, `count * world_size` in all."""
        return self.take_keyed(count, rank, world_size)[0]

    def take_keyed(self, count: int, rank: int = 0, world_size: int = 1) -> tuple[list[int], list[int]]:
        """As take, with each prompt's position in the stream: a key that names the draw in the whole
        run, whatever the world size (the random stream of its samples)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        indices, positions = [], list(range(self.consumed, self.consumed + count * world_size))
        for position in positions:
            epoch, offset = divmod(position, self.size)
            indices.append(self._order(epoch)[offset])
        self.consumed += count * world_size
        return indices[rank::world_size], positions[rank::world_size]
