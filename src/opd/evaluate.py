"""Held-out evaluation: the training metrics under `eval/`, plus accuracy where answers are checkable,
and the `opd eval` command.

Eval samples at the training temperature (rollout.temperature, with its top-k/top-p), so eval/*
figures measure the same distribution the trainer optimizes. Its sampler generator is re-seeded from a
fixed seed at every evaluation, so before/after comparisons see the same random numbers. Accuracy is
the mean over eval.samples_per_prompt samples, i.e. pass@1 at that temperature.
"""

from __future__ import annotations

import math

import torch

from opd.data import PromptSet
from opd.metrics import rollout_metrics
from opd.rollout import Rollouts, Sampler
from opd.tasks.gsm8k import is_correct
from opd.teacher import Teacher


def decode_completions(rollouts: Rollouts, tokenizer) -> list[str]:
    texts = []
    for ids, mask in zip(rollouts.completion_ids.tolist(), rollouts.completion_mask.tolist()):
        texts.append(tokenizer.decode([token for token, keep in zip(ids, mask) if keep], skip_special_tokens=True))
    return texts


def evaluate(
    sampler: Sampler,
    teacher: Teacher | None,
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
        indices = list(range(start, min(start + batch_prompts, count)))
        rollouts = sampler.sample([prompts.token_ids[i] for i in indices], samples_per_prompt, generator)
        batch_metrics = rollout_metrics(rollouts, teacher.score(rollouts).logprobs if teacher is not None else None)
        token_weights.append((batch_metrics, rollouts.num_tokens, len(rollouts)))
        for text, prompt_row in zip(decode_completions(rollouts, tokenizer), rollouts.prompt_index.tolist()):
            answer = prompts.answers[indices[prompt_row]]
            verdict = is_correct(text, answer) if answer is not None else None
            if verdict is not None:
                verdicts.setdefault(indices[prompt_row], []).append(verdict)
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



def evaluate_model(
    model_path: str,
    data: str,
    samples: int = 1,
    teacher_path: str | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    max_prompts: int | None = None,
    system_prompt: str | None = None,
    batch_rollouts: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """`opd eval`: pass@1, pass@K and length of a model on a data set, and with a teacher the
    held-out distillation metrics. Samples at `temperature` (pass@1 is the mean over K samples)."""
    from opd.data import load_prompts
    from opd.models import check_same_vocabulary, load_model
    from opd.rollout import HFSampler
    from opd.setup import resolve_autocast, resolve_device
    from opd.teacher import LocalTeacher

    device = resolve_device("auto")
    autocast_dtype = resolve_autocast("auto", device) if device.type == "cuda" else None
    student = load_model(model_path, "--model", device)
    prompts = load_prompts(data, "--data", student.tokenizer, max_prompt_tokens=10**9, system_prompt=system_prompt)
    teacher = None
    if teacher_path is not None:
        teacher_model = load_model(teacher_path, "--teacher", device, dtype=autocast_dtype or torch.float32)
        check_same_vocabulary(student.tokenizer, teacher_model.tokenizer)
        teacher = LocalTeacher(teacher_model, autocast_dtype=autocast_dtype)
    sampler = HFSampler(student, max_new_tokens, temperature, autocast_dtype=autocast_dtype)
    metrics = evaluate(sampler, teacher, prompts, student.tokenizer, samples, max(1, batch_rollouts // samples),
                       torch.Generator(device=device).manual_seed(seed), max_prompts)
    metrics["eval/prompts"] = min(len(prompts), max_prompts or len(prompts))
    return metrics
