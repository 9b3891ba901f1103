"""The teacher on a server against the teacher in the process, for the demo's models on this machine.

    python benchmarks/teacher_server.py [--steps 12] [--repeats 5]

Reports:
1. scoring tokens per second of one step's rollouts (16 prompts x 4 samples x up to 40 tokens): the
   local teacher, and `opd serve-teacher` on 127.0.0.1 through opd's client;
2. the server's throughput for many small requests (one prompt's 4 samples each) from 1 client and
   from 8 concurrent clients, which dynamic batching puts in one forward;
3. one small request's round trip (the fixed cost of going over HTTP);
4. the whole training step, local against remote teacher (`opd train` on the demo config).
The server runs in its own process with one thread, the client side with one: the two share the
machine's two cores, as a trainer and a server on one GPU box would share it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import yaml

from opd.config.sections import TeacherConfig
from opd.data.prompts import load_prompts
from opd.demo.run import ASSETS, demo_config
from opd.demo.task import write_split
from opd.io.sinks import read_metrics
from opd.models.loading import load_model
from opd.models.precision import Precision
from opd.rollout.sampler import ModelSampler, SamplingSettings
from opd.teachers.local import load_teacher
from opd.teachers.remote import RemoteTeacher


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, port: int) -> subprocess.Popen:
    job = subprocess.Popen(
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
        ],
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wait_healthy(f"http://127.0.0.1:{port}", job, timeout_s=60)
    return job


def wait_healthy(url: str, job: subprocess.Popen, timeout_s: float, log: Path | None = None) -> None:
    """Until url/health answers 200; SystemExit where the server exits first or takes past timeout_s."""
    where = f"; its log: {log}" if log is not None else ""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if job.poll() is not None:
            raise SystemExit(f"the server exited{where}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"the server did not start in {timeout_s:.0f} s{where}")


def timed(function, repeats: int) -> float:
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def step_seconds(work: Path, teacher: dict, steps: int, name: str) -> dict[str, float]:
    raw = demo_config(work).model_dump(mode="json")
    raw["run"].update(output_dir=str(work / name), max_steps=steps, save_every=0, eval_every=0, progress=False)
    raw["data"]["eval"] = None
    raw["teacher"] = teacher
    raw["optim"].update(warmup_steps=0)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    subprocess.run(
        [sys.executable, "-m", "opd", "train", str(path)],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    rows = [row for row in read_metrics(work / name / "metrics.jsonl") if row["step"] > 1]
    parts = {key: sum(row[f"timing/{key}_s"] for row in rows) / len(rows) for key in ("rollout", "teacher", "update")}
    return {**parts, "step": sum(parts.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "data").mkdir()
        write_split(work / "data" / "train.jsonl", 400, seed=1)
        for name in ("teacher", "student"):
            shutil.copytree(ASSETS / name, work / "models" / name)
        port = free_port()
        server = start_server(work / "models" / "teacher", port)
        url = f"http://127.0.0.1:{port}"
        try:
            precision = Precision.resolve("fp32", "cpu")
            student = load_model(str(work / "models" / "student"), "student", precision.device)
            local = load_teacher(str(work / "models" / "teacher"), "teacher", precision)
            remote = RemoteTeacher(TeacherConfig(url=url), local.loaded.vocab_size)
            remote.check(student.tokenizer)
            config = demo_config(work)
            prompts = load_prompts(str(work / "data" / "train.jsonl"), "data", student.tokenizer, 64)
            sampler = ModelSampler(student, SamplingSettings.of(config.rollout), precision)
            batch = sampler.sample(prompts.batch(list(range(16))), 4, 0)
            tokens = batch.num_tokens
            local_s = timed(lambda: local.score(batch), args.repeats)
            remote_s = timed(lambda: remote.score(batch), args.repeats)

            shares = [batch.select(list(range(row, row + 4))) for row in range(0, len(batch), 4)]

            def many(clients: int) -> float:
                with ThreadPoolExecutor(clients) as pool:
                    return timed(lambda: list(pool.map(remote.score, shares)), args.repeats)

            one_client, eight_clients = many(1), many(8)
            tiny = batch.select([0])
            round_trip = sorted(timed(lambda: remote.score(tiny), 1) for _ in range(20))[10]
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
        local_step = step_seconds(work, {"path": str(work / "models" / "teacher")}, args.steps, "local")
        server = start_server(work / "models" / "teacher", port)
        try:
            remote_step = step_seconds(work, {"url": url}, args.steps, "remote")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()

    print(f"one step's rollouts: {len(batch)} rows, {tokens} completion tokens")
    print("| teacher | scoring tokens/s | seconds per step's scoring |")
    print("| --- | ---: | ---: |")
    print(f"| local (in the trainer's process) | {tokens / local_s:,.0f} | {local_s:.3f} |")
    print(f"| opd serve-teacher, 127.0.0.1 | {tokens / remote_s:,.0f} | {remote_s:.3f} |")
    print(f"one row's round trip (median of 20): {round_trip * 1000:.1f} ms")
    print()
    print("| clients, 16 requests of 4 rows | scoring tokens/s |")
    print("| --- | ---: |")
    print(f"| 1 | {tokens / one_client:,.0f} |")
    print(f"| 8 concurrent | {tokens / eight_clients:,.0f} |")
    print()
    print("| training step (demo config) | rollout s | teacher s | update s | step s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in (("local teacher", local_step), ("remote teacher", remote_step)):
        print(f"| {name} | {row['rollout']:.3f} | {row['teacher']:.3f} | {row['update']:.3f} | {row['step']:.3f} |")
    print(
        f"remote adds {remote_step['step'] / local_step['step'] - 1:+.1%} to the step "
        f"({remote_step['teacher'] - local_step['teacher']:+.3f} s in teacher scoring)"
    )


if __name__ == "__main__":
    main()
