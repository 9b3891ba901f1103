"""The training objectives: `loss.kind` mapped once, in setup, to one object.

Each objective prepares the step's batch (advantages) and turns one chunk of completion tokens into
per-token loss values. What it needs from the teacher is declared once, in
opd.config.capabilities.KIND_NEEDS, which the config checks and the trainer read. The update's chunk
loop and the trainer never look at the kind. Adding a loss means adding one class here, one entry in
`OBJECTIVES`, its entry in `KIND_NEEDS`, and its reference test. A step that mixes the student's
samples with someone else's (GKD's lambda) trains each row with the objective for its source
(`BySource`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Protocol

import torch

from opd.config.schema import Config
from opd.objectives import losses
from opd.ops.batch import STUDENT, StepBatch, TokenChunk
from opd.ops.logprobs import process_logits, token_logprobs
from opd.teachers.base import FullDistributionTeacher


class Objective(Protocol):
    def prepare(self, batch: StepBatch) -> StepBatch:
        """The batch with whatever this objective computes once per step (advantages)."""
        ...

    def per_token(
        self, student_logits: torch.Tensor, chunk: TokenChunk, teacher: FullDistributionTeacher | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """student_logits (c, V) with grad, at the chunk's positions. Returns per-token loss values (c,)
        and the student's log-probs of the chunk's tokens (c,) under the objective's processing."""
        ...


class PolicyGradient:
    """`reverse_kl_pg`: -rho_t * A_t with A_t = -c * sum_j gamma^(j-t) (ℓˢ_j - ℓᵀ_j), log pi_theta taken
    under the sampler's temperature and truncation (the sampled token always inside the support).

    With forward_kl_coef = w > 0, plus w * KL(pi_T || pi_theta) at every position of the same samples: a
    mass-covering term that keeps the student's probability wherever the teacher's is, which the
    sampled-token reward alone does not (it can settle on one high-reward token and lose the rest).
    Exact from the teacher's hidden states; from its top-k and a tail bucket where a server sends only
    that (topk_forward_kl's estimate).

    With a task reward (`reward:`), each completion's group-normalized reward times reward_coef is
    added to the advantage of every one of its tokens. With kl_coef = 0 the teacher is not read at all
    (pure RL; a teacher, where given, only adds metrics).

    With recompute (loss.advantage_logprobs: current, for batches sampled by older weights), the
    reverse-KL advantage takes the student's log-prob under the weights being updated, -c * (ℓθ_t - ℓᵀ_t)
    with ℓθ detached, instead of the sampler's ℓˢ_t; rho still reweights from the sampler's distribution
    (docs/math_and_metrics.md). Per token only (discount 0, the student's tokenizer): the config sees to it.
    """

    def __init__(
        self,
        temperature: float,
        top_k: int,
        top_p: float,
        ratio_clip: float | None,
        kl_coef: float,
        discount: float,
        forward_kl_coef: float = 0.0,
        reward_coef: float = 0.0,
        reward_scale_by_std: bool = False,
        recompute: bool = False,
    ):
        if recompute and discount:
            raise ValueError("the recomputed advantage is per token: it takes discount 0")
        self.recompute = recompute
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.ratio_clip, self.kl_coef, self.discount = ratio_clip, kl_coef, discount
        self.forward_kl_coef, self.reward_coef, self.reward_scale_by_std = (
            forward_kl_coef,
            reward_coef,
            reward_scale_by_std,
        )

    def prepare(self, batch: StepBatch) -> StepBatch:
        mask = batch.completion_mask
        if self.recompute and batch.chunk_index is not None:
            raise ValueError("the recomputed advantage is per token: a teacher of another tokenizer scores chunks")
        if (not self.kl_coef and self.reward_coef) or self.recompute:  # recompute: the KL part comes in per_token
            advantages = torch.zeros(mask.shape, device=mask.device)  # (B, T)
        elif batch.chunk_index is not None:  # a teacher of another tokenizer: one advantage per chunk
            advantages = losses.chunk_advantages(
                batch.sampler_logprobs, batch.teacher_logprobs, batch.chunk_index, mask, self.kl_coef, self.discount
            )  # (B, T)
        else:
            advantages = losses.discounted_advantages(
                batch.sampler_logprobs, batch.teacher_logprobs, mask, self.kl_coef, self.discount
            )  # (B, T)
        if self.reward_coef:
            rewarded = losses.group_advantages(batch.rewards, batch.prompt_index, self.reward_scale_by_std)  # (B,)
            advantages = advantages + self.reward_coef * rewarded.unsqueeze(1) * mask
        return batch.replace(advantages=advantages)

    def per_token(self, student_logits, chunk, teacher):
        processed = process_logits(student_logits, self.temperature, self.top_k, self.top_p, keep=chunk.tokens)
        logprobs = token_logprobs(processed, chunk.tokens)  # (c,)
        advantages = chunk.advantages
        if self.recompute and self.kl_coef:
            advantages = advantages - self.kl_coef * (logprobs.detach() - chunk.teacher_logprobs)
        values = losses.reverse_kl_pg(logprobs, chunk.sampler_logprobs, advantages, self.ratio_clip)
        if self.forward_kl_coef:  # processed == logits / T here: the config requires no truncation
            if chunk.teacher_hidden is not None:
                term = losses.forward_kl(processed, teacher.logits(chunk.teacher_hidden))
            else:  # a server's top-k without the head here (opd.config.capabilities.forward_kl_term_need)
                term = losses.topk_forward_kl(processed, chunk.teacher_topk_ids, chunk.teacher_topk_logprobs)
            values = values + self.forward_kl_coef * term
        return values, logprobs


class Divergence:
    """`forward_kl`, `reverse_kl`, `jsd`: the exact divergence between the student's distribution at the
    sampling temperature and the teacher's at its own, at every completion position."""

    def __init__(self, divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], temperature: float):
        self.divergence, self.temperature = divergence, temperature

    def prepare(self, batch: StepBatch) -> StepBatch:
        return batch

    def per_token(self, student_logits, chunk, teacher):
        scaled = process_logits(student_logits, self.temperature)  # (c, V) fp32
        values = self.divergence(scaled, teacher.logits(chunk.teacher_hidden))
        return values, token_logprobs(scaled, chunk.tokens)


class TopKForwardKL:
    """`topk_forward_kl`: the forward KL over the teacher's top-k tokens plus a tail bucket, at every
    completion position, the student at the sampling temperature. Needs only the teacher's top-k
    log-probs, which a server sends."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def prepare(self, batch: StepBatch) -> StepBatch:
        return batch

    def per_token(self, student_logits, chunk, teacher):
        scaled = process_logits(student_logits, self.temperature)  # (c, V) fp32
        values = losses.topk_forward_kl(scaled, chunk.teacher_topk_ids, chunk.teacher_topk_logprobs)
        return values, token_logprobs(scaled, chunk.tokens)


class NegativeLogLikelihood:
    """`sft`: -log pi_theta(y_t) at temperature 1 on someone else's tokens (the teacher's samples or the
    data set's answers)."""

    def prepare(self, batch: StepBatch) -> StepBatch:
        return batch

    def per_token(self, student_logits, chunk, teacher):
        logprobs = token_logprobs(student_logits, chunk.tokens)  # (c,)
        return -logprobs, logprobs


class BySource:
    """GKD's mixture: the student's own samples train with the on-policy objective, every other row (the
    teacher's samples, the data's answers) with the off-policy one, all in one step normalized by all
    of its tokens."""

    def __init__(self, on_policy: Objective, off_policy: Objective):
        self.on_policy, self.off_policy = on_policy, off_policy

    def prepare(self, batch: StepBatch) -> StepBatch:
        return self.off_policy.prepare(self.on_policy.prepare(batch))

    def per_token(self, student_logits, chunk, teacher):
        on = chunk.source == STUDENT  # (c,)
        values = student_logits.new_zeros(on.shape)
        logprobs = student_logits.new_zeros(on.shape)
        for objective, rows in ((self.on_policy, on), (self.off_policy, ~on)):
            if bool(rows.any()):
                part_values, part_logprobs = objective.per_token(student_logits[rows], chunk.subset(rows), teacher)
                values = values.index_put((rows,), part_values.to(values.dtype))
                logprobs = logprobs.index_put((rows,), part_logprobs.detach().to(logprobs.dtype))
        return values, logprobs


OBJECTIVES: dict[str, Callable[[Config], Objective]] = {
    "reverse_kl_pg": lambda config: PolicyGradient(
        config.rollout.temperature,
        config.rollout.top_k,
        config.rollout.top_p,
        config.loss.ratio_clip,
        config.loss.kl_coef,
        config.loss.discount,
        config.loss.forward_kl_coef,
        config.reward.coef if config.reward else 0.0,
        bool(config.reward and config.reward.normalize == "mean_std"),
        config.loss.advantage_logprobs == "current",
    ),
    "topk_forward_kl": lambda config: TopKForwardKL(config.rollout.temperature),
    "forward_kl": lambda config: Divergence(losses.forward_kl, config.rollout.temperature),
    "reverse_kl": lambda config: Divergence(losses.reverse_kl, config.rollout.temperature),
    "jsd": lambda config: Divergence(
        partial(losses.generalized_jsd, beta=config.loss.jsd_beta), config.rollout.temperature
    ),
    "sft": lambda config: NegativeLogLikelihood(),
}


def build_objective(config: Config) -> Objective:
    """The objective of `loss.kind`, by source when the run mixes in someone else's rows. config: the
    resolved config (opd.config.resolve), whose loss.forward_kl_coef is settled."""
    if config.loss.forward_kl_coef is None:
        raise ValueError("build_objective takes a resolved config (loss.forward_kl_coef is still null)")
    objective = OBJECTIVES[config.loss.kind](config)
    if config.mixed:
        objective = BySource(objective, OBJECTIVES[config.off_policy_loss](config))
    return objective
