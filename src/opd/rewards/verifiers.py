"""Task rewards beside the teacher (`reward:`): a verifier grades each decoded completion against its data set row, and
the objective adds the reward's group-normalized advantage to the distillation one.

A verifier is `function(completion: str, row: dict) -> float`: the completion decoded without special tokens, and the
row's JSONL fields (`answer`, `question`, `messages` and any extra field); it may return any finite number (a bool, a
numpy scalar, a 0-d tensor). `gsm8k` is built in: 1 where the completion's final number equals the row's `#### N`
answer, else 0. Any other is named `package.module:function` and imported before any weight loads, from the Python
path and the working directory. A verifier that raises or returns something other than a finite number (a bool counts
as 0 or 1) stops the step with one line naming it and the row (file and line); the run then writes no final/.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from typing import Callable

import torch

from opd.data.prompts import PromptSet
from opd.data.tasks.gsm8k import gold_answer, is_correct
from opd.errors import ConfigError, DataError, OpdError
from opd.ops.batch import STUDENT, StepBatch

Verifier = Callable[[str, dict], float]


class RewardFailed(OpdError):
    """A verifier raised, or returned no finite number, at a step."""


def gsm8k(completion: str, row: dict) -> float:
    """1.0 where the completion's final answer equals the row's `#### N`, else 0.0."""
    verdict = is_correct(completion, str(row.get("answer") or ""))
    if verdict is None:
        raise ValueError("the row has no '#### N' answer to check against")
    return float(verdict)


BUILT_IN: dict[str, Verifier] = {"gsm8k": gsm8k}


def load_verifier(spec: str) -> Verifier:
    """`gsm8k`, or `package.module:function` imported now. One-line ConfigError naming reward.verifier."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ConfigError(
            f"reward.verifier: '{spec}' is neither a built-in ({', '.join(BUILT_IN)}) nor a 'package.module:function'"
        )
    if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m` does: a module beside the run's files
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a module that fails while importing is the same mistake for the user
        raise ConfigError(f"reward.verifier: cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"reward.verifier: {module_name} has no function {function_name}")
    return function


def check_rows(spec: str, prompts: PromptSet) -> None:
    """Before any weight loads: every row the built-in gsm8k verifier will grade has a `#### N` answer."""
    if spec != "gsm8k":
        return
    for example in prompts.examples:
        if example.answer is None or gold_answer(example.answer) is None:
            raise DataError(
                f"{prompts.path}:{example.line}: reward.verifier gsm8k needs an 'answer' ending in "
                "'#### N' on every row"
            )


class RewardScorer:
    """Grades a step's student-written rows with one verifier; other rows (a mixture's teacher or data
    set rows) get no reward."""

    def __init__(self, spec: str, tokenizer):
        self.spec, self.verifier, self.tokenizer = spec, load_verifier(spec), tokenizer

    def grade(self, text: str, row) -> float:
        where = f"{row.file}:{row.line}"
        try:
            value = self.verifier(text, row.fields)
        except Exception as exc:
            message = " ".join(str(exc).split())  # one line, whatever the verifier's message holds
            raise RewardFailed(
                f"reward.verifier {self.spec} raised {type(exc).__name__} on {where}: {message}"
            ) from None
        number = self._number(value)
        if number is None or not math.isfinite(number):
            shown = " ".join(repr(value).split())[:80]
            raise RewardFailed(
                f"reward.verifier {self.spec} returned {shown} ({type(value).__name__}) on {where}, not a finite number"
            )
        return number

    @staticmethod
    def _number(value) -> float | None:
        """value as a float where it is a number (bool, int, float, numpy scalar, 0-d tensor), else None."""
        if not (isinstance(value, numbers.Real) or (hasattr(type(value), "__float__") and not isinstance(value, str))):
            return None
        try:
            return float(value)
        except (OverflowError, TypeError, ValueError, RuntimeError):  # a huge int, a tensor of many values
            return None

    def attach(self, batch: StepBatch) -> StepBatch:
        """The batch with `rewards` (B,): each student row's grade, NaN for rows of other sources."""
        texts = batch.completion_texts(self.tokenizer)
        student = [True] * len(batch) if batch.source is None else (batch.source == STUDENT).tolist()
        rewards = [self.grade(text, row) if mine else math.nan for text, row, mine in zip(texts, batch.rows, student)]
        return batch.replace(rewards=torch.tensor(rewards, dtype=torch.float32, device=batch.completion_ids.device))
