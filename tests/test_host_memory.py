"""Freed host memory is reused on CPU runs: no page faults for a block the size of a logits chunk."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from opd.host_memory import keep_freed_memory

FAULTS_PER_MULTIPLY = """
import resource, sys, torch
from opd.host_memory import keep_freed_memory
print(keep_freed_memory(), file=sys.stderr)
block = torch.ones(2048, 8192)  # 64 MiB, as a chunk of fp32 logits at an 8k vocabulary
for _ in range(10):  # glibc's heap settles after a few blocks (aligned allocations)
    block * 2.0
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    block * 2.0
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")


def faults_per_multiply(env: dict) -> tuple[float, str]:
    done = subprocess.run([sys.executable, "-c", FAULTS_PER_MULTIPLY], capture_output=True, text=True, env=env, check=True)
    return float(done.stdout), done.stderr.strip()


@glibc_only
def test_a_freed_64_mib_block_is_reused_instead_of_faulted_in_again():
    env = {key: value for key, value in os.environ.items() if key not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    kept, applied = faults_per_multiply(env)
    assert applied == "True" and kept < 100  # 64 MiB is 16,384 pages of 4 KiB
    default, applied = faults_per_multiply({**env, "GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert applied == "False" and default > 10_000  # the user's own malloc settings are left alone


def test_nothing_is_changed_where_the_user_tuned_malloc(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
