"""The OpenMP spin opd chooses for itself and its child processes, and the user's choice kept.

Each case runs in a fresh interpreter: the setting only counts before torch loads its OpenMP runtime."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from opd.distributed.threads import USER_WAIT_SETTINGS as SETTINGS


def spin_after(code: str, **env: str) -> str:
    """GOMP_SPINCOUNT as a fresh interpreter has it after `code`, in an environment with only `env` of
    the wait settings."""
    clean = {key: value for key, value in os.environ.items() if key not in SETTINGS}
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport os; print(os.environ.get('GOMP_SPINCOUNT'))"],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_the_command_line_shortens_the_idle_spin_before_torch_loads():
    """Every `opd` command goes through main, which sets the spin first (here with --help, which
    imports nothing heavy)."""
    code = (
        "import sys\nfrom opd.cli import main\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert spin_after(code) == "3000"


@pytest.mark.parametrize(
    "setting, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "100000"), ("KMP_BLOCKTIME", "0")]
)
def test_a_users_own_wait_setting_is_kept(setting, value):
    code = "from opd.distributed.threads import shorten_idle_spin\nassert not shorten_idle_spin()"
    expected = value if setting == "GOMP_SPINCOUNT" else "None"
    assert spin_after(code, **{setting: value}) == expected


def test_nothing_is_set_once_torch_has_loaded():
    """Its runtime read the environment already: a count set now would not describe this process."""
    code = "import torch\nfrom opd.distributed.threads import shorten_idle_spin\nassert not shorten_idle_spin()"
    assert spin_after(code) == "None"


def test_child_processes_inherit_the_spin():
    """torchrun's ranks and a teacher server started by opd spin the same way."""
    code = (
        "import subprocess, sys\nfrom opd.distributed.threads import shorten_idle_spin\n"
        "shorten_idle_spin()\n"
        "subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"GOMP_SPINCOUNT\"])'], check=True)"
    )
    clean = {key: value for key, value in os.environ.items() if key not in SETTINGS}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean, timeout=120)
    assert result.stdout.split() == ["3000"], result.stderr[-2000:]
