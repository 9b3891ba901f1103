"""One step in three parts: sampling a batch, grading and scoring it, and consuming it (the update, the
step's metrics).

They meet in a `SampledBatch` and a `ScoredBatch`, which carry what the update needs and what it must
account for: the policy version that sampled the batch (the optimizer steps applied by then), the
prompt stream positions it took, and the time and FLOPs of its making. The prompt stream counts what
the updates consumed, not what was sampled, so a batch produced ahead of its update is never lost or
repeated on resume. Scoring makes no collective call, so it can run on a thread of its own beside the
trainer's (opd.train.pipeline, which runs the three); `produce_batch` samples and scores in turn.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from opd.data.prompts import StepPrompts
from opd.distributed.world import World
from opd.errors import StudentCollapsed
from opd.ops.batch import SOURCE_NAMES, STUDENT, StepBatch
from opd.ops.flops import step_flops
from opd.rewards.verifiers import RewardFailed
from opd.teachers.base import TeacherScores, TokenScorer, assemble_scores
from opd.teachers.routed import RoutedTeachers
from opd.train.memory import GIB
from opd.train.metrics import combine, per_teacher_metrics, pieces_over_ranks, rollout_metrics
from opd.train.setup import Session
from opd.train.update import update_student

SOURCE_IDS = {name: source for source, name in SOURCE_NAMES.items()}


class StreamedScores:
    """A teacher on a server scoring each prompt's group as soon as the sampler has finished it, while the
    sampler decodes the rest (the sampler's GroupsDone callback). Up to `max_calls` calls are out at
    once, each group alone while there is room (a distant server's latency overlaps); the groups that
    finish while every call is out go together in the next. `collect` waits for the last and assembles
    the batch's scores."""

    def __init__(self, teacher: TokenScorer, pool: ThreadPoolExecutor, pad_id: int, max_calls: int):
        self.teacher, self.pool, self.pad_id, self.max_calls = teacher, pool, pad_id, max_calls
        self.lock = threading.RLock()  # a call that is already done runs its callback in the caller's thread
        self.waiting: list[tuple[list[int], StepBatch]] = []  # finished groups not yet sent
        self.calls: list[tuple[list[int], Future]] = []  # (rows of the batch, the call scoring them)

    def __call__(self, rows: list[int], part: StepBatch) -> None:
        with self.lock:
            self.waiting.append((rows, part))
            self._send()

    def _send(self, _done: Future | None = None) -> None:
        with self.lock:
            if not self.waiting or sum(not call.done() for _, call in self.calls) >= self.max_calls:
                return
            rows = [row for part_rows, _ in self.waiting for row in part_rows]
            batch = StepBatch.concat([part for _, part in self.waiting], self.pad_id)
            self.waiting = []
            call = self.pool.submit(self.teacher.score, batch)
            self.calls.append((rows, call))
        call.add_done_callback(self._send)  # then the groups that finished meanwhile

    def collect(self, batch: StepBatch) -> TeacherScores:
        """The scores of `batch`, whose rows the groups were. Raises what a call raised."""
        while True:
            with self.lock:
                calls, waiting = list(self.calls), bool(self.waiting)
            for _, call in calls:
                call.result()
            with self.lock:
                if not self.waiting and len(self.calls) == len(calls) and not waiting:
                    break
            time.sleep(0.001)  # the last call's callback is sending what waited meanwhile
        parts = [(rows, call.result()) for rows, call in calls]
        if sorted(row for rows, _ in parts for row in rows) != list(range(len(batch))):
            raise RuntimeError("the sampler handed over another set of rows than it returned")
        return assemble_scores(batch.completion_ids.shape, batch.completion_ids.device, parts)


@dataclass
class SampledBatch:
    """A step's rollouts as the student's engine (or the mixture's other writers) wrote them."""

    step: int
    batch: StepBatch
    prompts: StepPrompts  # this rank's prompts, and the whole step's stream positions
    policy_version: int  # optimizer steps applied to the weights that sampled it
    timings: dict[str, float]  # timing/rollout_s (and timing/weight_sync_s, part of it), this rank's
    streamed: StreamedScores | None = None  # its groups' scoring, begun as the sampler finished each


@dataclass
class ScoredBatch:
    """A step's rollouts, sampled, graded and scored: what its update consumes."""

    step: int
    batch: StepBatch
    prompts: StepPrompts
    policy_version: int
    teacher_flops: float  # what scoring it cost in this process
    timings: dict[str, float]  # the sampling's, and timing/teacher_s (grading and scoring), this rank's
    grading_failure: str | None = None  # the verifier's one line, agreed on by every rank in agree_on_grading

    @property
    def staleness(self) -> int:
        """Optimizer steps its update applies on top of the weights that sampled it: 0 on-policy."""
        return self.step - 1 - self.policy_version


def sample_batch(
    session: Session, step: int, policy_version: int, streamed: StreamedScores | None = None
) -> SampledBatch:
    """Sample the step's rollouts with the current weights (the student's engine synced to them first).
    policy_version: the optimizer steps those weights hold. streamed: where given, each prompt group goes
    to the teacher as soon as it is finished."""
    started = time.perf_counter()
    prompts = take_prompts(session)
    sync_s = session.rollouts.sync_weights(policy_version)
    return draw_batch(session, prompts, step, policy_version, streamed, started, sync_s)


def take_prompts(session: Session) -> StepPrompts:
    """This rank's share of the next step's prompts."""
    world, config = session.world, session.config
    return session.stream.take_step(config.batch.prompts_per_step // world.size, world.rank, world.size)


def draw_batch(
    session: Session,
    prompts: StepPrompts,
    step: int,
    policy_version: int,
    streamed: StreamedScores | None,
    started: float,
    sync_s: float | None,
) -> SampledBatch:
    """The engine's rollouts of `prompts`, with the weights it was last synced to (policy_version). Makes no
    collective call of its own where the engine samples elsewhere (rollout servers): it may then run on
    a thread beside the update. started: perf_counter when the batch's making began (its prompts, its
    sync); sync_s: what the sync took, part of it."""
    config = session.config
    batch = session.rollouts.sample(
        session.train_prompts.batch(prompts.indices, prompts.keys),
        config.rollout.samples_per_prompt,
        config.run.seed,
        step,
        prompts.positions,
        **({"on_groups": streamed} if streamed is not None else {}),
    )
    timings = {"timing/rollout_s": time.perf_counter() - started}
    if sync_s is not None:  # part of timing/rollout_s
        timings["timing/weight_sync_s"] = sync_s
    return SampledBatch(step, batch, prompts, policy_version, timings, streamed)


def score_batch(session: Session, sampled: SampledBatch) -> ScoredBatch:
    """Grade the rollouts where the run has a reward and score them with the teacher. Makes no collective
    call, so it may run beside the trainer's (opd.train.pipeline): a verifier's failure is carried to
    agree_on_grading instead of being raised here."""
    started = time.perf_counter()
    batch, failure = sampled.batch, None
    if session.rewards is not None:
        try:
            batch = session.rewards.attach(batch)
        except RewardFailed as exc:
            failure = str(exc)
    if failure is not None:
        teacher_flops = 0.0
    elif sampled.streamed is not None:
        scores = sampled.streamed.collect(batch)
        batch, teacher_flops = scores.attach(batch), scores.flops
    else:
        batch, teacher_flops = score(session, batch)
    timings = {**sampled.timings, "timing/teacher_s": time.perf_counter() - started}
    return ScoredBatch(sampled.step, batch, sampled.prompts, sampled.policy_version, teacher_flops, timings, failure)


def agree_on_grading(session: Session, scored: ScoredBatch) -> None:
    """A verifier that failed on one rank stops every rank with its one line (the failure goes round in
    one gather), not one rank alone while the others wait. Every rank calls this for every batch."""
    if session.rewards is None:
        return
    failures = [message for message in session.world.gather(scored.grading_failure) if message]
    if failures:
        raise RewardFailed(f"step {scored.step}: {failures[0]}")


def produce_batch(session: Session, step: int, policy_version: int) -> ScoredBatch:
    """Sample, grade and score the step's rollouts in this thread, one after the other."""
    scored = score_batch(session, sample_batch(session, step, policy_version))
    agree_on_grading(session, scored)
    return scored


def consume_batch(
    session: Session, scored: ScoredBatch, step_started: float, log=print
) -> tuple[dict[str, float], float]:
    """The step's update on a scored batch, with the collapse guard and the step's metrics. step_started:
    perf_counter when the step's work began (its throughput is over the step's wall time). Returns the
    metrics and the FLOPs the step cost. Raises StudentCollapsed, before the update, when the guard fires
    under run.collapse_guard: stop."""
    world, config, batch, step = session.world, session.config, scored.batch, scored.step
    consuming = time.perf_counter()
    metrics = sample_metrics(session, batch)
    metrics["staleness/mean"] = metrics["staleness/max"] = float(scored.staleness)  # one version per batch here
    if isinstance(session.teacher, RoutedTeachers):
        metrics.update(per_teacher_metrics(session.teacher, batch, world))
    if "entropy/student" in metrics:  # before the update that would entrench a collapse
        watch_collapse(session, step, metrics, "without applying the update", log)
    update = update_student(session, batch)
    session.stream.consume(scored.prompts)
    finished = time.perf_counter()
    costs = step_flops(batch, session.rollouts.sampling_flops(batch), scored.teacher_flops, session.student_params)
    metrics.update(update_metrics(config.rollout.source, update))
    if "entropy/student" in update:  # the engine gave no entropy; the update's recompute did, so the guard comes after
        watch_collapse(session, step, metrics, "after this step's update", log)
    timings = {**scored.timings, "timing/update_s": finished - consuming, "timing/step_s": finished - step_started}
    metrics.update(
        {
            **{key: world.max(value) if key == "timing/weight_sync_s" else value for key, value in timings.items()},
            "throughput/tokens_per_s": world.sum(batch.num_tokens) / world.max(finished - step_started),
            **{key: world.sum(value) for key, value in costs.items()},
            "memory/peak_gib": world.max(session.peak_memory.bytes()) / GIB,  # the largest rank's, so far
        }
    )
    return metrics, sum(metrics[key] for key in costs)


def watch_collapse(session: Session, step: int, metrics: dict[str, float], when: str, log) -> None:
    """The collapse guard on this step's figures: warn, or under run.collapse_guard=stop raise StudentCollapsed."""
    alarm = session.guard.check(step, metrics)
    if alarm and session.config.run.collapse_guard == "stop":
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
    scores = session.teacher.score(batch, keep_hidden=session.keeps_teacher_hidden)
    return scores.attach(batch), scores.flops


def sample_metrics(session: Session, batch: StepBatch) -> dict[str, float]:
    """The figures of the step's samples, before the update, over every rank's rows: the rows of
    `rollout.source` under the plain names, a mixture's other rows under `from_SOURCE/`. Figures that
    describe the student's own sampling (ℓˢ, entropy/student, the reverse-KL estimate) are left out
    for rows it did not sample; update_metrics adds the student's log-prob of those tokens."""
    world: World = session.world
    parts = {}  # source -> (figures, completion tokens, rows) of this rank
    for source in sorted(set(batch.row_sources().tolist())):
        rows = batch.rows_from(source)
        part = batch if len(rows) == len(batch) else batch.select(rows)
        figures = rollout_metrics(part)
        if source != STUDENT:
            for name in (
                "distill/reverse_kl",
                "distill/seq_reverse_kl",
                "logprob/student",
                "perplexity/student",
                "entropy/student",
            ):
                figures.pop(name, None)
        parts[source] = (figures, part.num_tokens, len(rows))
    by_source = pieces_over_ranks(parts, world)
    all_rows = sum(rows for pieces in by_source.values() for _, _, rows in pieces)
    metrics, primary = {}, SOURCE_IDS[session.config.rollout.source]
    for source, pieces in by_source.items():
        prefix = "" if source == primary else f"from_{SOURCE_NAMES[source]}/"
        metrics.update({prefix + key: value for key, value in combine(pieces).items()})
        if prefix:
            metrics[prefix + "rows_fraction"] = sum(rows for _, _, rows in pieces) / all_rows
    return metrics


def update_metrics(primary: str, update: dict[str, float]) -> dict[str, float]:
    """loss, grad_norm, lr, ratio/*, and the student's log-prob of tokens it did not sample. primary:
    rollout.source, whose rows' figures go under the plain names."""
    metrics = {key: value for key, value in update.items() if not key.startswith("student_logprob/")}
    for name in (name for source, name in SOURCE_NAMES.items() if source != STUDENT):
        if f"student_logprob/{name}" in update:
            prefix = "" if name == primary else f"from_{name}/"
            metrics[f"{prefix}logprob/student"] = update[f"student_logprob/{name}"]
            metrics[f"{prefix}perplexity/student"] = math.exp(-update[f"student_logprob/{name}"])
    return metrics


def train_step(session: Session, step: int, log=print) -> tuple[dict[str, float], float]:
    """One step with one batch in flight: produce its scored batch from the current weights, then consume it."""
    started = time.perf_counter()
    return consume_batch(session, produce_batch(session, step, policy_version=step - 1), started, log)
