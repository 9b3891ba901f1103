"""`opd` whose every process kills itself with SIGKILL at a known place, after the checkpoints of the
steps before it: when it is about to sample step $OPD_SIGKILL_AT_STEP's batch, or (with
$OPD_SIGKILL_WHILE_SCORING set) while that batch is being scored, on the scoring thread where the run
has one."""

import os
import signal

import opd.train.pipeline
from opd.cli import main

_sample_batch, _score_batch = opd.train.pipeline.sample_batch, opd.train.pipeline.score_batch
_KILL_STEP = int(os.environ["OPD_SIGKILL_AT_STEP"])
_WHILE_SCORING = bool(os.environ.get("OPD_SIGKILL_WHILE_SCORING"))


def _dying_sample(session, step, *args, **kwargs):
    if step == _KILL_STEP and not _WHILE_SCORING:
        os.kill(os.getpid(), signal.SIGKILL)
    return _sample_batch(session, step, *args, **kwargs)


def _dying_score(session, sampled):
    if sampled.step == _KILL_STEP and _WHILE_SCORING:
        os.kill(os.getpid(), signal.SIGKILL)
    return _score_batch(session, sampled)


opd.train.pipeline.sample_batch, opd.train.pipeline.score_batch = _dying_sample, _dying_score
raise SystemExit(main())
