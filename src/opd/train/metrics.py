"""The figures of a batch of rollouts, named as others read them (see the README's metrics list).

Every mean is over completion tokens (the mask), so prompt, pad and post-EOS positions never count.
"""

from __future__ import annotations

import math

import torch

from opd.distributed.world import World
from opd.ops.batch import StepBatch
from opd.teachers.alignment import TRUNCATED, UNREPRESENTABLE, last_token_of_chunk
from opd.teachers.routed import RoutedTeachers


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of values (B, T) where mask (B, T) is set; where(), not multiply, so -inf can't make NaN."""
    count = mask.sum()
    return float(torch.where(mask.bool(), values, 0.0).sum() / count) if count > 0 else float("nan")


def rollout_metrics(batch: StepBatch, prefix: str = "") -> dict[str, float]:
    """logprob/*, perplexity/*, distill/reverse_kl, entropy/* and generation/* of one batch. Without
    teacher log-probs (no teacher), only the student's, the entropy and the length figures."""
    mask, teacher_logprobs = batch.completion_mask, batch.teacher_logprobs
    student_lp = masked_mean(batch.sampler_logprobs, mask)
    metrics = {f"{prefix}logprob/student": student_lp, f"{prefix}perplexity/student": math.exp(-student_lp)}
    if teacher_logprobs is not None:
        # With another tokenizer (chunk_index), ℓ̃ᵀ holds each chunk's Σ ℓᵀ: its means are per student token
        # over the chunks kept, and only the sequence-level figure is defined.
        scored = mask if batch.chunk_index is None else mask.bool() & (batch.chunk_index >= 0)
        teacher_lp = masked_mean(teacher_logprobs, scored)
        log_ratio = masked_mean(batch.sampler_logprobs - teacher_logprobs, scored)
        metrics.update(
            {
                f"{prefix}logprob/teacher": teacher_lp,
                f"{prefix}perplexity/teacher": math.exp(-teacher_lp),
                f"{prefix}distill/seq_reverse_kl": log_ratio,
            }
        )
        if batch.chunk_index is None:
            metrics[f"{prefix}distill/reverse_kl"] = log_ratio
        else:
            metrics.update(alignment_metrics(batch.chunk_index, mask, prefix))
    if batch.rewards is not None and bool((~batch.rewards.isnan()).any()):  # the verifier's grades, per rollout
        graded = batch.rewards[~batch.rewards.isnan()]
        metrics[f"{prefix}reward/mean"] = float(graded.mean())
        metrics[f"{prefix}reward/std"] = float(graded.std(unbiased=False))
    if batch.sampler_entropy is not None:
        metrics[f"{prefix}entropy/student"] = masked_mean(batch.sampler_entropy, mask)
    if batch.teacher_entropy is not None:
        metrics[f"{prefix}entropy/teacher"] = masked_mean(batch.teacher_entropy, mask)
    return {
        **metrics,
        f"{prefix}generation/avg_length": float(mask.sum(1).float().mean()),
        f"{prefix}generation/eos_fraction": float(batch.finished.float().mean()),
        f"{prefix}generation/repetition": repetition(batch.completion_ids, mask),
    }


def alignment_metrics(chunk_index: torch.Tensor, mask: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """The chunk estimator's bookkeeping (opd.teachers.alignment): the share of completion tokens left out of the
    loss as a cut completion's trailing chunk, or as bytes the teacher could not encode; and student
    tokens per kept chunk."""
    inside = mask.bool()
    tokens = max(int(inside.sum()), 1)
    kept = inside & (chunk_index >= 0)
    last = inside & last_token_of_chunk(chunk_index)
    return {
        f"{prefix}align/truncated_fraction": int((inside & (chunk_index == TRUNCATED)).sum()) / tokens,
        f"{prefix}align/unrepresentable_fraction": int((inside & (chunk_index == UNREPRESENTABLE)).sum()) / tokens,
        f"{prefix}align/tokens_per_chunk": int(kept.sum()) / max(int(last.sum()), 1),
    }


REPETITION_N = 4


def repetition(completion_ids: torch.Tensor, mask: torch.Tensor, n: int = REPETITION_N) -> float:
    """The fraction of the completions' n-grams that repeat an earlier n-gram of the same completion,
    pooled over the batch: near 0 for varied text, near 1 for a loop ("\n\n\n\n..."). (B, T) inputs."""
    repeated = total = 0
    for ids, keep in zip(completion_ids.tolist(), mask.tolist()):
        tokens = [token for token, kept in zip(ids, keep) if kept]
        seen = set()
        for start in range(len(tokens) - n + 1):
            gram = tuple(tokens[start : start + n])
            repeated += gram in seen
            seen.add(gram)
        total += max(len(tokens) - n + 1, 0)
    return repeated / total if total else 0.0


def combine(parts: list[tuple[dict[str, float], int, int]]) -> dict[str, float]:
    """Figures of several batches (or ranks) as one: parts are (figures, completion tokens, rows).
    Token-weighted means for per-token figures, row-weighted for per-sequence ones, maxima for maxima;
    perplexities from the combined log-probs."""
    per_sequence = ("generation/avg_length", "generation/eos_fraction", "reward/mean")
    combined = {}
    for key in parts[0][0]:
        if key.startswith("perplexity/") or key.endswith("reward/std"):
            continue
        if key.endswith("max_abs_log"):
            combined[key] = max(part[0][key] for part in parts)
            continue
        if key.endswith("generation/repetition"):  # pooled over n-grams: about tokens - (n - 1) per row
            weights = [max(part[1] - (REPETITION_N - 1) * part[2], 0) for part in parts]
        else:
            weights = [part[2] if key in per_sequence else part[1] for part in parts]
        combined[key] = sum(part[0][key] * weight for part, weight in zip(parts, weights)) / max(sum(weights), 1)
    for key in [key for key in parts[0][0] if key.endswith("reward/std")]:  # pooled: E[r^2] - E[r]^2 over all rows
        mean, rows = combined[key.replace("/std", "/mean")], sum(part[2] for part in parts)
        square = sum((part[0][key] ** 2 + part[0][key.replace("/std", "/mean")] ** 2) * part[2] for part in parts)
        combined[key] = math.sqrt(max(square / max(rows, 1) - mean**2, 0.0))
    for who in ("student", "teacher"):
        if f"logprob/{who}" in combined:
            combined[f"perplexity/{who}"] = math.exp(-combined[f"logprob/{who}"])
    return combined


def pieces_over_ranks(parts: dict, world: World) -> dict:
    """This rank's {key: (figures, completion tokens, rows)} -> {key: every rank's pieces}, for combine;
    a key some rank lacks has only the others' pieces. A collective."""
    gathered = world.gather(parts)
    keys = sorted({key for rank_parts in gathered for key in rank_parts})
    return {key: [rank_parts[key] for rank_parts in gathered if key in rank_parts] for key in keys}


PER_TEACHER = (
    "distill/reverse_kl",
    "distill/seq_reverse_kl",
    "logprob/teacher",
    "generation/avg_length",
    "reward/mean",
    "reward/std",
)


def per_teacher_metrics(teachers: RoutedTeachers, batch: StepBatch, world: World) -> dict[str, float]:
    """PER_TEACHER figures of each routed teacher's rows, over every rank: `<figure>/<name>`."""
    mine = {name: (rollout_metrics(part), part.num_tokens, len(rows)) for name, _, rows, part in teachers.parts(batch)}
    figures = {}
    for name, pieces in pieces_over_ranks(mine, world).items():
        combined = combine(pieces)
        figures.update({f"{key}/{name}": combined[key] for key in PER_TEACHER if key in combined})
    return figures
