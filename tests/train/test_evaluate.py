"""Evaluation: pass@1 and pass@K against hand-counted answers, and the `opd eval` command."""

from __future__ import annotations

import json

import pytest
import torch

from opd.data.prompts import PromptBatch, PromptSet
from opd.data.rows import Example
from opd.demo.tokenizer import build_tokenizer
from opd.ops.batch import left_pad
from opd.train.evaluate import evaluate

from conftest import ROOT, make_batch, run_cli


class ScriptedSampler:
    """Returns fixed completion texts, in order, so correctness can be counted by hand."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer, self.texts = tokenizer, list(texts)

    def sample(self, prompts: PromptBatch, samples_per_prompt, seed):
        rows = [
            self.tokenizer(self.texts.pop(0))["input_ids"] + [self.tokenizer.eos_token_id]
            for _ in range(len(prompts) * samples_per_prompt)
        ]
        prompt_ids, prompt_mask = left_pad(
            [p for p in prompts.token_ids for _ in range(samples_per_prompt)], 0, torch.device("cpu")
        )
        width = max(map(len, rows))
        completion = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(completion)
        for index, row in enumerate(rows):
            completion[index, : len(row)] = torch.tensor(row)
            mask[index, : len(row)] = 1
        each = torch.tensor(prompts.row_index).repeat_interleave(samples_per_prompt)
        return make_batch(
            prompt_ids,
            prompt_mask,
            completion,
            mask,
            -torch.ones(completion.shape) * mask,
            torch.ones(len(rows), dtype=torch.bool),
            each,
        ).replace(rows=[row for row in prompts.rows for _ in range(samples_per_prompt)])


def test_pass_at_1_and_pass_at_k_are_counted_per_prompt():
    tokenizer = build_tokenizer()
    examples = [
        Example(prompt="", messages=None, answer=answer, line=line)
        for line, answer in enumerate(["#### 3", "#### 4", None], start=1)
    ]
    prompts = PromptSet(token_ids=[[5], [6], [7]], examples=examples, skipped_too_long=0, path="x")
    # prompt 0: 1 of 3 correct; prompt 1: none correct; prompt 2: not checkable.
    texts = ["#### 3", "#### 2", "#### 9", "#### 1", "#### 5", "#### 6", "#### 7", "#### 8", "#### 9"]
    metrics = evaluate(
        ScriptedSampler(tokenizer, texts), None, prompts, tokenizer, samples_per_prompt=3, batch_prompts=2, seed=0
    )
    assert metrics["eval/accuracy"] == pytest.approx(1 / 6)
    assert metrics["eval/pass@3"] == pytest.approx(1 / 2)
    assert metrics["eval/generation/avg_length"] == pytest.approx(3.0)  # "####", number, EOS


@pytest.mark.e2e
def test_opd_eval_reports_the_demo_teacher_accuracy(tmp_path):
    from opd.demo.task import write_split

    data = tmp_path / "eval.jsonl"
    write_split(data, 40, seed=2)
    teacher = ROOT / "src" / "opd" / "demo" / "assets" / "teacher"
    out = tmp_path / "metrics.json"
    result = run_cli(
        "eval",
        "--model",
        str(teacher),
        "--data",
        str(data),
        "--samples",
        "2",
        "--teacher",
        str(teacher),
        "--max-new-tokens",
        "40",
        "--precision",
        "fp32",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert metrics["eval/accuracy"] >= 0.8
    assert metrics["eval/pass@2"] >= metrics["eval/accuracy"]
    assert metrics["eval/distill/reverse_kl"] == pytest.approx(0.0, abs=1e-4)  # a model against itself
    assert "eval/accuracy" in result.stdout


@pytest.mark.e2e
def test_opd_eval_bad_input_is_one_line(tmp_path):
    result = run_cli("eval", "--model", str(tmp_path / "missing"), "--data", str(tmp_path / "x.jsonl"))
    assert (
        result.returncode == 2 and "--model: no such model folder" in result.stderr and "Traceback" not in result.stderr
    )
    result = run_cli("eval", "--model", "x", "--data", "y", "--samples", "0")
    assert result.returncode == 2 and "--samples must be at least 1" in result.stderr


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_opd_eval_builds_its_models_as_opd_train_does(tmp_path, monkeypatch, precision):
    """The teacher of `opd eval` comes from the same factory as training's: chunks sized to its
    vocabulary (not a fixed 1,024 tokens) and the resolved precision for the teacher and the sampler."""
    from opd.demo.task import write_split
    from opd.models.precision import Precision
    from opd.ops.logprobs import tokens_per_chunk
    from opd.train import evaluate as eval_command

    data = tmp_path / "eval.jsonl"
    write_split(data, 2, seed=2)
    seen = {}
    monkeypatch.setattr(
        eval_command, "evaluate", lambda sampler, teacher, *args: seen.update(sampler=sampler, teacher=teacher) or {}
    )
    teacher_path = str(ROOT / "src" / "opd" / "demo" / "assets" / "teacher")
    eval_command.evaluate_model(
        teacher_path, str(data), teacher_path=teacher_path, precision=precision, max_new_tokens=64
    )
    expected = Precision.resolve(precision)
    teacher = seen["teacher"]
    assert teacher.chunk_size == tokens_per_chunk(None, teacher.loaded.vocab_size)
    assert teacher.precision == expected
    assert next(teacher.model.parameters()).dtype == expected.frozen_weights_dtype
    assert seen["sampler"].settings.max_new_tokens == 64


def test_opd_eval_refuses_completions_past_the_models_context(tmp_path):
    """The demo's models have a context of 256: the default 256 new tokens plus any prompt run past it."""
    from opd.demo.task import write_split
    from opd.errors import ConfigError
    from opd.train.evaluate import evaluate_model

    data = write_split(tmp_path / "eval.jsonl", 4, seed=2) or tmp_path / "eval.jsonl"
    model = str(ROOT / "src" / "opd" / "demo" / "assets" / "student")
    with pytest.raises(ConfigError, match=r"--max-new-tokens 256: with the longest prompt of --data \(\d+ tokens\)"):
        evaluate_model(model, str(data), precision="fp32")
    assert evaluate_model(model, str(data), max_new_tokens=16, precision="fp32")["eval/prompts"] == 4
