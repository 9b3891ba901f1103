"""Who writes a step's completions: the configured source, or GKD's mixture of the student's own samples
with the teacher's samples or the data's answers (Agarwal et al., "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", ICLR 2024: the student-data fraction lambda)."""

from __future__ import annotations

from typing import Callable

import torch

from opd.config.schema import Config
from opd.data.prompts import PromptBatch, PromptSet
from opd.models.loading import LoadedModel
from opd.models.precision import Precision
from opd.ops.batch import TEACHER, StepBatch
from opd.rollout.answers import DatasetAnswers
from opd.rollout.sampler import GroupsDone, ModelSampler, Sampler, SamplingSettings


class RolloutMix:
    """`primary` writes a step's completions; with a `secondary` and lambda(step) < 1, the primary (the
    student) takes the first round(lambda * prompts) prompts of the whole step (by stream position, over
    every rank) and the secondary the rest, so each prompt's samples stay together (one shared prompt
    encoding) and the split is the same whatever the world size. Without a secondary this is exactly
    the primary. A rank with none of the step's prompts for a sampler whose sampling is a collective
    (`samples_together`: a sharded student) joins the ranks that sample with it.

    Whether the batch carries `sampler_entropy` is the primary's (`gives_entropy`), on every rank alike,
    whichever sources a rank's share of the step drew from: the update decides from it whether to
    compute the student's entropy, a collective."""

    def __init__(
        self,
        primary: Sampler,
        secondary: Sampler | None = None,
        student_fraction: Callable[[int], float] = lambda step: 1.0,
        pad_id: int = 0,
    ):
        self.primary, self.secondary = primary, secondary
        self.student_fraction, self.pad_id = student_fraction, pad_id
        self.gives_entropy = primary.gives_entropy
        # Hands finished prompt groups over as they finish (GroupsDone): the student's own sampler, alone.
        self.streams = secondary is None and getattr(primary, "streams", False)
        # The student's engine runs on servers (a fault there is a server's restart to recover from), and
        # with no other writer the whole mix samples with none of the trainer's devices or collectives.
        self.remote = getattr(primary, "samples_elsewhere", False)
        self.samples_elsewhere = self.remote and secondary is None

    def sync_weights(self, version: int) -> float | None:
        """The student's engine brought up to the policy's weights (see Sampler.sync_weights)."""
        return self.primary.sync_weights(version)

    def close(self) -> None:
        for sampler in filter(None, (self.primary, self.secondary)):
            sampler.close()

    def sample(
        self,
        prompts: PromptBatch,
        samples_per_prompt: int,
        seed: int,
        step: int,
        step_keys: range | None = None,
        on_groups: GroupsDone | None = None,
    ) -> StepBatch:
        """step_keys: the keys of the whole step's prompts, every rank's (default: this batch's). on_groups:
        where `streams`, called with each prompt group as it finishes."""
        if on_groups is not None and not self.streams:
            raise ValueError("these rollouts do not hand over prompt groups as they finish")
        if self.secondary is None:
            if on_groups is not None:
                return self.primary.sample(prompts, samples_per_prompt, seed, on_groups)
            return self.primary.sample(prompts, samples_per_prompt, seed)
        step_keys = step_keys if step_keys is not None else range(min(prompts.keys), max(prompts.keys) + 1)
        student_count = int(self.student_fraction(step) * len(step_keys) + 0.5)
        # This rank's keys rise through the step, so its student prompts are a prefix of its share.
        own, others = prompts.split(sum(key < step_keys.start + student_count for key in prompts.keys))
        parts = []
        for sampler, part, step_share in (
            (self.primary, own, student_count),
            (self.secondary, others, len(step_keys) - student_count),
        ):
            if len(part):
                parts.append(sampler.sample(part, samples_per_prompt, seed))
            elif step_share and getattr(sampler, "samples_together", False):
                sampler.join()  # another rank samples with it: pair its collectives
        # Entropy is read at the student's rows only: other rows get zeros where the student's engine gives it.
        parts = [
            part.replace(
                sampler_entropy=(
                    None
                    if not self.gives_entropy
                    else part.sampler_entropy
                    if part.sampler_entropy is not None
                    else torch.zeros_like(part.sampler_logprobs)
                )
            )
            for part in parts
        ]
        return StepBatch.concat(parts, self.pad_id)

    def sampling_flops(self, batch: StepBatch) -> float:
        if self.secondary is None:
            return self.primary.sampling_flops(batch)
        total = 0.0
        for sampler in (self.primary, self.secondary):
            rows = batch.rows_from(sampler.source)
            if len(rows):
                total += sampler.sampling_flops(batch.select(rows))
        return total


def build_rollouts(
    config: Config,
    student_sampler: Sampler,
    teacher: LoadedModel | Sampler | None,
    prompts: PromptSet,
    tokenizer,
    precision: Precision,
    stop_ids: list[int],
) -> RolloutMix:
    """Who writes the training completions: `rollout.source` (the student's sampler, from its engine; the
    teacher `teacher`: its model here, or a Sampler of its server's; or the data set's answers, tokenized
    by the student's `tokenizer`), and with GKD's lambda below 1 the student mixed with
    `rollout.off_policy_source`. stop_ids: the student's stop tokens, which end the teacher's rows too."""

    def source(name: str) -> Sampler:
        if name == "student":
            return student_sampler
        if name == "teacher" and not isinstance(teacher, LoadedModel):
            return teacher  # a teacher's server, as a Sampler of its own (opd.train.served_teacher)
        if name == "teacher":  # its rows end where the teacher's or the student's stop tokens end them
            settings = SamplingSettings.of(config.rollout)
            return ModelSampler(teacher, settings, precision, source=TEACHER, extra_stop_ids=tuple(stop_ids))
        return DatasetAnswers(prompts, tokenizer, config.rollout.max_new_tokens, precision.device)

    secondary = source(config.rollout.off_policy_source) if config.mixed else None
    return RolloutMix(source(config.rollout.source), secondary, config.student_fraction_at, tokenizer.pad_token_id)
