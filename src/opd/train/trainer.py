"""The on-policy distillation loop.

Each optimizer step: take prompts -> the sampler writes completions (one batched call, KV cache) ->
the teacher scores every completion token (one no-grad forward) -> the objective's loss, backward over
micro-batches -> clip, AdamW step -> metrics, evaluation, checkpoints. One StepBatch carries the step
from the sampler to the metrics. What this simplifies: one process, one optimizer step per batch of
rollouts (so the importance ratio is 1 up to sampling numerics), no value model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path


from opd.ops.batch import SOURCE_NAMES, STUDENT, StepBatch
from opd.io.checkpoint import latest_checkpoint, save_checkpoint, save_model
from opd.config.schema import Config
from opd.config.sections import FULL_DISTRIBUTION
from opd.errors import StudentCollapsed, TrainingDiverged
from opd.train.evaluate import evaluate
from opd.ops.flops import step_flops
from opd.distributed.world import World
from opd.train.memory import GIB
from opd.train.metrics import combine, per_teacher_metrics, pieces_over_ranks, rollout_metrics
from opd.io.progress import ProgressBar
from opd.teachers.remote import TeacherUnavailable
from opd.teachers.routed import RoutedTeachers
from opd.train.setup import Session, prepare
from opd.io.export import save_with_adapters
from opd.distributed.sharding import full_model_state, is_sharded
from opd.io.sinks import MetricSinks
from opd.rewards.verifiers import RewardFailed
from opd.train.update import update_student


SOURCE_IDS = {name: source for source, name in SOURCE_NAMES.items()}


@dataclass
class TrainResult:
    output_dir: Path
    first_eval: dict[str, float]
    last_eval: dict[str, float]
    steps_run: int


def train(config: Config, resume: bool = False, log=print, time_limit_s: float | None = None) -> TrainResult:
    """Run (or with resume, continue) a run. time_limit_s: stop after the step during which that much
    training time has passed, and write final/ as usual (for equal-time benchmarks)."""
    world = World.from_environment()
    main = world.is_main  # rank 0 alone writes metrics, checkpoints and final/, and speaks
    log = log if main else (lambda *_: None)
    session = prepare(config, resume=resume, log=log, world=world)
    run = config.run
    sinks = MetricSinks(config, session.output_dir, session.start_step, enabled=main)
    first_eval = last_eval = {}
    progress = ProgressBar(run.max_steps, session.start_step, enabled=run.progress and main)
    step, flops = session.start_step, session.start_flops
    try:
        if session.start_step == 0 and session.eval_prompts is not None:
            first_eval = last_eval = run_eval(session, config)
            sinks.write(0, first_eval)
            session.guard.observe_start(first_eval.get("eval/entropy/student"))
        loop_started = time.perf_counter()
        for step in range(session.start_step + 1, run.max_steps + 1):
            metrics, step_cost = train_step(session, config, step, log)
            flops += step_cost
            metrics["compute/flops"] = flops
            last_step = step == run.max_steps or (  # the slowest rank decides, so all stop together
                time_limit_s is not None and world.max(time.perf_counter() - loop_started) >= time_limit_s)
            if session.eval_prompts is not None and ((run.eval_every and step % run.eval_every == 0) or last_step):
                last_eval = run_eval(session, config)
                metrics.update(last_eval)
            if step % run.log_every == 0 or last_step or "eval/distill/seq_reverse_kl" in metrics:
                sinks.write(step, metrics)
            progress.update(step, metrics)
            if run.save_every and step % run.save_every == 0:
                save(session, config, step, flops)
            if last_step:
                break
    except (TrainingDiverged, TeacherUnavailable) as exc:
        last_good = latest_checkpoint(session.output_dir)
        raise type(exc)(f"step {step}: {exc} (last good checkpoint: {last_good or 'none'})") from None
    finally:
        progress.close()
        sinks.close()
    save(session, config)
    world.barrier()  # no rank leaves before final/ is complete
    world.close()
    return TrainResult(session.output_dir, first_eval, last_eval, step - session.start_step)


def save(session: Session, config: Config, step: int | None = None, flops: float = 0.0) -> None:
    """A checkpoint at `step` (every rank writes its shard), or final/ without one (rank 0 writes the
    whole student, gathered first where it is sharded). Every rank must call this."""
    if step is not None:
        trainer_state = {"scheduler": session.scheduler.state_dict(), "prompts_consumed": session.stream.consumed,
                         "flops": flops, "guard": session.guard.state_dict()}
        save_checkpoint(session.output_dir, step, session.student, session.optimizer, session.world, trainer_state)
        return
    final = session.output_dir / "final"
    if not session.sharded:
        if session.world.is_main:
            save_model(session.student, final)
        return
    lora = session.student.adapter is not None
    weights = full_model_state(session.student.model, trainable_only=lora)
    if session.world.is_main:
        if lora:
            save_with_adapters(config.student, weights, final)
        else:
            save_model(session.student, final, weights)


def train_step(session: Session, config: Config, step: int, log=print) -> tuple[dict[str, float], float]:
    """One optimizer step: sample, score, check for collapse, update. Returns the step's metrics and FLOPs.
    Raises StudentCollapsed, before the update, when the guard fires under run.collapse_guard: stop."""
    started = time.perf_counter()
    world = session.world
    share = config.batch.prompts_per_step // world.size
    prompts = session.train_prompts.batch(*session.stream.take_keyed(share, world.rank, world.size))
    step_keys = range(session.stream.consumed - config.batch.prompts_per_step, session.stream.consumed)
    batch = session.rollouts.sample(prompts, config.rollout.samples_per_prompt, config.run.seed, step, step_keys)
    if session.rewards is not None:
        batch = grade(session, batch, step)
    sampled = time.perf_counter()
    batch, teacher_flops = score(session, batch)
    scored = time.perf_counter()
    metrics = sample_metrics(config, batch, world)
    if isinstance(session.teacher, RoutedTeachers):
        metrics.update(per_teacher_metrics(session.teacher, batch, world))
    if "entropy/student" in metrics:  # before the update that would entrench a collapse
        watch_collapse(session, config, step, metrics, "without applying the update", log)
    update = update_student(session, config, batch)
    finished = time.perf_counter()
    costs = step_flops(batch, session.rollouts.sampling_flops(batch), teacher_flops, session.student_params)
    metrics.update(update_metrics(config, update))
    if "entropy/student" in update:  # vLLM gives no entropy; the update's recompute did, so the guard comes after
        watch_collapse(session, config, step, metrics, "after this step's update", log)
    metrics.update({
        "timing/rollout_s": sampled - started, "timing/teacher_s": scored - sampled,
        "timing/update_s": finished - scored,
        "throughput/tokens_per_s": world.sum(batch.num_tokens) / world.max(finished - started),
        **{key: world.sum(value) for key, value in costs.items()},
        "memory/peak_gib": world.max(session.peak_memory.bytes()) / GIB,  # the largest rank's, so far
    })
    if session.rollouts.weight_sync_s is not None:  # part of timing/rollout_s
        metrics["timing/weight_sync_s"] = world.max(session.rollouts.weight_sync_s)
    return metrics, sum(metrics[key] for key in costs)


def grade(session: Session, batch: StepBatch, step: int) -> StepBatch:
    """The batch with the verifier's rewards. A verifier that fails on one rank stops every rank with its
    one line (the failure goes round in one gather), not one rank alone while the others wait."""
    try:
        graded, failure = session.rewards.attach(batch), None
    except RewardFailed as exc:
        graded, failure = batch, str(exc)
    failures = [message for message in session.world.gather(failure) if message]
    if failures:
        raise RewardFailed(f"step {step}: {failures[0]}")
    return graded


def watch_collapse(session: Session, config: Config, step: int, metrics: dict[str, float], when: str, log) -> None:
    """The collapse guard on this step's figures: warn, or under run.collapse_guard=stop raise StudentCollapsed."""
    alarm = session.guard.check(step, metrics)
    if alarm and config.run.collapse_guard == "stop":
        raise StudentCollapsed(f"{alarm}; stopped {when}")
    if alarm:
        log(f"warning: step {step}: {alarm}")


def score(session: Session, batch: StepBatch) -> tuple[StepBatch, float]:
    """The batch with ℓᵀ of its tokens (and the hidden states a full-vocabulary loss asks for), and the
    FLOPs that cost. Without a teacher the batch is returned as it is."""
    if session.teacher is None:
        return batch, 0.0
    if session.scored_by_sampler:
        return batch.replace(teacher_logprobs=batch.sampler_logprobs), 0.0
    scores = session.teacher.score(batch, keep_hidden=session.objective.needs == FULL_DISTRIBUTION)
    return scores.attach(batch), scores.flops


def sample_metrics(config: Config, batch: StepBatch, world: World) -> dict[str, float]:
    """The figures of the step's samples, before the update, over every rank's rows: the rows of
    `rollout.source` under the plain names, a mixture's other rows under `from_SOURCE/`. Figures that
    describe the student's own sampling (ℓˢ, entropy/student, the reverse-KL estimate) are left out
    for rows it did not sample; update_metrics adds the student's log-prob of those tokens."""
    parts = {}  # source -> (figures, completion tokens, rows) of this rank
    for source in sorted(set(batch.row_sources().tolist())):
        rows = batch.rows_from(source)
        part = batch if len(rows) == len(batch) else batch.select(rows)
        figures = rollout_metrics(part)
        if source != STUDENT:
            for name in ("distill/reverse_kl", "distill/seq_reverse_kl", "logprob/student", "perplexity/student",
                         "entropy/student"):
                figures.pop(name, None)
        parts[source] = (figures, part.num_tokens, len(rows))
    by_source = pieces_over_ranks(parts, world)
    all_rows = sum(rows for pieces in by_source.values() for _, _, rows in pieces)
    metrics, primary = {}, SOURCE_IDS[config.rollout.source]
    for source, pieces in by_source.items():
        prefix = "" if source == primary else f"from_{SOURCE_NAMES[source]}/"
        metrics.update({prefix + key: value for key, value in combine(pieces).items()})
        if prefix:
            metrics[prefix + "rows_fraction"] = sum(rows for _, _, rows in pieces) / all_rows
    return metrics


def update_metrics(config: Config, update: dict[str, float]) -> dict[str, float]:
    """loss, grad_norm, lr, ratio/*, and the student's log-prob of tokens it did not sample."""
    metrics = {key: value for key, value in update.items() if not key.startswith("student_logprob/")}
    primary = config.rollout.source
    for name in (name for source, name in SOURCE_NAMES.items() if source != STUDENT):
        if f"student_logprob/{name}" in update:
            prefix = "" if name == primary else f"from_{name}/"
            metrics[f"{prefix}logprob/student"] = update[f"student_logprob/{name}"]
            metrics[f"{prefix}perplexity/student"] = math.exp(-update[f"student_logprob/{name}"])
    return metrics


def run_eval(session: Session, config: Config) -> dict[str, float]:
    return evaluate(
        session.student_sampler, session.teacher, session.eval_prompts, session.student.tokenizer,
        samples_per_prompt=config.rollout.eval_samples_per_prompt,
        # As many rollouts per sampling call as a training step makes on a rank.
        batch_prompts=max(1, rollouts_per_step(config) // session.world.size // config.rollout.eval_samples_per_prompt),
        seed=config.run.seed + 1, max_prompts=config.data.eval_max_prompts, world=session.world,
        equal_calls=session.sharded or is_sharded(getattr(session.teacher, "model", None)), rewards=session.rewards,
    )


def rollouts_per_step(config: Config) -> int:
    return config.batch.prompts_per_step * config.rollout.samples_per_prompt
