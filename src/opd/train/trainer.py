"""The on-policy distillation loop.

Each optimizer step: take prompts -> the student's engine, synced to the current weights, writes
completions (one batched call, KV cache) -> the teacher scores every completion token (one no-grad
forward) -> the objective's loss, backward over micro-batches -> clip, AdamW step -> metrics,
evaluation, checkpoints. Producing a scored batch and consuming it are two calls (opd.train.step); one
StepBatch carries the step from the sampler to the metrics. With rollout.max_staleness N >= 1 the
pipeline (opd.train.pipeline) samples up to N steps ahead and scores in a thread of its own, so a
batch's update may come up to N optimizer steps after the weights that sampled it; at N = 0 each step
samples, scores and updates in turn. One optimizer step per batch of rollouts, no value model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from opd.config.schema import Config
from opd.distributed.sharding import full_model_state
from opd.distributed.world import World
from opd.errors import TrainingDiverged
from opd.io.checkpoint import latest_checkpoint, save_checkpoint, save_model
from opd.io.export import save_with_adapters
from opd.io.progress import ProgressBar
from opd.io.sinks import MetricSinks
from opd.teachers.remote import TeacherUnavailable
from opd.train.evaluate import evaluate_session
from opd.train.pipeline import Pipeline
from opd.train.setup import Session, prepare
from opd.train.start import choose_start
from opd.train.step import SampledBatch, consume_batch


@dataclass
class TrainResult:
    output_dir: Path
    first_eval: dict[str, float]
    last_eval: dict[str, float]
    steps_run: int


def train(request: Config, resume: bool | str = False, log=print, time_limit_s: float | None = None) -> TrainResult:
    """Run (or with resume, continue) a run. request: the validated config as the user asked it.
    time_limit_s: stop after the step during which that much training time has passed, and write final/
    as usual (for equal-time benchmarks)."""
    world = World.from_environment()
    main = world.is_main  # rank 0 alone writes metrics, checkpoints and final/, and speaks
    log = log if main else (lambda *_: None)
    session = prepare(request, resume=resume, log=log, world=world)
    config, run = session.config, session.config.run
    sinks = MetricSinks(config, session.output_dir, session.start_step, enabled=main)
    first_eval = last_eval = {}
    command = "opd sft" if config.loss.kind == "sft" else "opd train"
    progress = ProgressBar(run.max_steps, session.start_step, enabled=run.progress and main, label=command)
    step, flops = session.start_step, session.start_flops
    pipeline = None
    try:
        if session.start_step == 0 and session.eval_prompts is not None:
            first_eval = last_eval = evaluate_session(session)
            sinks.write(0, first_eval)
            session.guard.observe_start(first_eval.get("eval/entropy/student"))
        session = choose_start(session, first_eval, log)  # rollout.student_fraction auto: far or near?
        sinks.update_config(session.config)
        pipeline = Pipeline(session, run.max_steps, session.in_flight)
        loop_started = time.perf_counter()
        for step in range(session.start_step + 1, run.max_steps + 1):
            step_started = time.perf_counter()
            metrics, step_cost = consume_batch(session, pipeline.take(step), step_started, log)
            flops += step_cost
            metrics["compute/flops"] = flops
            last_step = step == run.max_steps or (  # the slowest rank decides, so all stop together
                time_limit_s is not None and world.max(time.perf_counter() - loop_started) >= time_limit_s
            )
            if session.eval_prompts is not None and ((run.eval_every and step % run.eval_every == 0) or last_step):
                with pipeline.teacher_between_batches():
                    last_eval = evaluate_session(session)
                metrics.update(last_eval)
            if step % run.log_every == 0 or last_step or "eval/distill/seq_reverse_kl" in metrics:
                sinks.write(step, metrics)
            progress.update(step, metrics)
            if run.save_every and step % run.save_every == 0:
                save(session, step, flops, pipeline.in_flight(step))
            if last_step:
                break
    except (TrainingDiverged, TeacherUnavailable) as exc:
        last_good = latest_checkpoint(session.output_dir)
        raise type(exc)(f"step {step}: {exc} (last good checkpoint: {last_good or 'none'})") from None
    finally:
        if pipeline is not None:
            pipeline.close()
        progress.close()
        sinks.close()
    save(session)
    world.barrier()  # no rank leaves before final/ is complete
    session.close()
    world.close()
    return TrainResult(session.output_dir, first_eval, last_eval, step - session.start_step)


def save(session: Session, step: int | None = None, flops: float = 0.0, in_flight: list[SampledBatch] = ()) -> None:
    """A checkpoint at `step` (every rank writes its shard), or final/ without one (rank 0 writes the
    whole student, gathered first where it is sharded). in_flight: this rank's batches sampled ahead of
    the step, kept with it (their weights are gone). Every rank must call this."""
    if step is not None:
        trainer_state = {
            "scheduler": session.scheduler.state_dict(),
            "prompts_consumed": session.stream.consumed,
            "flops": flops,
            "guard": session.guard.state_dict(),
            # Every rank's own rows, in rank order.
            "in_flight": session.world.gather(
                [replace(sampled, batch=sampled.batch.to("cpu"), streamed=None) for sampled in in_flight]
            ),
        }
        save_checkpoint(
            session.output_dir,
            step,
            session.student,
            session.optimizer,
            session.world,
            trainer_state,
            keep=session.config.run.keep_checkpoints,
        )
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
            save_with_adapters(session.config.student, weights, final)
        else:
            save_model(session.student, final, weights)
