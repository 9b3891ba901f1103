"""From a scored batch to one optimizer step: micro-batched, chunked over completion tokens.

For each micro-batch (`StepBatch.select`, which trims every field alike) the student's hidden states are computed with
gradients once. Only the completion tokens inside the mask are then gathered (no LM head on padding or after EOS), and
the LM head, the log-probs and the loss run over chunks of `chunk_size` of those tokens, each chunk backpropagating
into a detached copy of the hidden states before the next is built (a sharded student recomputes each chunk in one
backward instead). At most one chunk of [chunk_size x V] logits is alive at a time, for the student and the teacher
alike, whatever the batch. The loss is normalized once, by the completion tokens of the whole step, so micro-batching
does not change the gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from opd.distributed.sharding import is_sharded, through_root
from opd.errors import TrainingDiverged
from opd.models.loading import LoadedModel
from opd.models.precision import Precision
from opd.objectives import losses
from opd.objectives.kinds import Objective
from opd.ops.batch import SOURCE_NAMES, STUDENT, StepBatch
from opd.ops.forward import completion_hidden_states_of, logits_from_hidden
from opd.ops.logprobs import entropy, process_logits
from opd.rollout.sampler import SamplingSettings
from opd.teachers.base import FullDistributionTeacher

if TYPE_CHECKING:
    from opd.train.setup import Session

FAR_LOG_RATIO = 0.1  # |log rho| above this (rho outside about [0.90, 1.11]) counts in ratio/far_fraction


@dataclass
class MicroBatchResult:
    loss: float  # this micro-batch's share of the step loss
    logprob_sums: torch.Tensor  # (3,) sums of the student's log-probs of its tokens, by source
    token_counts: torch.Tensor  # (3,) its tokens, by source
    far_tokens: int  # student-sampled tokens with |log rho| > FAR_LOG_RATIO
    max_abs_log_ratio: float
    entropy_sum: float  # of the sampling distribution at student-sampled tokens, where the update computed it


class _ChunkFigures:
    """What the update reports of a micro-batch's chunks: the student's log-probs by source, and the
    importance ratio where the student sampled."""

    def __init__(self):
        self.logprob_sums = torch.zeros(len(SOURCE_NAMES), dtype=torch.float64)
        self.token_counts = torch.zeros(len(SOURCE_NAMES))
        self.far_tokens, self.max_abs_log_ratio, self.entropy_sum = 0, 0.0, 0.0

    def add(self, chunk, logprobs: torch.Tensor, entropies: torch.Tensor | None = None) -> None:
        """entropies: (c,) of the sampling distribution at each token, where the sampler gave none."""
        logprobs, source = logprobs.detach(), chunk.source.cpu()
        self.logprob_sums.index_add_(0, source, logprobs.double().cpu())
        self.token_counts.index_add_(0, source, torch.ones(len(source)))
        sampled = chunk.source == STUDENT  # rho means something only where the student drew the token
        if bool(sampled.any()):
            log_ratio = (logprobs[sampled] - chunk.sampler_logprobs[sampled]).abs()  # (c_student,)
            self.far_tokens += int((log_ratio > FAR_LOG_RATIO).sum())
            self.max_abs_log_ratio = max(self.max_abs_log_ratio, float(log_ratio.max()))
            if entropies is not None:
                self.entropy_sum += float(entropies[sampled].double().sum())

    def result(self, loss: float) -> MicroBatchResult:
        return MicroBatchResult(
            loss, self.logprob_sums, self.token_counts, self.far_tokens, self.max_abs_log_ratio, self.entropy_sum
        )


def backward_micro_batch(
    student: LoadedModel,
    teacher: FullDistributionTeacher | None,
    part: StepBatch,
    objective: Objective,
    step_tokens: float,
    chunk_size: int,
    precision: Precision,
    sampling: SamplingSettings | None = None,
) -> MicroBatchResult:
    """Accumulate the gradient of one micro-batch's share of the step loss.

    part: the micro-batch, already selected from the step's batch. step_tokens: the completion tokens
    of the whole step, the one normalizer, so the shares add up to the step loss. sampling: where the
    sampler recorded no entropy (vLLM), the settings to compute it under from these logits instead.
    """
    figures = _ChunkFigures()

    def hidden_states() -> torch.Tensor:  # (b, T, H)
        with precision.autocast():
            return completion_hidden_states_of(
                student.model,
                part.prompt_ids,
                part.prompt_mask,
                part.completion_ids,
                part.completion_mask,
                part.prompt_index,
            )

    def chunk_loss(flat_hidden: torch.Tensor, flat_index: torch.Tensor):
        """The chunk's share of the step loss, the student's log-probs of its tokens (c,), and where asked
        the entropy of its sampling distribution there (c,), else None."""
        with precision.autocast():
            logits = logits_from_hidden(student.model, flat_hidden, student.vocab_size)  # (c, V)
        chunk = part.tokens_at(flat_index)
        per_token, logprobs = objective.per_token(logits, chunk, teacher)  # (c,), (c,)
        every = torch.ones_like(per_token, dtype=torch.bool)  # the chunk holds only tokens inside the mask
        return losses.reduce_tokens(per_token, every, step_tokens), logprobs, sampling_entropy(logits, chunk, sampling)

    if is_sharded(student.model):
        return _backward_through_root(student, part, hidden_states, chunk_loss, chunk_size, figures)
    hidden = hidden_states()
    hidden_leaf = hidden.detach().requires_grad_()
    flat_hidden = hidden_leaf.flatten(0, 1)  # (b*T, H)
    total = 0.0
    for flat_index in part.token_chunks(chunk_size):  # (c,) flat indices of completion tokens
        loss, logprobs, entropies = chunk_loss(flat_hidden[flat_index], flat_index)
        loss.backward()  # frees this chunk's logits before the next chunk's are built
        total += loss.item()
        figures.add(part.tokens_at(flat_index), logprobs, entropies)
    if hidden_leaf.grad is not None:  # None when the micro-batch holds no completion token
        hidden.backward(hidden_leaf.grad)
    return figures.result(total)


def _backward_through_root(student, part, hidden_states, chunk_loss, chunk_size, figures) -> MicroBatchResult:
    """A sharded student: the micro-batch's whole loss inside the root's forward, then one backward.

    Its LM head (perhaps tied to the embeddings) is gathered by the root for the forward and again for
    the backward, and can't be called chunk by chunk outside it; instead each chunk's logits are
    recomputed in the backward (activation checkpointing), so one chunk of logits is alive at a time
    here too, for one more LM-head forward per chunk. Every rank runs the backward, tokens or not:
    FSDP2's gradient reduce-scatter is a collective.
    """

    def loss_inside_root() -> torch.Tensor:
        flat_hidden = hidden_states().flatten(0, 1)  # (b*T, H)
        # Tied to every parameter, the LM head's included, even on a rank without tokens: FSDP2 reduce-scatters
        # the gradients that exist, and every rank must send the same ones.
        head = student.model.get_output_embeddings().parameters()
        total = 0 * flat_hidden.sum() + sum(0 * parameter.sum() for parameter in head)
        for flat_index in part.token_chunks(chunk_size):
            loss, logprobs, entropies = checkpoint(chunk_loss, flat_hidden[flat_index], flat_index, use_reentrant=False)
            total = total + loss
            figures.add(part.tokens_at(flat_index), logprobs, entropies)
        return total

    total = through_root(student.model, loss_inside_root)
    total.backward()
    return figures.result(float(total.detach()))


def sampling_entropy(logits: torch.Tensor, chunk, sampling: SamplingSettings | None) -> torch.Tensor | None:
    """(c,) entropy of the distribution the sampler drew each token from (temperature, top-k, top-p of
    these logits, the token kept in the support as the loss keeps it); None without settings."""
    if sampling is None:
        return None
    with torch.no_grad():
        processed = process_logits(
            logits.detach(), sampling.temperature, sampling.top_k, sampling.top_p, keep=chunk.tokens
        )
        return entropy(processed)


def update_student(session: Session, batch: StepBatch) -> dict[str, float]:
    """The objective's per-step preparation, loss and backward over micro-batches, clipping, one AdamW step.

    batch: the step's scored batch. Returns loss, grad_norm, lr, the
    student's mean log-prob of each source's tokens (student_logprob/SOURCE), and where the student
    sampled the importance-ratio figures ratio/far_fraction and ratio/max_abs_log, all over every rank.
    Raises TrainingDiverged, before touching the weights, when the loss or gradient norm is not finite:
    both are global, so every rank stops at the same step.
    """
    world, config = session.world, session.config
    batch = session.objective.prepare(batch)
    session.optimizer.zero_grad(set_to_none=True)
    micro = config.batch.micro_batch_size
    step_tokens = world.sum(batch.num_tokens)  # every rank's tokens: the one normalizer of the step
    # FSDP2's reduce-scatter averages over ranks: dividing by step_tokens / world size makes it the sum.
    normalizer = step_tokens / world.size if session.sharded else step_tokens
    # An engine that gives no entropy of the distribution it sampled from (vLLM): the update sees the same one
    # (up to numerics). Decided by the engine, not the batch, so that every rank makes the same collectives.
    sampling = None if session.rollouts.gives_entropy else SamplingSettings.of(config.rollout)
    results = []
    for row in range(0, len(batch), micro):
        part = batch.select(slice(row, row + micro))
        results.append(
            backward_micro_batch(
                session.student,
                session.teacher,
                part,
                session.objective,
                normalizer,
                session.chunk_size,
                session.precision,
                sampling,
            )
        )
    if not session.sharded:  # FSDP2 already reduce-scattered the sharded gradients
        world.sum_gradients(session.student.model.parameters())
    loss = world.sum(sum(result.loss for result in results)) * normalizer / step_tokens
    parameters = [parameter for parameter in session.student.model.parameters() if parameter.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(parameters, config.optim.max_grad_norm or math.inf)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingDiverged(f"loss={loss} grad_norm={grad_norm} is not finite; stopped without applying the update")
    lr = session.scheduler.get_last_lr()[0]
    session.optimizer.step()
    session.scheduler.step()
    logprob_sums = world.sum_tensor(sum(result.logprob_sums for result in results))
    token_counts = world.sum_tensor(sum(result.token_counts for result in results))
    figures = {"loss": loss, "grad_norm": grad_norm, "lr": lr}
    for source, name in SOURCE_NAMES.items():
        if token_counts[source]:  # the student's mean log-prob of the tokens this source wrote
            figures[f"student_logprob/{name}"] = float(logprob_sums[source] / token_counts[source])
    if token_counts[STUDENT]:
        figures["ratio/far_fraction"] = world.sum(sum(result.far_tokens for result in results)) / float(
            token_counts[STUDENT]
        )
        figures["ratio/max_abs_log"] = world.max(max(result.max_abs_log_ratio for result in results))
        if sampling is not None:
            figures["entropy/student"] = world.sum(sum(result.entropy_sum for result in results)) / float(
                token_counts[STUDENT]
            )
    return figures
