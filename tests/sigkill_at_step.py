"""`opd` whose every process kills itself with SIGKILL when it reaches step $OPD_SIGKILL_AT_STEP, before
sampling: a hard crash at a known place, after the checkpoints of the steps before it."""

import os
import signal

import opd.train.trainer
from opd.cli import main

_train_step = opd.train.trainer.train_step


def _dying_step(session, config, step, *args, **kwargs):
    if step == int(os.environ["OPD_SIGKILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return _train_step(session, config, step, *args, **kwargs)


opd.train.trainer.train_step = _dying_step
raise SystemExit(main())
