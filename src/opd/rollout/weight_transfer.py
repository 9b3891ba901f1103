"""The trainer's side of vLLM's weight-transfer protocol: the student's weights pushed to rollout servers
(`vllm serve` with its RL routes, VLLM_SERVER_DEV_MODE=1), a unit of the model at a time.

A push, per server: /pause (mode wait: requests in flight finish first; opd sends none during a push),
/start_weight_update, one /update_weights per unit with the unit's tensors broadcast from the trainer
at the same time, /finish_weight_update with the new version, /reset_prefix_cache (no KV block of the
old weights is reused), /resume. Two backends, chosen by rollout.vllm_server.weight_transfer:
- `nccl` (vLLM's own, GPUs on both sides): the trainer joins vLLM's NCCL group as its rank 0.
- `gloo` (opd's, registered in vLLM by opd.rollout.vllm_plugin): the same tensors over TCP, between
  any two processes. What a CPU uses, and what the tests run.

The gathering of an FSDP2-sharded student never interleaves with the send: each unit is gathered
whole (a collective of the trainer's ranks), then sent and, on GPUs, synchronized before the next
unit's gather begins (the hang TRL #7103 reported came from the two interleaving on one device). Only
the trainer's rank 0 talks to the servers; the other ranks take part in the gathers alone.
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from datetime import timedelta
from typing import Iterator

import torch

from opd.errors import OpdError

GLOO_BACKEND = "gloo"


class RolloutServerError(OpdError):
    """A rollout server refused a request, or could not be reached."""


class ServerUnreachable(RolloutServerError):
    """Nothing answered at the server's address (refused, dropped, timed out)."""


def gloo_group(address: str, port: int, rank: int, size: int, timeout_s: float, store=None):
    """A gloo process group of `size` over a TCPStore at address:port, apart from any default group
    (vLLM's own, the trainer's); rank 0 passes the store it hosts. Blocks until every rank has joined."""
    from torch import distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(address, port, is_master=False, timeout=timeout)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
    return dist.ProcessGroupGloo(dist.PrefixStore("opd-weights", store), rank, size, options)


def gloo_broadcast(group, tensor: torch.Tensor) -> None:
    """`tensor` from rank 0 of `group` (a gloo group of gloo_group's) into every other rank's, in place."""
    from torch import distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


class RolloutServer:
    """One `vllm serve` process, by URL: its JSON routes, with the API key where there is one."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s))
        self.answered = False  # it has answered once: unreachable since means a restart, worth waiting for
        self.workers = 1  # vLLM workers behind it (tensor x pipeline x data parallel), from its server_info
        self.group = None  # the weight-transfer group, once connected
        self.version: int | None = None  # the weight version it was last given by this run

    def call(self, method: str, path: str, json: dict | None = None, params: dict | None = None):
        """The route's JSON answer; ServerUnreachable where nothing answered, RolloutServerError for an
        answer other than 2xx (its status and message)."""
        import httpx

        try:
            response = self.client.request(method, self.url + path, json=json, params=params)
        except (httpx.TransportError, OSError) as exc:
            raise ServerUnreachable(f"{self.url}{path}: {type(exc).__name__}: {exc or 'no answer'}") from None
        if response.status_code >= 400:
            raise RolloutServerError(f"{self.url}{path}: HTTP {response.status_code}: {_message(response)}")
        try:
            return response.json()
        except ValueError:
            return response.text

    def post(self, path: str, json: dict | None = None, params: dict | None = None):
        return self.call("POST", path, json, params)

    def close(self) -> None:
        self.group = None
        self.client.close()


def _message(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body))
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error)[:300]
    return str(body)[:300]


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


class WeightPush:
    """Pushes the student's weights to rollout servers (see the module's docstring).

    backend: "gloo" or "nccl"; address: where the servers reach this process (the trainer's rank 0);
    is_sender: this process is the trainer's rank 0 (the others only take part in the gathers).
    """

    def __init__(self, backend: str, address: str, timeout_s: float, is_sender: bool):
        self.backend, self.address, self.timeout_s, self.is_sender = backend, address, timeout_s, is_sender
        self.bytes_sent = 0  # by the last push, to every server

    def connect(self, server: RolloutServer) -> None:
        """The handshake with one server (at the start, and again after it restarted): a group of this
        process (rank 0) and the server's workers. The server blocks in the call until the group forms."""
        size = 1 + server.workers
        if self.backend == GLOO_BACKEND:
            from torch import distributed as dist

            store = dist.TCPStore(self.address, 0, is_master=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=self.timeout_s))  # fmt: skip
            info = {"master_address": self.address, "master_port": store.port, "rank_offset": 1, "world_size": size,
                    "timeout_s": self.timeout_s}  # fmt: skip
            join = lambda: gloo_group(self.address, store.port, 0, size, self.timeout_s, store=store)  # noqa: E731
        else:
            from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

            port = _free_port(self.address)
            info = {"master_address": self.address, "master_port": port, "rank_offset": 1, "world_size": size,
                    "packed": False}  # fmt: skip
            device = torch.device("cuda", torch.cuda.current_device())
            join = lambda: stateless_init_process_group(self.address, port, 0, size, device)  # noqa: E731
        # The group forms on a thread of its own: a server that refuses the call never joins, and its
        # answer (why) must not wait behind the group's own timeout.
        answer = in_daemon(server.post, "/init_weight_transfer_engine", {"init_info": info})
        group = in_daemon(join)
        wait([answer, group], return_when=FIRST_EXCEPTION)
        if answer.done() and answer.exception() is not None:
            raise answer.exception()
        try:
            server.group = group.result()
        except Exception as exc:
            _raise_first(answer, exc, f"{server.url}: the weight-transfer group did not form")
        answer.result()

    def push(self, units: Iterator[list[tuple[str, torch.Tensor]]], version: int, servers: list[RolloutServer]) -> None:
        """Send every unit to every server and label the result `version`. Every rank of the trainer calls
        it together and consumes `units` to the end (a sharded student's gathers), even when a server
        fails: that raises only after."""
        self.bytes_sent = 0
        failure: BaseException | None = None
        try:
            if self.is_sender:
                for server in servers:
                    server.post("/pause", params={"mode": "wait"})
                    server.post("/start_weight_update")
            for unit in units:
                if self.is_sender and failure is None:
                    try:
                        for server in servers:
                            self._send_unit(server, unit)
                    except BaseException as exc:
                        failure = exc
            if failure is not None:
                raise failure
            if self.is_sender:
                for server in servers:
                    server.post("/finish_weight_update", {"weight_version": str(version)})
                    server.post("/reset_prefix_cache")
                    server.post("/resume")
                    server.version = version
        except BaseException:
            for unit in units:  # the rest of the gathers, which the other ranks are in
                pass
            for server in servers:  # its weights are now unknown: the next sync connects again and pushes them whole
                server.version, server.group = None, None
            raise

    def _send_unit(self, server: RolloutServer, unit: list[tuple[str, torch.Tensor]]) -> None:
        if server.group is None:
            raise RolloutServerError(f"{server.url}: no weight-transfer group (not connected)")
        info = {
            "names": [name for name, _ in unit],
            "dtype_names": [str(tensor.dtype).removeprefix("torch.") for _, tensor in unit],
            "shapes": [list(tensor.shape) for _, tensor in unit],
        }
        # The server receives inside its /update_weights call while this process broadcasts; the two wait
        # on each other, so each runs on a thread of its own, and a server that fails (and will never
        # take the rest) is heard at once instead of after the group's timeout.
        answer = in_daemon(server.post, "/update_weights", {"update_info": info})
        sending = in_daemon(self._broadcast_unit, server, unit)
        wait([answer, sending], return_when=FIRST_EXCEPTION)
        if answer.done() and answer.exception() is not None:
            server.group = None  # its broadcast may stay blocked until the group's timeout: never reuse it
            raise answer.exception()
        try:
            sending.result()
        except Exception as exc:
            _raise_first(answer, exc, f"{server.url}: sending weights failed")
        answer.result()

    def _broadcast_unit(self, server: RolloutServer, unit: list[tuple[str, torch.Tensor]]) -> None:
        for _, tensor in unit:
            self._broadcast(server, tensor.contiguous())
            self.bytes_sent += tensor.numel() * tensor.element_size()

    def _broadcast(self, server: RolloutServer, tensor: torch.Tensor) -> None:
        if self.backend == GLOO_BACKEND:
            gloo_broadcast(server.group, tensor.cpu())
        else:
            server.group.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
            torch.cuda.current_stream().synchronize()  # sent before the next unit's gather starts (TRL #7103)


def in_daemon(function, *args) -> Future:
    """function(*args) on a daemon thread of its own: one blocked in a transfer whose peer has gone never
    keeps the process from exiting (a ThreadPoolExecutor's threads are joined at exit)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="opd-weight-transfer", daemon=True).start()
    return future


def _raise_first(answer, exc: BaseException, what: str) -> None:
    """The server's own error where its call has failed (it usually says why), else `exc`."""
    try:
        answer.result(timeout=5)
    except RolloutServerError:
        raise
    except Exception:
        pass
    raise RolloutServerError(f"{what}: {type(exc).__name__}: {exc}") from exc


def api_key(configured: str | None, variable: str) -> str | None:
    return configured or os.environ.get(variable) or None
