"""One place that builds samplers and teachers, so `opd train`, `opd sft`, `opd eval` and the demo load
and run them with the same precision and chunking choices."""

from __future__ import annotations

from opd.answers import DatasetAnswers
from opd.batch import TEACHER
from opd.config import Config, RolloutConfig
from opd.data import PromptSet
from opd.loading import LoadedModel, load_model
from opd.mixture import RolloutMix
from opd.precision import Precision
from opd.sampling import ModelSampler, Sampler, SamplingSettings
from opd.teacher import LocalTeacher
from opd.update import tokens_per_chunk


def sampling_settings(rollout: RolloutConfig, max_new_tokens: int | None = None) -> SamplingSettings:
    return SamplingSettings(max_new_tokens or rollout.max_new_tokens, rollout.temperature, rollout.top_k, rollout.top_p)


def make_sampler(policy: LoadedModel, settings: SamplingSettings, precision: Precision) -> ModelSampler:
    return ModelSampler(policy, settings, precision)


def load_teacher(path: str, key: str, precision: Precision, temperature: float = 1.0,
                 chunk_size: int | None = None, trust_remote_code: bool = False, top_k: int = 0) -> LocalTeacher:
    """A teacher in this process: weights in bf16 under bf16 (it has no optimizer), logits in chunks of
    `chunk_size` tokens (None: 64 MiB fp32 blocks at its vocabulary)."""
    loaded = load_model(path, key, precision.device, trust_remote_code, dtype=precision.frozen_weights_dtype)
    return LocalTeacher(loaded, temperature, tokens_per_chunk(chunk_size, loaded.vocab_size), precision, top_k)


def make_rollouts(config: Config, student_sampler: ModelSampler, teacher: LocalTeacher | None, prompts: PromptSet,
                  precision: Precision) -> RolloutMix:
    """Who writes the training completions: `rollout.source` (the student, the teacher or the data),
    and with GKD's lambda below 1 the student mixed with `rollout.off_policy_source`."""

    def source(name: str) -> Sampler:
        if name == "student":
            return student_sampler
        if name == "teacher":
            return ModelSampler(teacher.loaded, sampling_settings(config.rollout), precision, source=TEACHER)
        return DatasetAnswers(prompts, student_sampler.policy.tokenizer, config.rollout.max_new_tokens, precision.device)

    secondary = source(config.rollout.off_policy_source) if config.mixed else None
    return RolloutMix(source(config.rollout.source), secondary, config.student_fraction_at,
                      student_sampler.policy.tokenizer.pad_token_id)
