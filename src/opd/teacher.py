"""Teacher scoring: per-token log-probs of exactly the tokens the student sampled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from opd.losses import token_logprobs
from opd.models import LoadedModel, completion_hidden_states_of, logits_from_hidden
from opd.rollout import Rollouts


@dataclass
class TeacherScores:
    """logprobs: (B, T) ℓᵀ of the sampled tokens, 0 outside the completion mask.
    hidden: (B, T, H) final hidden states, kept only when a full-vocabulary loss needs them."""

    logprobs: torch.Tensor
    hidden: torch.Tensor | None = None


class Teacher(Protocol):
    def score(self, rollouts: Rollouts, keep_hidden: bool = False) -> TeacherScores: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class LocalTeacher:
    """A Hugging Face model in this process, run without gradients.

    One forward over (prompt, completion), each prompt encoded once for all its samples, yields
    hidden states of the completion positions only;
    the LM head then runs over chunks of `chunk_size` completion tokens (padding skipped), so the
    teacher's [B x T x V] logits never exist at once.
    """

    def __init__(
        self,
        teacher: LoadedModel,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.teacher = teacher
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.autocast_dtype = autocast_dtype
        teacher.model.eval()
        teacher.model.requires_grad_(False)

    def _autocast(self):
        device_type = next(self.teacher.model.parameters()).device.type
        return torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None)

    @property
    def model(self) -> torch.nn.Module:
        return self.teacher.model

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) at the teacher's temperature."""
        with self._autocast():
            raw = logits_from_hidden(self.teacher.model, hidden, self.teacher.vocab_size)
        return raw.float() / self.temperature

    @torch.no_grad()
    def score(self, rollouts: Rollouts, keep_hidden: bool = False) -> TeacherScores:
        with self._autocast():
            hidden = completion_hidden_states_of(self.teacher.model, rollouts)  # (B, T, H)
        flat_hidden, flat_tokens = hidden.flatten(0, 1), rollouts.completion_ids.flatten()
        flat_logprobs = torch.zeros(flat_tokens.shape, device=hidden.device)  # (B*T,)
        for chunk in rollouts.token_chunks(self.chunk_size):  # (c,) flat indices
            flat_logprobs[chunk] = token_logprobs(self.logits(flat_hidden[chunk]), flat_tokens[chunk])
        logprobs = flat_logprobs.view(rollouts.completion_ids.shape)  # (B, T), 0 outside the mask
        return TeacherScores(logprobs=logprobs, hidden=hidden if keep_hidden else None)
