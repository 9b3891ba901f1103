"""The on-policy distillation loop.

Each optimizer step: take prompts -> the student samples completions (one batched call, KV cache)
-> the teacher scores every sampled token (one no-grad forward) -> advantages and the loss, backward
over micro-batches -> clip, AdamW step. What this simplifies: one process, one optimizer step per
batch of rollouts (so the importance ratio is 1 up to sampling numerics), no value model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from opd import losses
from opd.checkpoint import latest_checkpoint, save_checkpoint, save_model
from opd.config import Config
from opd.errors import TrainingDiverged
from opd.evaluate import evaluate
from opd.flops import matmul_parameters, step_flops
from opd.metrics import ProgressBar, rollout_metrics
from opd.objective import LossSettings, backward_micro_batch, chunk_tokens
from opd.rollout import Rollouts
from opd.setup import Session, prepare
from opd.teacher import TeacherScores
from opd.trackers import MetricSinks


@dataclass
class TrainResult:
    output_dir: Path
    first_eval: dict[str, float]
    last_eval: dict[str, float]
    steps_run: int


def train(config: Config, resume: bool = False, log=print, time_limit_s: float | None = None) -> TrainResult:
    """Run (or with resume, continue) a run. time_limit_s: stop after the step during which that much
    training time has passed, and write final/ as usual (for equal-time benchmarks)."""
    session = prepare(config, resume=resume, log=log)
    run, batch = config.run, config.batch
    start_step = session.start_step
    sinks = MetricSinks(config, session.output_dir, start_step)
    first_eval = last_eval = {}
    progress = ProgressBar(run.max_steps, start_step, enabled=run.progress)
    step, flops = start_step, session.start_flops
    student_params = matmul_parameters(session.student.model)
    teacher_params = matmul_parameters(session.teacher.model) if session.teacher is not None else 0
    sampler_params = {"student": student_params, "teacher": teacher_params, "dataset": 0}[config.rollout.source]
    scorer_params = 0 if sampled_by_teacher_distribution(config) else teacher_params
    try:
        if start_step == 0 and session.eval_prompts is not None:
            first_eval = last_eval = run_eval(session, config)
            sinks.write(0, first_eval)
        loop_started = time.perf_counter()
        for step in range(start_step + 1, run.max_steps + 1):
            started = time.perf_counter()
            prompts = [session.train_prompts.token_ids[i] for i in session.stream.take(batch.prompts_per_step)]
            rollouts = session.sampler.sample(prompts, config.rollout.samples_per_prompt, session.generator)
            sampled = time.perf_counter()
            scores = score(session, config, rollouts)
            scored = time.perf_counter()
            update = update_student(session, config, rollouts, scores)
            finished = time.perf_counter()

            costs = step_flops(rollouts, sampler_params, scorer_params, student_params)
            flops += sum(costs.values())
            metrics = {**step_metrics(config, rollouts, scores, update, (started, sampled, scored, finished)),
                       **costs, "compute/flops": flops}
            last_step = step == run.max_steps or (
                time_limit_s is not None and time.perf_counter() - loop_started >= time_limit_s)
            if session.eval_prompts is not None and ((run.eval_every and step % run.eval_every == 0) or last_step):
                last_eval = run_eval(session, config)
                metrics.update(last_eval)
            if step % run.log_every == 0 or last_step or "eval/distill/reverse_kl" in metrics:
                sinks.write(step, metrics)
            progress.update(step, metrics)
            if run.save_every and step % run.save_every == 0:
                save_checkpoint(session.output_dir, step, session.student, session.optimizer, session.scheduler,
                                session.generator, session.stream.consumed, flops)
            if last_step:
                break
    except TrainingDiverged as exc:
        last_good = latest_checkpoint(session.output_dir)
        raise TrainingDiverged(f"step {step}: {exc} (last good checkpoint: {last_good or 'none'})") from None
    finally:
        progress.close()
        sinks.close()
    save_model(session.student, session.output_dir / "final")
    return TrainResult(session.output_dir, first_eval, last_eval, step - start_step)


def sampled_by_teacher_distribution(config: Config) -> bool:
    """True when the teacher sampled the rollouts under exactly the distribution it scores with: the
    sampler's log-probs are then ℓᵀ already, and a second teacher forward would only repeat them."""
    rollout, teacher = config.rollout, config.teacher
    return (rollout.source == "teacher" and teacher is not None and rollout.temperature == teacher.temperature
            and rollout.top_k == 0 and rollout.top_p == 1)


def score(session: Session, config: Config, rollouts: Rollouts) -> TeacherScores | None:
    """ℓᵀ of the step's tokens (and the hidden states a full-vocabulary loss needs); None without a teacher."""
    if session.teacher is None:
        return None
    if sampled_by_teacher_distribution(config):
        return TeacherScores(logprobs=rollouts.sampler_logprobs)
    return session.teacher.score(rollouts, keep_hidden=config.loss.kind in ("forward_kl", "reverse_kl", "jsd"))


def step_metrics(config: Config, rollouts: Rollouts, scores: TeacherScores | None, update: dict[str, float],
                 times: tuple[float, float, float, float]) -> dict[str, float]:
    """The metrics of one training step, named as in DESIGN.md §1. times: (start, sampled, scored, updated)."""
    started, sampled, scored, finished = times
    metrics = {
        "loss": update["loss"], **rollout_metrics(rollouts, scores and scores.logprobs), "grad_norm": update["grad_norm"],
        "lr": update["lr"], "timing/rollout_s": sampled - started, "timing/teacher_s": scored - sampled,
        "timing/update_s": finished - scored, "throughput/tokens_per_s": rollouts.num_tokens / (finished - started),
    }
    if config.rollout.source != "student":  # someone else's tokens: no ℓˢ, and no reverse-KL estimate
        metrics.pop("distill/reverse_kl", None)
        metrics["logprob/student"] = update["student_logprob"]
        metrics["perplexity/student"] = math.exp(-update["student_logprob"])
    return metrics


def update_student(session: Session, config: Config, rollouts: Rollouts, scores: TeacherScores | None) -> dict[str, float]:
    """Advantages, loss and backward over micro-batches, clipping, one AdamW step.

    Returns loss, grad_norm, lr and the student's mean log-prob of the batch's tokens.
    Raises TrainingDiverged, before touching the weights, when the loss or gradient is not finite.
    """
    settings = LossSettings(
        kind=config.loss.kind, temperature=config.rollout.temperature, top_k=config.rollout.top_k,
        top_p=config.rollout.top_p, ratio_clip=config.loss.ratio_clip, jsd_beta=config.loss.jsd_beta,
        chunk_size=chunk_tokens(config.loss.chunk_size, session.student.vocab_size),
    )
    advantages = None
    if config.loss.kind == "reverse_kl_pg":
        advantages = losses.discounted_advantages(
            rollouts.sampler_logprobs, scores.logprobs, rollouts.completion_mask, config.loss.kl_coef,
            config.loss.discount,
        )  # (B, T)
    session.optimizer.zero_grad(set_to_none=True)
    micro = config.batch.micro_batch_size
    shares = [
        backward_micro_batch(session.student, session.teacher, rollouts, scores, advantages, slice(row, row + micro),
                             rollouts.num_tokens, settings, session.autocast_dtype)
        for row in range(0, len(rollouts), micro)
    ]
    loss = sum(share for share, _ in shares)
    parameters = session.student.model.parameters()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, config.optim.max_grad_norm or math.inf))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingDiverged(f"loss={loss} grad_norm={grad_norm} is not finite; stopped without applying the update")
    lr = session.scheduler.get_last_lr()[0]
    session.optimizer.step()
    session.scheduler.step()
    student_logprob = sum(logprob_sum for _, logprob_sum in shares) / max(rollouts.num_tokens, 1)
    return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "student_logprob": student_logprob}


def run_eval(session: Session, config: Config) -> dict[str, float]:
    generator = torch.Generator(device=session.device).manual_seed(config.run.seed + 1)
    return evaluate(
        session.student_sampler, session.teacher, session.eval_prompts, session.student.tokenizer,
        samples_per_prompt=config.rollout.eval_samples_per_prompt,
        # As many rollouts per sampling call as a training step makes.
        batch_prompts=max(1, rollouts_per_step(config) // config.rollout.eval_samples_per_prompt),
        generator=generator, max_prompts=config.data.eval_max_prompts,
    )


def rollouts_per_step(config: Config) -> int:
    return config.batch.prompts_per_step * config.rollout.samples_per_prompt
