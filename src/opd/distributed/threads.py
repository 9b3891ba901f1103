"""How long the CPU's idle intra-op threads spin, chosen before torch loads its OpenMP runtime.

torch splits every CPU operation over all cores, and between two operations each OpenMP worker spins
on its core waiting for the next one (libgomp's default: 300,000 spins, about a millisecond). On an
idle machine that saves a wake-up per operation. Beside anything else CPU-bound (a second rank under
torchrun, a test run, a browser) a spinning worker holds the core that the slowest thread of the same
operation needs, and decoding, thousands of tiny operations a step, slows down many times over.

opd lets a worker spin 3,000 times (GOMP_SPINCOUNT), then sleep. Back-to-back tiny operations still
find their workers awake, so an idle machine runs as fast as with the long spin, and a busy one loses
little more than with sleeping at once (OMP_WAIT_POLICY=PASSIVE, which costs every operation a
wake-up: 1.8x slower steps on an idle machine). benchmarks/busy_machine.py measures the three; the
figures are in the README. No result changes: the same threads split the same work the same way
(unlike fewer threads, which reorders float sums).

GOMP_SPINCOUNT is libgomp's, the runtime of torch's Linux wheels. Intel's and LLVM's runtimes (torch
on macOS, some conda builds) read KMP_BLOCKTIME instead; opd leaves theirs as it is.
"""

from __future__ import annotations

import os
import sys

# The variables through which a user chooses the wait themselves (libgomp's, and Intel OpenMP's).
USER_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
SPIN_COUNT = "3000"


def shorten_idle_spin() -> bool:
    """Let idle OpenMP workers spin SPIN_COUNT times before they sleep, in this process and the processes
    it starts (torchrun's ranks, a teacher server), unless the user chose a wait setting or torch is
    already loaded (its runtime read the environment then: setting it now would describe child
    processes but not this one). Returns whether it set the count."""
    if any(name in os.environ for name in USER_WAIT_SETTINGS) or "torch" in sys.modules:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
