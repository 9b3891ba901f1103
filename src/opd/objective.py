"""From scored rollouts to gradients: micro-batched, chunked over positions.

The student's hidden states are computed with gradients once per micro-batch; the LM head, the
log-probs and the loss then run over chunks of positions, each chunk backpropagating into a detached
copy of the hidden states before the next is built. Only one chunk of [b x c x V] logits is alive at a
time, for the student and the teacher alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd import losses
from opd.models import LoadedModel, completion_hidden_states, logits_from_hidden
from opd.rollout import Rollouts
from opd.teacher import Teacher, TeacherScores


@dataclass
class LossSettings:
    kind: str
    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    ratio_clip: float | None = None
    jsd_beta: float = 0.5
    chunk_size: int = 256


def backward_micro_batch(
    student: LoadedModel,
    teacher: Teacher | None,
    rollouts: Rollouts,
    scores: TeacherScores | None,
    advantages: torch.Tensor | None,
    rows: slice,
    num_tokens: int,
    settings: LossSettings,
    autocast_dtype: torch.dtype | None,
) -> tuple[float, float]:
    """Accumulate gradients of one micro-batch's share of the step loss.

    advantages: (B, T) for the whole step, needed by reverse_kl_pg only; `rows` picks the micro-batch.
    teacher and scores may be None for sft. The loss is normalized by
    num_tokens, the completion tokens of the whole step, so shares add up to the step loss.
    Returns (loss share, sum of the student's log-probs of the micro-batch's tokens); the second
    gives `opd sft` its logprob/student, since no student sampled those tokens.
    """
    part = rollouts.select(rows)
    width = part.completion_ids.shape[1]
    device_type = part.completion_ids.device.type
    autocast = torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    with autocast:
        hidden = completion_hidden_states(student.model, part.input_ids, part.attention_mask, width)  # (b, T, H)
    hidden_leaf = hidden.detach().requires_grad_()
    total, logprob_sum = 0.0, 0.0
    for start in range(0, width, settings.chunk_size):
        cols = slice(start, min(start + settings.chunk_size, width))
        with autocast:
            logits = logits_from_hidden(student.model, hidden_leaf[:, cols], student.vocab_size)  # (b, c, V)
        mask = part.completion_mask[:, cols]
        if settings.kind == "reverse_kl_pg":
            processed = losses.process_logits(logits, settings.temperature, settings.top_k, settings.top_p)
            logprobs = losses.token_logprobs(processed, part.completion_ids[:, cols])  # (b, c)
            per_token = losses.reverse_kl_pg(
                logprobs, part.sampler_logprobs[:, cols], advantages[rows, cols], settings.ratio_clip
            )
        elif settings.kind == "sft":
            logprobs = losses.token_logprobs(logits, part.completion_ids[:, cols])  # (b, c), temperature 1
            per_token = -logprobs
        else:
            teacher_logits = teacher.logits(scores.hidden[rows, cols])  # (b, c, V)
            per_token = losses.divergence(
                settings.kind, logits.float() / settings.temperature, teacher_logits, settings.jsd_beta
            )
            logprobs = losses.token_logprobs(logits.float() / settings.temperature, part.completion_ids[:, cols])
        chunk_loss = losses.reduce_tokens(per_token, mask, num_tokens)
        chunk_loss.backward()
        total += chunk_loss.item()
        logprob_sum += float(torch.where(mask.bool(), logprobs.detach(), 0.0).sum())
    hidden.backward(hidden_leaf.grad)
    return total, logprob_sum
