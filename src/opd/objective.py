"""From scored rollouts to gradients: micro-batched, chunked over completion tokens.

The student's hidden states are computed with gradients once per micro-batch. Only the completion
tokens inside the mask are then gathered (no LM head on padding or after EOS), and the LM head, the
log-probs and the loss run over chunks of `chunk_size` of those tokens, each chunk backpropagating
into a detached copy of the hidden states before the next is built. At most one chunk of
[chunk_size x V] logits is alive at a time, for the student and the teacher alike, whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd import losses
from opd.models import LoadedModel, completion_hidden_states_of, logits_from_hidden
from opd.rollout import Rollouts
from opd.teacher import Teacher, TeacherScores


CHUNK_ELEMENTS = 2**24  # a [tokens x V] fp32 block of 64 MiB


def chunk_tokens(configured: int | None, vocab_size: int) -> int:
    """Tokens per chunk of full-vocabulary logits: the configured count, or as many as keep one
    [tokens x V] fp32 block near 64 MiB (2,048 tokens at an 8k vocabulary, 110 at Qwen's 151,936)."""
    return configured or max(1, CHUNK_ELEMENTS // vocab_size)


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
    # The micro-batch is trimmed to its own longest completion; whole-step tensors (advantages,
    # teacher hidden states) are cut to the same width before its flat token indices apply.
    width = part.completion_ids.shape[1]
    device_type = part.completion_ids.device.type
    autocast = torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    with autocast:
        hidden = completion_hidden_states_of(student.model, part)  # (b, T, H), prompts shared by their samples
    hidden_leaf = hidden.detach().requires_grad_()
    flat_hidden = hidden_leaf.flatten(0, 1)  # (b*T, H)
    total, logprob_sum = 0.0, 0.0
    for chunk in part.token_chunks(settings.chunk_size):  # (c,) flat indices of completion tokens
        tokens = part.completion_ids.flatten()[chunk]  # (c,)
        with autocast:
            logits = logits_from_hidden(student.model, flat_hidden[chunk], student.vocab_size)  # (c, V)
        if settings.kind == "reverse_kl_pg":
            processed = losses.process_logits(logits, settings.temperature, settings.top_k, settings.top_p)
            logprobs = losses.token_logprobs(processed, tokens)  # (c,)
            per_token = losses.reverse_kl_pg(logprobs, part.sampler_logprobs.flatten()[chunk],
                                             advantages[rows, :width].flatten()[chunk], settings.ratio_clip)
        elif settings.kind == "sft":
            logprobs = losses.token_logprobs(logits, tokens)  # (c,), temperature 1
            per_token = -logprobs
        else:
            teacher_logits = teacher.logits(scores.hidden[rows, :width].flatten(0, 1)[chunk])  # (c, V)
            scaled = losses.process_logits(logits, settings.temperature)  # (c, V) fp32
            per_token = losses.divergence(settings.kind, scaled, teacher_logits, settings.jsd_beta)
            logprobs = losses.token_logprobs(scaled, tokens)
        every = torch.ones_like(per_token, dtype=torch.bool)  # the chunk holds only tokens inside the mask
        chunk_loss = losses.reduce_tokens(per_token, every, num_tokens)
        chunk_loss.backward()
        total += chunk_loss.item()
        logprob_sum += float(logprobs.detach().sum())
    if hidden_leaf.grad is not None:  # None when the micro-batch holds no completion token
        hidden.backward(hidden_leaf.grad)
    return total, logprob_sum
