"""Rows of prompt data: a `prompt` string, chat `messages`, or a GSM8K-style `question`, with an
optional `answer`, from a local JSONL file or from the Hugging Face hub (`hf:NAME[:CONFIG]:SPLIT`,
through the optional `datasets` package). Rows are read and checked up front, so a malformed line
fails with its line number before any weight loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    file: str = ""  # the file (or hub data set) it came from
    teacher: str | None = None  # the named teacher that scores it: its `teacher` field, or its file's


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
                hint = (
                    "; opd reads JSONL, one JSON object per line, and this looks like one JSON array: write each "
                    "element on a line of its own"
                    if line_number == 1 and line.lstrip().startswith("[")
                    else ""
                )
                raise DataError(f"{path}:{line_number}: malformed JSON ({exc.msg}){hint}") from None
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
        raise DataError(
            f"{where}: row needs a 'prompt' string, a 'messages' list or a 'question' (keys: {sorted(row)})"
        )
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
    origin = {"line": line_number, "fields": row, "file": str(path), "teacher": teacher}
    if prompt is None and messages is None:
        return Example(prompt=None, messages=None, answer=answer, question=question, **origin)
    return Example(prompt=prompt, messages=messages, answer=answer, **origin)


def read_hub(spec: str, key: str) -> list[Example]:
    """Rows of a hub data set named `hf:NAME[:CONFIG]:SPLIT`, e.g. `hf:openai/gsm8k:main:test`."""
    parts = spec.removeprefix("hf:").split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"{key}: '{spec}' should read hf:NAME[:CONFIG]:SPLIT, e.g. hf:openai/gsm8k:main:train")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets
    except ImportError:
        raise DataError(f"{key}: '{spec}' needs the `datasets` package: pip install 'opd[hub]'") from None
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name or split: the user needs one line
        raise DataError(
            f"{key}: could not load '{spec}' from the hub: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    examples = [_example_from_row(dict(row), Path(spec), index) for index, row in enumerate(rows, start=1)]
    if not examples:
        raise DataError(f"{key}: '{spec}' holds no rows")
    return examples


def read_rows(location: str, key: str) -> list[Example]:
    """The rows of a JSONL file or, named `hf:...`, a hub data set (`key`: the config key, for errors)."""
    return read_hub(location, key) if location.startswith("hf:") else read_jsonl(location, key)
