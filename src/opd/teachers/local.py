"""A teacher in this process: a Hugging Face model run without gradients, scoring in chunks."""

from __future__ import annotations

import torch

from opd.distributed.sharding import through_root
from opd.models.loading import LoadedModel, load_model
from opd.models.precision import Precision
from opd.ops.batch import StepBatch
from opd.ops.flops import forward_flops, matmul_parameters
from opd.ops.forward import completion_hidden_states_of, logits_from_hidden
from opd.ops.logprobs import token_logprobs_and_entropy, tokens_per_chunk
from opd.teachers.base import TeacherScores


def load_teacher(
    path: str,
    key: str,
    precision: Precision,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    trust_remote_code: bool = False,
    top_k: int = 0,
) -> LocalTeacher:
    """A teacher in this process: weights in bf16 under bf16 (it has no optimizer), logits in chunks of
    `chunk_size` tokens (None: 64 MiB fp32 blocks at its vocabulary)."""
    loaded = load_model(path, key, precision.device, trust_remote_code, dtype=precision.frozen_weights_dtype)
    return LocalTeacher(loaded, temperature, tokens_per_chunk(chunk_size, loaded.vocab_size), precision, top_k)


class LocalTeacher:
    """A Hugging Face model in this process, run without gradients: a FullDistributionTeacher.

    One forward over (prompt, completion), each prompt encoded once for all its samples, yields
    hidden states of the completion positions only; the LM head then runs over chunks of them
    (`scores_from_hidden`).
    """

    def __init__(self, loaded: LoadedModel, temperature: float, chunk_size: int, precision: Precision, top_k: int = 0):
        """top_k: also give the teacher's top-k log-probs at every completion position."""
        self.loaded = loaded
        self.top_k = top_k
        self.name = loaded.path
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.precision = precision
        loaded.model.eval()
        loaded.model.requires_grad_(False)
        self._matmul_parameters = matmul_parameters(loaded.model)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def hidden_size(self) -> int:
        return self.loaded.hidden_size

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            raw = logits_from_hidden(self.loaded.model, hidden, self.loaded.vocab_size)
        return raw.float() / self.temperature

    @torch.no_grad()
    def score(self, batch: StepBatch, keep_hidden: bool = False) -> TeacherScores:
        # A sharded teacher (teacher.shard) runs all of it inside its root's forward, which gathers its LM head.
        return through_root(self.loaded.model, lambda: self._score(batch, keep_hidden))

    def _score(self, batch: StepBatch, keep_hidden: bool) -> TeacherScores:
        with self.precision.autocast():
            hidden = completion_hidden_states_of(
                self.loaded.model,
                batch.prompt_ids,
                batch.prompt_mask,
                batch.completion_ids,
                batch.completion_mask,
                batch.prompt_index,
            )  # (B, T, H)
        scores = scores_from_hidden(hidden, batch, self.logits, self.chunk_size, self.top_k, keep_hidden)
        scores.flops = forward_flops(self._matmul_parameters, batch)
        return scores


def scores_from_hidden(
    hidden: torch.Tensor, batch: StepBatch, logits, chunk_size: int, top_k: int, keep_hidden: bool
) -> TeacherScores:
    """A teacher's scores from its final hidden states at the completion positions, hidden (B, T, H):
    `logits` (c, H) -> (c, V) at its temperature runs over chunks of `chunk_size` completion tokens
    (padding skipped), so [B x T x V] logits never exist at once. A local teacher's, and a served
    teacher's whose hidden states come over the wire (opd.teachers.hidden_states)."""
    flat_hidden, flat_tokens = hidden.flatten(0, 1), batch.completion_ids.flatten()
    flat_logprobs = torch.zeros(flat_tokens.shape, device=hidden.device)  # (B*T,)
    flat_entropy = torch.zeros(flat_tokens.shape, device=hidden.device)  # (B*T,)
    k = top_k
    flat_topk_ids = torch.zeros(*flat_tokens.shape, k, dtype=torch.long, device=hidden.device)  # (B*T, K)
    flat_topk_logprobs = torch.zeros(*flat_tokens.shape, k, device=hidden.device)  # (B*T, K)
    for chunk in batch.token_chunks(chunk_size):  # (c,) flat indices
        chunk_logits = logits(flat_hidden[chunk])  # (c, V)
        flat_logprobs[chunk], flat_entropy[chunk] = token_logprobs_and_entropy(chunk_logits, flat_tokens[chunk])
        if k:
            flat_topk_logprobs[chunk], flat_topk_ids[chunk] = chunk_logits.log_softmax(-1).topk(k, dim=-1)
    shape = batch.completion_ids.shape
    topk = (flat_topk_ids.view(*shape, k), flat_topk_logprobs.view(*shape, k)) if k else (None, None)
    return TeacherScores(
        logprobs=flat_logprobs.view(shape),
        hidden=hidden if keep_hidden else None,
        entropy=flat_entropy.view(shape),  # (B, T) each, 0 outside the mask
        topk_ids=topk[0],
        topk_logprobs=topk[1],  # (B, T, K) each
    )
