"""`opd` whose every process kills itself with SIGKILL when it reaches step $OPD_SIGKILL_AT_STEP, before
sampling: a hard crash at a known place, after the checkpoints of the steps before it."""

import os
import signal

import opd.train.trainer
from opd.cli import main

_produce_batch = opd.train.trainer.produce_batch


def _dying_produce(session, step, *args, **kwargs):
    if step == int(os.environ["OPD_SIGKILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return _produce_batch(session, step, *args, **kwargs)


opd.train.trainer.produce_batch = _dying_produce
raise SystemExit(main())
