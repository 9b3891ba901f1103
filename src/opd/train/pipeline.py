"""Scored batches made ahead of their updates, within `rollout.max_staleness` policy versions.

With N = rollout.max_staleness, step j's update consumes a batch sampled by the weights of version
max(0, j - 1 - N) (the optimizer steps applied to them), never older. Each step, before waiting for its
own batch, the trainer's thread samples the batch N steps ahead from the current weights and hands it
to a scoring thread, which grades it and has the teacher score it while the trainer updates and
samples on. So the teacher's scoring (a server's latency, or a local teacher's forward) and the
verifier overlap the student's sampling and update, and the student never waits for the teacher
unless scoring is the slower stage.

The versions are fixed by the schedule, not by which thread is quicker: every batch is sampled at
exactly its version, so a run at N computes the same arithmetic however the stages' timings fall, and
at the bound the sampler waits (it never runs more than N versions ahead) instead of sampling and
dropping. Sampling stays on the trainer's thread: an in-process engine shares the device and the
weights with the update, and every collective call (a sharded student, the ranks' agreement on a
failed grading) keeps one order on every rank. A teacher sharded across ranks scores on the
trainer's thread too, for the same reason.

The batches sampled and not yet consumed (at most N after a step) are what a checkpoint keeps beside
the weights (`in_flight`): their weights are gone by then, so a resumed run scores the same batches
again instead of sampling others.

Timings, per step: timing/rollout_s (the sampling of the batch made this step), timing/teacher_s (the
scoring of the batch consumed, grading included), timing/update_s; where scoring has its own thread,
timing/wait_s (the trainer waiting for that scoring) and timing/teacher_idle_s (the scoring thread
waiting for work before it).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from opd.data.prompts import StepPrompts
from opd.rollout.vllm_server_engine import ServerRestarted
from opd.rollout.weight_transfer import RolloutServerError
from opd.teachers.build import on_servers
from opd.train.setup import Session
from opd.train.step import (
    SampledBatch,
    ScoredBatch,
    StreamedScores,
    agree_on_grading,
    draw_batch,
    sample_batch,
    score_batch,
    take_prompts,
)

RESAMPLINGS = 3  # a batch sampled again after its server restarted, at most, before the run stops


class _ScoringThread:
    """One daemon thread scoring batches in the order they come (a daemon: a failed run's process exits
    without waiting for a teacher's retries)."""

    def __init__(self, session: Session):
        self.session = session
        self.inbox: queue.Queue = queue.Queue()
        self.results: dict[int, tuple[ScoredBatch | None, BaseException | None]] = {}
        self.done = threading.Condition()
        self.teacher_lock = threading.Lock()  # held while scoring: evaluation borrows the teacher between batches
        self.idle_since = time.perf_counter()
        self.thread = threading.Thread(target=self._run, name="opd-scoring", daemon=True)
        self.thread.start()

    def submit(self, sampled: SampledBatch) -> None:
        self.inbox.put(sampled)

    def _run(self) -> None:
        while True:
            sampled = self.inbox.get()
            if sampled is None:
                return
            started = time.perf_counter()
            idle = started - self.idle_since
            try:
                with self.teacher_lock:
                    scored, error = score_batch(self.session, sampled), None
                scored.timings["timing/teacher_idle_s"] = idle
            except BaseException as exc:  # handed to the trainer's thread, which raises it at that step
                scored, error = None, exc
            self.idle_since = time.perf_counter()
            with self.done:
                self.results[sampled.step] = (scored, error)
                self.done.notify_all()

    def result(self, step: int) -> ScoredBatch:
        with self.done:
            while step not in self.results:
                self.done.wait()
            scored, error = self.results.pop(step)
        if error is not None:
            raise error
        return scored

    def close(self) -> None:
        self.inbox.put(None)


class Pipeline:
    """Hands the trainer each step's scored batch, sampling and scoring up to max_staleness steps ahead."""

    def __init__(self, session: Session, last_step: int, in_flight: list[SampledBatch] = ()):
        """last_step: the last step any batch is sampled for. in_flight: batches a checkpoint kept, sampled
        for the steps after session.start_step, in order."""
        self.session, self.last_step = session, last_step
        self.ahead = session.config.rollout.max_staleness
        self.sampled: dict[int, SampledBatch] = {}  # sampled and not yet consumed: what a checkpoint keeps
        overlap = self.ahead > 0 and not session.teacher_sharded
        self.scoring = _ScoringThread(session) if overlap else None
        # A teacher on a server scores each prompt's group as soon as it is sampled (not at max_staleness 0:
        # grouping rows otherwise could move a server's numerics, and 0 is the loop as it always was).
        streams = overlap and session.rollouts.streams and on_servers(session.teacher) and not session.scored_by_sampler
        # As many calls at once as the teachers take requests at once (teacher.concurrency).
        self.max_calls = max((each.concurrency for each in session.config.teacher_configs.values()), default=1)
        self.stream_pool = ThreadPoolExecutor(self.max_calls, thread_name_prefix="opd-streamed") if streams else None
        self.pad_id = session.student.tokenizer.pad_token_id
        self.next_step = session.start_step + 1  # the next step to sample a batch for
        # Rollout servers: their faults are agreed on by every rank, and with max_staleness >= 1 they draw
        # the batch ahead on a thread of their own while the trainer updates (opd.rollout.vllm_server_engine).
        self.remote = getattr(session.rollouts, "remote", False)
        beside = self.remote and self.ahead > 0 and session.rollouts.samples_elsewhere
        self.drawer = ThreadPoolExecutor(1, thread_name_prefix="opd-sampling") if beside else None
        self.drawing: tuple[int, Future, StepPrompts] | None = None  # (step, its draws, its prompts) on the drawer
        for sampled in in_flight:
            self._send(sampled)
        if in_flight:
            session.stream.mark_taken(in_flight[-1].prompts.positions.stop)

    def _send(self, sampled: SampledBatch) -> None:
        self.sampled[sampled.step] = sampled
        self.next_step = sampled.step + 1
        if self.scoring is not None:
            self.scoring.submit(sampled)

    def take(self, step: int) -> ScoredBatch:
        """Step `step`'s scored batch, the current weights being version step - 1. First samples, from
        those weights, every batch up to `max_staleness` steps ahead that is not sampled yet."""
        while self.next_step <= min(step + self.ahead, self.last_step):
            self._settle_drawing(step - 1)  # its weights are replaced by the next sync
            if self.drawer is not None:
                self._draw_beside(self.next_step, step - 1)
            elif self.remote:
                started, prompts, target = time.perf_counter(), take_prompts(self.session), self.next_step
                sync_s = self.session.rollouts.sync_weights(step - 1)
                draws = lambda: draw_batch(self.session, prompts, target, step - 1, self._streamed(), started, sync_s)  # noqa: E731
                self._send(self._agreed(draws, target, step - 1, prompts))
            else:
                self._send(sample_batch(self.session, self.next_step, step - 1, self._streamed()))
        if self.drawing is not None and self.drawing[0] == step:
            self._settle_drawing(step - 1)
        sampled = self.sampled.pop(step)
        if self.scoring is None:
            scored = score_batch(self.session, sampled)
        else:
            waiting = time.perf_counter()
            scored = self.scoring.result(step)
            scored.timings["timing/wait_s"] = time.perf_counter() - waiting
        agree_on_grading(self.session, scored)
        return scored

    def _streamed(self) -> StreamedScores | None:
        if self.stream_pool is None:
            return None
        return StreamedScores(self.session.teacher, self.stream_pool, self.pad_id, self.max_calls)

    def _draw_beside(self, target: int, version: int) -> None:
        """Take the target step's prompts and sync the servers here (a sharded student's gathers are
        collectives), then leave the draws to the drawer thread."""
        started = time.perf_counter()
        prompts = take_prompts(self.session)
        sync_s = self.session.rollouts.sync_weights(version)
        streamed = self._streamed()
        call = self.drawer.submit(draw_batch, self.session, prompts, target, version, streamed, started, sync_s)
        self.drawing = (target, call, prompts)
        self.next_step = target + 1

    def _settle_drawing(self, version: int) -> None:
        """The batch under way on the drawer, finished (or sampled again from the current weights, `version`,
        where its server restarted meanwhile) and sent on to scoring."""
        if self.drawing is None:
            return
        target, call, prompts = self.drawing
        self.drawing = None
        self._send(self._agreed(call.result, target, version, prompts))

    def _agreed(self, draw, target: int, version: int, prompts) -> SampledBatch:
        """draw()'s batch, where every rank's draws succeeded. A rollout server that restarted on any rank's
        watch: every rank has the weights pushed again (to the servers that lost them) and samples its
        prompts again, from the current weights, `version`. Any other fault stops every rank with its line."""
        session, attempt = self.session, draw
        for _ in range(RESAMPLINGS + 1):
            try:
                sampled, fault = attempt(), None
            except ServerRestarted as exc:
                sampled, fault = None, ("restarted", str(exc))
            except RolloutServerError as exc:
                sampled, fault = None, ("failed", str(exc))
            faults = [each for each in session.world.gather(fault) if each is not None]
            if not faults:
                return sampled
            failed = [message for kind, message in faults if kind == "failed"]
            if failed:
                raise RolloutServerError(failed[0])
            if session.world.is_main:
                print(f"warning: step {target}: {faults[0][1]}; its weights pushed again, its prompts sampled again")

            def attempt():
                started = time.perf_counter()
                sync_s = session.rollouts.sync_weights(version)
                return draw_batch(session, prompts, target, version, self._streamed(), started, sync_s)

        raise RolloutServerError(f"step {target}: {faults[0][1]}, {RESAMPLINGS + 1} times in a row; stopping")

    def in_flight(self, version: int) -> list[SampledBatch]:
        """The batches sampled ahead and not yet consumed, in step order (the one under way finished first).
        version: the current weights' (the last step updated)."""
        if self.drawing is not None:
            self._settle_drawing(version)
        return [self.sampled[step] for step in sorted(self.sampled)]

    @contextmanager
    def teacher_between_batches(self):
        """The teacher to use outside the pipeline (evaluation), with no batch being scored meanwhile."""
        if self.scoring is None:
            yield
            return
        with self.scoring.teacher_lock:
            yield

    def close(self) -> None:
        if self.scoring is not None:
            self.scoring.close()
        if self.stream_pool is not None:
            self.stream_pool.shutdown(wait=False, cancel_futures=True)
        if self.drawer is not None:
            self.drawer.shutdown(wait=False, cancel_futures=True)
