"""Pure loss functions of tensors: no model, no config.

Shape convention throughout opd: B rollouts, T completion positions, V vocabulary entries, written
as `# (B, T)` comments. Every function here returns per-token values; reduction to a scalar happens in
exactly one place, `reduce_tokens`, which divides by the token count of the whole optimizer step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def discounted_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    coef: float = 1.0,
    discount: float = 0.0,
) -> torch.Tensor:
    """A_t = -coef * sum_{j>=t} discount^(j-t) * k_j with k = ℓˢ - ℓᵀ, zero outside the mask.

    All inputs (B, T); returns (B, T). Masked positions contribute nothing to the sum, so tokens
    after EOS never leak reward backwards.
    """
    per_token_kl = torch.where(mask.bool(), student_logprobs - teacher_logprobs, 0.0)
    if discount == 0.0:
        return -coef * per_token_kl
    returns = torch.zeros_like(per_token_kl)
    running = torch.zeros_like(per_token_kl[:, 0])
    for t in range(per_token_kl.shape[1] - 1, -1, -1):
        running = per_token_kl[:, t] + discount * running
        returns[:, t] = running
    return -coef * returns * mask


def chunk_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    chunk_index: torch.Tensor,
    mask: torch.Tensor,
    coef: float = 1.0,
    discount: float = 0.0,
) -> torch.Tensor:
    """The chunk estimator's advantages (opd.teachers.alignment): A_C = -coef * sum_{C'>=C} discount^(C'-C) Δ_C'
    with Δ_C = Σ_{t∈C} (ℓˢ_t - ℓ̃ᵀ_t), where ℓ̃ᵀ holds each chunk's Σ ℓᵀ at its last token; every student
    token of chunk C gets A_C (a chunk is one action: its log-prob is the sum of its tokens'); tokens
    with a negative chunk code, or outside the mask, get 0.

    All inputs (B, T); returns (B, T). With one token per chunk it is `discounted_advantages`.
    """
    rows, width = chunk_index.shape
    kept = mask.bool() & (chunk_index >= 0)
    slot = chunk_index.clamp(min=0)
    per_token = torch.where(kept, student_logprobs - teacher_logprobs, 0.0)
    deltas = torch.zeros(rows, width, dtype=per_token.dtype, device=per_token.device)  # (B, chunks <= T)
    deltas.scatter_add_(1, slot, per_token)
    chunk_values = discounted_advantages(deltas, torch.zeros_like(deltas), torch.ones_like(deltas), coef, discount)
    return torch.where(kept, chunk_values.gather(1, slot), 0.0)


def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, scale_by_std: bool = False, epsilon: float = 1e-4
) -> torch.Tensor:
    """A_i = r_i - mean of r over the rows of i's group (a prompt's samples), with scale_by_std divided
    by (the group's sample standard deviation + epsilon), as GRPO does. Rows whose reward is NaN (none
    was given) are left out of their group's figures and get 0, as does a group of one.

    rewards, groups: (B,); returns (B,) float32.
    """
    given = ~torch.isnan(rewards)
    values = torch.where(given, rewards.float(), 0.0)
    _, group = torch.unique(groups, return_inverse=True)  # (B,) in 0..G-1
    count = torch.zeros(int(group.max()) + 1 if len(group) else 0, device=rewards.device).index_add_(
        0, group, given.float()
    )
    mean = torch.zeros_like(count).index_add_(0, group, values) / count.clamp(min=1)  # (G,)
    centered = torch.where(given, values - mean[group], 0.0)
    if scale_by_std:
        squares = torch.zeros_like(count).index_add_(0, group, centered.square())
        std = (squares / (count - 1).clamp(min=1)).sqrt()  # (G,), 0 for a group of one
        centered = centered / (std[group] + epsilon)
    return centered


def reverse_kl_pg(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ratio_clip: float | None = None,
) -> torch.Tensor:
    """Importance-sampled policy-gradient loss per token: -rho_t * A_t.

    logprobs: (B, T) log pi_theta(y_t), with grad. old_logprobs, advantages: (B, T), detached here.
    rho = exp(logprobs - old_logprobs). With ratio_clip = C the importance weight is truncated
    (truncated IS): value and gradient use min(rho, C) in place of rho, so a token far off-policy
    still learns, with a bounded weight. With rho = 1 this is REINFORCE.
    """
    ratio = torch.exp(logprobs - old_logprobs.detach())
    if ratio_clip is not None:
        ratio = ratio * (ratio_clip / ratio).clamp(max=1.0).detach()
    return -ratio * advantages.detach()


def _kl(target_logp: torch.Tensor, input_logp: torch.Tensor) -> torch.Tensor:
    """KL(target || input) over the last axis from log-probs, with 0 * log 0 = 0.

    Entries where the target has zero probability (a -inf logit, e.g. a truncated or masked token)
    are selected away before the subtraction, so neither the value nor the gradient becomes NaN.
    """
    target_p = target_logp.exp()
    plain = (target_p * (target_logp - input_logp)).sum(-1)
    if bool(torch.isfinite(plain).all()):  # no -inf anywhere (the usual full-vocabulary case): done
        return plain
    support = target_p > 0
    log_ratio = torch.where(support, target_logp - torch.where(support, input_logp, 0.0), 0.0)
    return (target_p * log_ratio).sum(-1)


class _KLWithClosedFormGradient(torch.autograd.Function):
    """KL at each row between softmax(student logits) and the teacher, with the gradient with respect to
    the student's logits z computed in closed form during the forward pass:

        reverse, KL(p || q):  dKL/dz = p * (log p - log q - KL)
        forward, KL(q || p):  dKL/dz = p - q

    Autograd's chain through log_softmax, exp, the difference and the product makes and keeps several
    [n x V] tensors and walks each back again; here one [n x V] gradient is kept, and the backward only
    scales it. Inputs (n, V) fp32, teacher log-probs without gradient; output (n,).
    """

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logp: torch.Tensor, reverse: bool) -> torch.Tensor:
        student_logp = torch.log_softmax(student_logits, dim=-1)
        student_p = student_logp.exp()
        if reverse:
            log_ratio = student_logp.sub_(teacher_logp)  # reuses the log-prob buffer
            kl = torch.einsum("nv,nv->n", student_p, log_ratio)
            gradient = log_ratio.sub_(kl.unsqueeze(-1)).mul_(student_p)
        else:
            teacher_p = teacher_logp.exp()
            kl = torch.einsum("nv,nv->n", teacher_p, teacher_logp - student_logp)
            gradient = student_p.sub_(teacher_p)
        ctx.save_for_backward(gradient)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return gradient * grad_kl.unsqueeze(-1), None, None


def _fused_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, reverse: bool) -> torch.Tensor | None:
    """The closed-form KL, (..., V) -> (...), where it applies: a teacher without gradient and a finite
    result (a -inf logit needs _kl's 0 * log 0 = 0 care). None otherwise."""
    if teacher_logits.requires_grad:
        return None
    vocab = student_logits.shape[-1]
    teacher_logp = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    kl = _KLWithClosedFormGradient.apply(student_logits.float().reshape(-1, vocab), teacher_logp, reverse)
    return kl.view(student_logits.shape[:-1]) if bool(torch.isfinite(kl).all()) else None


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi_T || pi_theta) at each position. (..., V), (..., V) -> (...)."""
    fused = _fused_kl(student_logits, teacher_logits, reverse=False)
    if fused is not None:
        return fused
    return _kl(F.log_softmax(teacher_logits.float(), dim=-1), F.log_softmax(student_logits.float(), dim=-1))


def _log_one_minus_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurate at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_forward_kl(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """KL(pi_T || pi_theta) over the teacher's top-k tokens S plus one tail bucket for the rest, per
    position: sum_{i in S} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail), where
    p_tail = 1 - sum_S p_i and q_tail = 1 - sum_S q_i. The tail keeps the student from piling mass
    outside S unpunished; with k = V it is empty and this is the full forward KL.

    student_logits (..., V); teacher_ids, teacher_logprobs (..., K). Returns (...).
    """
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    teacher_top = teacher_logprobs.float()
    student_top = student_logp.gather(-1, teacher_ids)  # (..., K)
    head = (teacher_top.exp() * (teacher_top - student_top)).sum(-1)
    teacher_covered = teacher_top.logsumexp(-1).clamp(max=0.0)  # log sum_S p
    has_tail = teacher_covered < -1e-6  # below that the tail is rounding of the top-k's own mass
    # The student's tail straight from its log-probs outside S (not 1 - its mass on S, which rounds to 0
    # for a confident student); where there is no tail, zeros stand in so no -inf enters the graph.
    outside = student_logp.scatter(-1, teacher_ids, float("-inf"))
    outside = torch.where(has_tail.unsqueeze(-1), outside, torch.zeros_like(outside))
    student_tail_log = outside.logsumexp(-1)
    teacher_tail_log = _log_one_minus_exp(torch.where(has_tail, teacher_covered, torch.full_like(head, -1.0)))
    tail = teacher_tail_log.exp() * (teacher_tail_log - student_tail_log)
    return head + torch.where(has_tail, tail, torch.zeros_like(tail))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi_theta || pi_T) at each position. (..., V), (..., V) -> (...)."""
    fused = _fused_kl(student_logits, teacher_logits, reverse=True)
    if fused is not None:
        return fused
    return _kl(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1))


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD_beta with M = beta*pi_T + (1-beta)*pi_theta, per position. (..., V) -> (...).

    JSD_beta = beta * KL(pi_T || M) + (1 - beta) * KL(pi_theta || M), which tends to 0 at both ends.
    By GKD's convention the endpoints are the exact KLs instead: beta = 0 gives forward
    KL(pi_T || pi_theta), beta = 1 gives reverse KL(pi_theta || pi_T).
    """
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits)
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    # Where both models give probability 0, logaddexp(-inf, -inf) is -inf but its backward is NaN
    # (0/0), which would poison every gradient of the row: those entries are mixed from finite stand-ins
    # and set to -inf afterwards, outside the graph's reach.
    both_zero = torch.isneginf(student_logp) & torch.isneginf(teacher_logp)
    if bool(both_zero.any()):
        mixture_logp = torch.logaddexp(
            torch.where(both_zero, 0.0, teacher_logp) + math.log(beta),
            torch.where(both_zero, 0.0, student_logp) + math.log(1 - beta),
        )
        mixture_logp = mixture_logp.masked_fill(both_zero, float("-inf"))
    else:
        mixture_logp = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log(1 - beta))
    return beta * _kl(teacher_logp, mixture_logp) + (1 - beta) * _kl(student_logp, mixture_logp)


def reduce_tokens(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
    """Sum over masked tokens divided by num_tokens, the completion tokens of the whole step.

    Dividing every micro-batch by the same global count makes gradient accumulation exact: the sum of
    the micro-batch losses equals the loss of the whole step, whatever the micro-batch size.
    """
    return torch.where(mask.bool(), per_token, 0.0).sum() / num_tokens
