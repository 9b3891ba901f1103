"""A warm parent for the suite's `python -m opd` commands and torchrun launchers: torch, transformers and
opd imported once, each command a fork of it, so a test pays for its command's work and not for seconds
of imports (a torchrun launcher's ranks are its own fresh processes, as ever).

Each command is still a process of its own, in a session of its own, with its own environment, working
folder, output files, exit status and signals: `python -m opd ARGS` as the user runs it, minus the
imports. What the imports read from the environment was read once, here, so a command whose environment
differs from the suite's in anything read at import time (tests/processes.py: `forkable`) runs as a
plain subprocess instead; so do servers, which are started once and live long.

Run as `python tests/forkserver.py SOCKET`: it imports, then serves requests on the Unix socket SOCKET
until its parent closes it. A request is one JSON line {"module", "argv", "env", "cwd", "stdout",
"stderr"} (`python -m MODULE ARGV...`); the
answer is a line with the command's pid, then, when it ends, a line with its exit status (negative: the
signal that ended it), as subprocess.Popen.returncode gives it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import threading


def warm_imports() -> None:
    from opd.distributed.threads import shorten_idle_spin

    shorten_idle_spin()  # as opd's main does, before torch loads
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM  # noqa: F401

    import opd.cli  # noqa: F401
    import opd.config.files  # noqa: F401
    import opd.train.evaluate  # noqa: F401
    import opd.train.trainer  # noqa: F401


def run_command(request: dict) -> None:
    """In the forked child: become `python -m MODULE ARGS` and never return (its SystemExit ends the
    interpreter as a command's own exit would: atexit handlers run, non-daemon threads are joined)."""
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads else DEFAULT_THREADS)
    import runpy

    module = request["module"]
    sys.argv = [module, *request["argv"]]
    sys.path[0] = os.getcwd()  # as `python -m` puts it: a user's module:function resolves from there
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    raise SystemExit(0)


def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    waiting: dict[socket.socket, bytes] = {}  # connections whose request is still arriving
    children: dict[int, socket.socket] = {}
    while True:
        readable, _, _ = select.select([listener, sys.stdin, *waiting], [], [], 0.02)
        if sys.stdin in readable and not sys.stdin.buffer.read1(1):
            return  # the suite has ended (or died): so does this server
        if listener in readable:
            connection, _ = listener.accept()
            waiting[connection] = b""
        for connection in [each for each in readable if each in waiting]:
            chunk = connection.recv(1 << 20)
            waiting[connection] += chunk
            if not chunk:
                waiting.pop(connection).close()
            elif waiting[connection].endswith(b"\n"):
                request = json.loads(waiting.pop(connection))
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    connection.close()
                    for other in [*waiting, *children.values()]:
                        other.close()
                    run_command(request)
                children[pid] = connection
                connection.sendall(f"{pid}\n".encode())
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid, None)
            if connection is not None:
                try:
                    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                connection.close()


if __name__ == "__main__":
    import torch

    DEFAULT_THREADS = torch.get_num_threads()
    warm_imports()
    if threading.active_count() != 1:  # forking a process with threads could copy a held lock
        raise SystemExit(f"forkserver: {threading.active_count()} threads after the imports; not forking")
    serve(sys.argv[1])
