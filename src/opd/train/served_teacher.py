"""A teacher on a server writing rollouts: GKD's mixture, lambda auto's far start or sequence-level KD
(`rollout.source: teacher`) with `teacher.url` (`opd serve-teacher` or `vllm serve`). It joins a teacher
(opd.teachers) to the rollouts' Sampler protocol (opd.rollout), a layer below both.

Each prompt's samples are drawn by the server through its completions API (opd.teachers.remote
.RemoteTeacher.sample), from the prompt's own random stream: on opd's server the very draws opd's
sampler makes in the trainer's process, so a served teacher writes the rows a local one would (up to
the numerics of how prompts are batched); vLLM gets each prompt's stream seed instead. Rows stop at
the student's stop tokens as well as the teacher's own, here and in the trainer's process alike.
"""

from __future__ import annotations

import torch

from opd.data.prompts import PromptBatch
from opd.ops.batch import TEACHER, StepBatch
from opd.rollout.sampler import SamplingSettings, listed_completions_batch, stream_seed
from opd.teachers.remote import RemoteTeacher
from opd.teachers.server_apis import Draw


class ServedTeacherSampler:
    """A Sampler (opd.rollout.sampler) whose rows the teacher's server samples."""

    source = TEACHER
    gives_entropy = False  # the server sends the sampled tokens' log-probs only

    def __init__(
        self, teacher: RemoteTeacher, settings: SamplingSettings, stop_ids: list[int], pad_id: int, device: torch.device
    ):
        self.teacher, self.settings = teacher, settings
        self.stop_ids, self.pad_id, self.device = list(stop_ids), pad_id, device

    def sampling_flops(self, batch: StepBatch) -> float:
        return 0.0  # spent on the server, whose model this process doesn't hold

    def sync_weights(self, version: int) -> None:
        return None  # the teacher doesn't train

    def close(self) -> None:
        return None  # the teacher's client closes with the teacher

    def sample(self, prompts: PromptBatch, samples_per_prompt: int, seed: int) -> StepBatch:
        settings = self.settings
        draw = Draw(
            samples=samples_per_prompt,
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=seed,
            keys=tuple(prompts.keys),
            stream_seeds=tuple(stream_seed(seed, key) for key in prompts.keys),
            stop_ids=tuple(self.stop_ids),
        )
        rows = [self._cut(*sample) for each in self.teacher.sample(prompts.token_ids, draw) for sample in each]
        batch = listed_completions_batch(
            prompts, samples_per_prompt, [row[:2] for row in rows], self.pad_id, self.stop_ids, self.device, TEACHER
        )
        # Finished where a stop token ended the row: the student's, or one of the teacher's own (the server's).
        return batch.replace(finished=torch.tensor([row[2] for row in rows], device=self.device))

    def _cut(self, ids: list[int], logprobs: list[float], stopped: bool) -> tuple[list[int], list[float], bool]:
        """The row up to and including its first stop token of the student's, at most max_new_tokens
        long, and whether a stop token ended it."""
        length = min(len(ids), self.settings.max_new_tokens)
        stops = set(self.stop_ids)
        end = next((position + 1 for position, token in enumerate(ids[:length]) if token in stops), None)
        if end is not None:
            return ids[:end], logprobs[:end], True
        return ids[:length], logprobs[:length], stopped and len(ids) <= length
