"""How the CPU's intra-op threads wait, chosen before torch loads its OpenMP runtime.

torch splits every CPU operation over all cores, and between two operations each OpenMP worker spins
on its core waiting for the next one (libgomp's default: about 300,000 spins). On an idle machine that
saves a wake-up per operation. Beside anything else CPU-bound (a second rank under torchrun, a test
run, a browser) a spinning worker holds the core that the slowest thread of the same operation needs,
and decoding, thousands of tiny operations a step, slows down 7–40×. Sleeping workers cost a wake-up
per operation instead, which does not depend on the rest of the machine.

A passive wait changes no result: the same threads split the same work the same way (unlike fewer
threads, which reorders float sums). Measured in benchmarks/busy_machine.py; figures in the README.
"""

from __future__ import annotations

import os
import sys

# The variables through which a user chooses the wait themselves (libgomp's, and Intel OpenMP's).
USER_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def sleep_waiting_threads() -> bool:
    """Let idle OpenMP workers sleep (OMP_WAIT_POLICY=PASSIVE) in this process and the processes it
    starts (torchrun's ranks, a teacher server), unless the user chose a wait policy or torch is already
    loaded (its runtime read the environment then: setting it now would only mislead child processes'
    readers of this environment about this one). Returns whether it set the policy."""
    if any(name in os.environ for name in USER_WAIT_SETTINGS) or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
