"""Held-out evaluation: the training metrics under `eval/`, plus accuracy where answers are checkable.

Eval samples at the training temperature (rollout.temperature, with its top-k/top-p), so eval/*
figures measure the same distribution the trainer optimizes. Its sampler generator is re-seeded from a
fixed seed at every evaluation, so before/after comparisons see the same random numbers. Accuracy is
the mean over eval.samples_per_prompt samples, i.e. pass@1 at that temperature.
"""

from __future__ import annotations

import math

import torch

from opd.batch import StepBatch
from opd.data import PromptSet
from opd.metrics import rollout_metrics
from opd.sampling import Sampler
from opd.tasks.gsm8k import is_correct
from opd.teacher import TokenScorer


def decode_completions(batch: StepBatch, tokenizer) -> list[str]:
    texts = []
    for ids, mask in zip(batch.completion_ids.tolist(), batch.completion_mask.tolist()):
        texts.append(tokenizer.decode([token for token, keep in zip(ids, mask) if keep], skip_special_tokens=True))
    return texts


def evaluate(
    sampler: Sampler,
    teacher: TokenScorer | None,
    prompts: PromptSet,
    tokenizer,
    samples_per_prompt: int,
    batch_prompts: int,
    generator: torch.Generator,
    max_prompts: int | None = None,
) -> dict[str, float]:
    """Returns eval/ metrics averaged over completion tokens of all held-out rollouts.

    `generator` should be freshly seeded by the caller so every evaluation draws the same numbers.
    """
    count = min(len(prompts), max_prompts or len(prompts))
    token_weights: list[tuple[dict[str, float], int, int]] = []
    verdicts: dict[int, list[bool]] = {}  # prompt index -> correctness of each of its samples
    for start in range(0, count, batch_prompts):
        batch = sampler.sample(prompts.batch(list(range(start, min(start + batch_prompts, count)))),
                               samples_per_prompt, generator)
        if teacher is not None:
            batch = teacher.score(batch).attach(batch)
        token_weights.append((rollout_metrics(batch), batch.num_tokens, len(batch)))
        for text, row_index, row in zip(decode_completions(batch, tokenizer), batch.row_index.tolist(), batch.rows):
            verdict = is_correct(text, row.answer) if row.answer is not None else None
            if verdict is not None:
                verdicts.setdefault(row_index, []).append(verdict)
    totals = _combine(token_weights)
    if verdicts:
        totals["accuracy"] = sum(map(sum, verdicts.values())) / sum(map(len, verdicts.values()))  # pass@1
        if samples_per_prompt > 1:
            totals[f"pass@{samples_per_prompt}"] = sum(any(v) for v in verdicts.values()) / len(verdicts)
    return {f"eval/{key}": value for key, value in totals.items()}


def _combine(parts: list[tuple[dict[str, float], int, int]]) -> dict[str, float]:
    """Token-weighted means for per-token figures, rollout-weighted for per-sequence ones."""
    per_sequence = ("generation/avg_length", "generation/eos_fraction")
    combined = {}
    for key in parts[0][0]:
        if key.startswith("perplexity/"):
            continue
        weight_index = 2 if key in per_sequence else 1
        total_weight = sum(part[weight_index] for part in parts)
        combined[key] = sum(part[0][key] * part[weight_index] for part in parts) / max(total_weight, 1)
    for who in ("student", "teacher"):
        if f"logprob/{who}" in combined:
            combined[f"perplexity/{who}"] = math.exp(-combined[f"logprob/{who}"])
    return combined
