"""Held-out evaluation: the training metrics under `eval/`, plus accuracy where answers are checkable.

Eval samples at the training temperature (rollout.temperature, with its top-k/top-p), so eval/*
figures measure the same distribution the trainer optimizes. Each held-out prompt draws from its own
random stream, keyed by its index and a fixed seed, so every evaluation sees the same random numbers
(before/after comparisons share them) however the prompts are batched or split across ranks. Accuracy is
the mean over eval.samples_per_prompt samples, i.e. pass@1 at that temperature.

`evaluate` runs inside training, on the run's sampler and teacher; `evaluate_model` is `opd eval`: it
loads a model (and a teacher) as `opd train` does, then calls `evaluate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opd.data.prompts import PromptSet, load_prompts
from opd.data.tasks.gsm8k import is_correct
from opd.distributed.world import World
from opd.errors import ConfigError
from opd.models.loading import load_model, load_tokenizer
from opd.models.precision import Precision
from opd.rewards.verifiers import RewardScorer
from opd.rollout.sampler import ModelSampler, Sampler, SamplingSettings
from opd.teachers.base import TokenScorer
from opd.teachers.local import load_teacher
from opd.teachers.view import TeacherView, ViewedTeacher, ViewSettings
from opd.train.metrics import combine, rollout_metrics

if TYPE_CHECKING:
    from opd.train.setup import Session


def evaluate(
    sampler: Sampler,
    teacher: TokenScorer | None,
    prompts: PromptSet,
    tokenizer,
    samples_per_prompt: int,
    batch_prompts: int,
    seed: int,
    max_prompts: int | None = None,
    world: World = World(),
    equal_calls: bool = False,
    rewards: RewardScorer | None = None,
) -> dict[str, float]:
    """Returns eval/ metrics averaged over completion tokens of all held-out rollouts.

    seed: the evaluation's sampling seed, the same at every evaluation. Under several ranks each takes
    every world.size-th prompt and the figures are combined over ranks, token-weighted, so they equal
    one process's (each prompt's samples come from its own keyed stream). equal_calls: every rank makes
    as many sampling and scoring calls (a sharded model gathers its weights in each, a collective).
    rewards: the run's verifier, which adds eval/reward/*.
    """
    count = min(len(prompts), max_prompts or len(prompts))
    mine = list(range(world.rank, count, world.size))
    token_weights: list[tuple[dict[str, float], int, int]] = []
    verdicts: dict[int, list[bool]] = {}  # prompt index -> correctness of each of its samples
    shares = [mine[start : start + batch_prompts] for start in range(0, len(mine), batch_prompts)]
    # With equal_calls, a rank with fewer prompts samples one of them again and drops the result.
    calls = int(world.max(len(shares))) if equal_calls else len(shares)
    for call in range(calls):
        padding = call >= len(shares)
        batch = sampler.sample(
            prompts.batch([0] if padding else shares[call]), 1 if padding else samples_per_prompt, seed
        )
        if teacher is not None:
            batch = teacher.score(batch).attach(batch)
        if padding:
            continue
        if rewards is not None:
            batch = rewards.attach(batch)
        token_weights.append((rollout_metrics(batch), batch.num_tokens, len(batch)))
        for text, row_index, row in zip(batch.completion_texts(tokenizer), batch.row_index.tolist(), batch.rows):
            verdict = is_correct(text, row.answer) if row.answer is not None else None
            if verdict is not None:
                verdicts.setdefault(row_index, []).append(verdict)
    gathered = world.gather((token_weights, verdicts))
    token_weights = [part for parts, _ in gathered for part in parts]
    verdicts = {index: each for _, rank_verdicts in gathered for index, each in rank_verdicts.items()}
    totals = combine(token_weights)
    if verdicts:
        totals["accuracy"] = sum(map(sum, verdicts.values())) / sum(map(len, verdicts.values()))  # pass@1
        if samples_per_prompt > 1:
            totals[f"pass@{samples_per_prompt}"] = sum(any(v) for v in verdicts.values()) / len(verdicts)
    return {f"eval/{key}": value for key, value in totals.items()}


def evaluate_session(
    session: "Session", prompts: PromptSet | None = None, max_prompts: int | None = None
) -> dict[str, float]:
    """`evaluate` as a run evaluates: its sampler, teacher, verifier and settings, on `prompts` (default:
    data.eval, up to data.eval_max_prompts; else up to `max_prompts`), in calls of a training step's size."""
    config = session.config
    rollouts = config.batch.prompts_per_step * config.rollout.samples_per_prompt
    return evaluate(
        session.student_sampler,
        session.teacher,
        session.eval_prompts if prompts is None else prompts,
        session.student.tokenizer,
        samples_per_prompt=config.rollout.eval_samples_per_prompt,
        # As many rollouts per sampling call as a training step makes on a rank.
        batch_prompts=max(1, rollouts // session.world.size // config.rollout.eval_samples_per_prompt),
        seed=config.run.seed + 1,
        max_prompts=config.data.eval_max_prompts if prompts is None else max_prompts,
        world=session.world,
        equal_calls=session.sharded or session.teacher_sharded,
        rewards=session.rewards,
    )


def evaluate_model(
    model_path: str,
    data: str,
    samples: int = 1,
    teacher_path: str | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    max_prompts: int | None = None,
    system_prompt: str | None = None,
    batch_rollouts: int = 64,
    seed: int = 0,
    precision: str = "auto",
    teacher_chat_template: str = "student",
) -> dict[str, float]:
    """`opd eval`: pass@1, pass@K and length of a model on a data set, and with a teacher the
    held-out distillation metrics (a teacher with another tokenizer: distill/seq_reverse_kl, from the chunk
    estimator). Samples at `temperature` (pass@1 is the mean over K samples).
    precision as `run.precision`: the same sampler, teacher and chunking as `opd train` builds."""
    precision = Precision.resolve(precision, "auto")
    student = load_model(model_path, "--model", precision.device)
    prompts = load_prompts(data, "--data", student.tokenizer, max_prompt_tokens=10**9, system_prompt=system_prompt)
    counted = prompts.token_ids[: max_prompts or len(prompts)]
    longest = max(map(len, counted))
    context = getattr(student.model.config, "max_position_embeddings", None)
    if isinstance(context, int) and longest + max_new_tokens > context:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens}: with the longest prompt of --data ({longest} tokens) that is "
            f"{longest + max_new_tokens} tokens, past --model's context of {context}; lower --max-new-tokens to "
            f"{context - longest} or less"
        )
    teacher = None
    if teacher_path is not None:
        # A teacher with another tokenizer (or template) scores its own view of each row: distill/seq_reverse_kl.
        view = TeacherView(
            student.tokenizer,
            load_tokenizer(teacher_path, "--teacher"),
            student.stop_token_ids,
            ViewSettings(teacher_chat_template, system_prompt, student_system_prompt=system_prompt),
        )
        teacher = load_teacher(teacher_path, "--teacher", precision)
        if view.needed(prompts.examples):
            teacher = ViewedTeacher(teacher, view)
    sampler = ModelSampler(student, SamplingSettings(max_new_tokens, temperature), precision)
    metrics = evaluate(
        sampler, teacher, prompts, student.tokenizer, samples, max(1, batch_rollouts // samples), seed, max_prompts
    )
    metrics["eval/prompts"] = min(len(prompts), max_prompts or len(prompts))
    return metrics
