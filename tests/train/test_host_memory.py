"""Freed host memory is kept for reuse on CPU runs: opd asks glibc for exactly the thresholds it means,
and leaves malloc alone where the user tuned it. Checked against a stand-in libc, so the test is about
what opd asks, not about the platform's page-fault counts."""

from __future__ import annotations

import ctypes

import pytest

from opd.train import host_memory


class FakeLibc:
    """Records mallopt calls; refuses a value past a C int, as ctypes does once argtypes are declared
    (an undeclared one wraps: 4 GiB became 0 once, which silently made things worse)."""

    def __init__(self):
        self.calls, self.mallopt = [], self

    def __call__(self, parameter, value):
        assert self.argtypes == [ctypes.c_int, ctypes.c_int]
        if not -(2**31) <= value < 2**31:
            raise ctypes.ArgumentError("value out of int range")
        self.calls.append((parameter, value))
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(host_memory.platform, "system", lambda: "Linux")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: libc)
    for name in host_memory.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return libc


def test_thresholds_keep_blocks_below_a_gibibyte_on_the_heap(fake_libc):
    assert host_memory.keep_freed_memory() is True
    assert fake_libc.calls == [(host_memory.M_MMAP_THRESHOLD, 1 << 30), (host_memory.M_TRIM_THRESHOLD, 2**31 - 1)]
    assert host_memory.MMAP_THRESHOLD > 64 * 2**20  # a 64 MiB logits chunk is reused, not unmapped


@pytest.mark.parametrize("variable", host_memory.USER_SETTINGS)
def test_nothing_is_changed_where_the_user_tuned_malloc(fake_libc, monkeypatch, variable):
    monkeypatch.setenv(variable, "131072")
    assert host_memory.keep_freed_memory() is False
    assert fake_libc.calls == []


def test_nothing_is_changed_off_glibc(fake_libc, monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.keep_freed_memory() is False and fake_libc.calls == []
