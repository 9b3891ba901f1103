"""Who writes a step's completions: the configured source, or GKD's mixture of the student's own samples
with the teacher's samples or the data's answers (Agarwal et al., "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", ICLR 2024: the student-data fraction lambda)."""

from __future__ import annotations

from typing import Callable


from opd.config.schema import Config
from opd.data.prompts import PromptBatch, PromptSet
from opd.models.loading import LoadedModel
from opd.models.precision import Precision
from opd.ops.batch import TEACHER, StepBatch
from opd.rollout.answers import DatasetAnswers
from opd.rollout.sampler import ModelSampler, Sampler, SamplingSettings


class RolloutMix:
    """`primary` writes a step's completions; with a `secondary` and lambda(step) < 1, the primary (the
    student) takes the first round(lambda * prompts) prompts of the whole step (by stream position, over
    every rank) and the secondary the rest, so each prompt's samples stay together (one shared prompt
    encoding) and the split is the same whatever the world size. Without a secondary this is exactly
    the primary."""

    def __init__(self, primary: Sampler, secondary: Sampler | None = None,
                 student_fraction: Callable[[int], float] = lambda step: 1.0, pad_id: int = 0):
        self.primary, self.secondary = primary, secondary
        self.student_fraction, self.pad_id = student_fraction, pad_id

    def sample(self, prompts: PromptBatch, samples_per_prompt: int, seed: int, step: int,
               step_keys: range | None = None) -> StepBatch:
        """step_keys: the keys of the whole step's prompts, every rank's (default: this batch's)."""
        if self.secondary is None:
            return self.primary.sample(prompts, samples_per_prompt, seed)
        step_keys = step_keys if step_keys is not None else range(min(prompts.keys), max(prompts.keys) + 1)
        student_count = int(self.student_fraction(step) * len(step_keys) + 0.5)
        # This rank's keys rise through the step, so its student prompts are a prefix of its share.
        own, others = prompts.split(sum(key < step_keys.start + student_count for key in prompts.keys))
        parts = [sampler.sample(part, samples_per_prompt, seed)
                 for sampler, part in ((self.primary, own), (self.secondary, others)) if len(part)]
        if len(own) and parts[0].sampler_entropy is None:  # vLLM's student rows: the update computes it for them
            parts = [part.replace(sampler_entropy=None) for part in parts]
        return StepBatch.concat(parts, self.pad_id)

    @property
    def weight_sync_s(self) -> float | None:
        """Seconds the last rollout spent copying the student's weights into its engine (vLLM), else None."""
        return getattr(self.primary, "last_sync_s", None)

    def sampling_flops(self, batch: StepBatch) -> float:
        if self.secondary is None:
            return self.primary.sampling_flops(batch)
        total = 0.0
        for sampler in (self.primary, self.secondary):
            rows = batch.rows_from(sampler.source)
            if len(rows):
                total += sampler.sampling_flops(batch.select(rows))
        return total


def build_rollouts(config: Config, student_sampler: Sampler, teacher: LoadedModel | None, prompts: PromptSet,
                   precision: Precision) -> RolloutMix:
    """Who writes the training completions: `rollout.source` (the student's sampler, opd's or vLLM's, with
    its `policy`; the teacher model or the data),
    and with GKD's lambda below 1 the student mixed with `rollout.off_policy_source`."""

    def source(name: str) -> Sampler:
        if name == "student":
            return student_sampler
        if name == "teacher":
            return ModelSampler(teacher, SamplingSettings.of(config.rollout), precision, source=TEACHER)
        return DatasetAnswers(prompts, student_sampler.policy.tokenizer, config.rollout.max_new_tokens, precision.device)

    secondary = source(config.rollout.off_policy_source) if config.mixed else None
    return RolloutMix(source(config.rollout.source), secondary, config.student_fraction_at,
                      student_sampler.policy.tokenizer.pad_token_id)
