"""Asynchronous OPD on the demo: what rollout.max_staleness buys, and what the stale batches' correction does.

    python benchmarks/async_opd.py corrections [--staleness 2] [--seeds 0 1] [--forward-kl both]   # ~1 min a run
    python benchmarks/async_opd.py throughput [--steps 30] [--rounds 2] [--scenarios remote latency vllm]

corrections: the demo's 150 steps at max_staleness 0 and at --staleness with each correction of the
reverse-KL advantage (the sampler's log-probs or the current student's, rho untruncated or truncated at
2), with the default forward-KL term and without it (the plain sampled-token reward, which staleness
hurts most); the held-out reverse KL, accuracy and entropy at the end.

throughput: max_staleness 0, 1 and 2 alternated, --rounds times, in three settings: (remote) the teacher
behind `opd serve-teacher` in a process of its own; (latency) the same server behind a proxy that adds
150 ms to each request, as a remote pool does; (vllm) rollout.engine vllm with the teacher in the
process. Each run: --steps steps at a constant lr (the same batches for each N up to their versions),
then the same again with the wall time of the serial run as its limit (equal time). Reports completion
tokens per second, each stage's share of the step (sampling, the trainer waiting for scores, the
update; the scoring thread's busy share), and the held-out reverse KL and accuracy at equal steps and
at equal wall time. The server gets one thread, the trainer one: the machine's two cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from teacher_server import free_port, start_server  # noqa: E402  (the benchmarks' own helpers)

from opd.config.files import validate  # noqa: E402
from opd.demo.run import ASSETS, demo_config  # noqa: E402
from opd.demo.task import write_split  # noqa: E402
from opd.io.sinks import read_metrics  # noqa: E402
from opd.train.trainer import train  # noqa: E402

CORRECTIONS = {  # name: (loss.advantage_logprobs, loss.ratio_clip)
    "sampler": ("sampler", None),
    "sampler, rho<=2": ("sampler", 2.0),
    "current": ("current", None),
    "current, rho<=2": ("current", 2.0),
}


def demo_inputs(root: Path) -> dict:
    """The demo's models and data under root, and its config as a dict."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    write_split(root / "data" / "train.jsonl", 4000, seed=1)
    write_split(root / "data" / "eval.jsonl", 200, seed=2)
    for name in ("teacher", "student"):
        shutil.copytree(ASSETS / name, root / "models" / name, dirs_exist_ok=True)
    raw = demo_config(root).model_dump(mode="json", exclude_unset=True)
    raw["run"]["progress"] = False
    return raw


def run(raw: dict, out: Path, time_limit_s: float | None = None, **sections) -> dict:
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for section, values in sections.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    raw["run"]["output_dir"] = str(out)
    started = time.perf_counter()
    result = train(validate(raw), log=lambda *_: None, time_limit_s=time_limit_s)
    rows = read_metrics(out / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)
    return {"eval": result.last_eval, "rows": rows, "wall_s": time.perf_counter() - started}


def corrections(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = demo_inputs(Path(tmp))
        print(f"demo, 150 steps; max_staleness {args.staleness} unless 0 is named; torch {torch.__version__}")
        print("| forward-KL term | batches | correction | held-out reverse KL | accuracy | entropy |")
        print("|---|---|---|---|---|---|")
        for forward in {"both": (None, 0.0), "default": (None,), "off": (0.0,)}[args.forward_kl]:
            term = "default (1.0)" if forward is None else "off"
            variants = [("max_staleness 0", 0, "sampler", None)] + [
                (f"max_staleness {args.staleness}", args.staleness, *choice) for choice in CORRECTIONS.values()
            ]
            for (label, staleness, logprobs, clip), name in zip(variants, ["on-policy", *CORRECTIONS]):
                results = [
                    run(
                        raw,
                        Path(tmp) / "run",
                        run={"seed": seed, "save_every": 0, "eval_every": 0},
                        rollout={"max_staleness": staleness},
                        loss={"forward_kl_coef": forward, "advantage_logprobs": logprobs, "ratio_clip": clip},
                    )["eval"]
                    for seed in args.seeds
                ]
                figures = [
                    statistics.mean(result[key] for result in results)
                    for key in ("eval/distill/reverse_kl", "eval/accuracy", "eval/entropy/student")
                ]
                print(
                    f"| {term} | {label} | {name} | {figures[0]:.3f} | {figures[1]:.1%} | {figures[2]:.3f} |",
                    flush=True,
                )


class _LatencyProxy(BaseHTTPRequestHandler):
    """Forwards every request to the server after `delay_s`."""

    target, delay_s = "", 0.0
    protocol_version = "HTTP/1.1"

    def _forward(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(self.delay_s)
        headers = {
            key: value for key, value in self.headers.items() if key.lower() in ("content-type", "authorization")
        }
        answer = httpx.request(method, self.target + self.path, content=body, headers=headers, timeout=600)
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def do_GET(self):
        self._forward("GET")

    def do_POST(self):
        self._forward("POST")

    def log_message(self, *_):
        pass


def start_proxy(target: str, delay_s: float) -> str:
    handler = type("Proxy", (_LatencyProxy,), {"target": target, "delay_s": delay_s})
    proxy = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{proxy.server_address[1]}"


def summarize(result: dict) -> dict:
    """Tokens per second over the run's steps, and each stage's share of the summed step time."""
    rows = [row for row in result["rows"] if "timing/step_s" in row]
    tokens = sum(row["throughput/tokens_per_s"] * row["timing/step_s"] for row in rows)
    total = sum(row["timing/step_s"] for row in rows)
    share = {
        stage: sum(row.get(f"timing/{stage}_s", 0.0) for row in rows) / total
        for stage in ("rollout", "wait", "update", "teacher")
    }
    return {"tokens_per_s": tokens / total, "steps": len(rows), **share}


def throughput(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = demo_inputs(Path(tmp))
        raw["run"].update(save_every=0, eval_every=0, max_steps=args.steps)
        raw["optim"].update(schedule="constant", warmup_steps=0)
        os.environ["OMP_NUM_THREADS"] = "1"  # the trainer's process: one core, the server the other
        torch.set_num_threads(1)
        for scenario in args.scenarios:
            server = None
            sections: dict = {}
            if scenario in ("remote", "latency"):
                port = free_port()
                server = start_server(Path(tmp) / "models" / "teacher", port)
                url = f"http://127.0.0.1:{port}"
                if scenario == "latency":
                    url = start_proxy(url, 0.150)
                sections["teacher"] = {"path": None, "url": url}
            else:
                sections["rollout"] = {"engine": "vllm"}
            try:
                by_staleness: dict[int, list] = {0: [], 1: [], 2: []}
                for _ in range(args.rounds):
                    serial_s = None
                    for staleness in (0, 1, 2):
                        rollout = {**sections.get("rollout", {}), "max_staleness": staleness}
                        steps = run(raw, Path(tmp) / "run", **{**sections, "rollout": rollout})
                        loop_s = sum(row["timing/step_s"] for row in steps["rows"] if "timing/step_s" in row)
                        serial_s = serial_s or loop_s
                        timed = run(
                            raw,
                            Path(tmp) / "run",
                            time_limit_s=serial_s,
                            **{**sections, "rollout": rollout, "run": {"max_steps": 10 * args.steps}},
                        )
                        by_staleness[staleness].append((steps, timed))
                print(f"\n{scenario}: {args.steps} steps, {args.rounds} rounds (medians); torch {torch.__version__}")
                print(
                    "| max_staleness | tokens/s | sampling | waiting for scores | update | scoring thread busy "
                    "| reverse KL, equal steps | accuracy | steps in the serial run's time | reverse KL, equal time "
                    "| accuracy |"
                )
                print("|---|---|---|---|---|---|---|---|---|---|---|")
                for staleness, runs in by_staleness.items():
                    figures = [summarize(steps) for steps, _ in runs]
                    med = {key: statistics.median(each[key] for each in figures) for key in figures[0]}
                    kl = statistics.median(steps["eval"]["eval/distill/reverse_kl"] for steps, _ in runs)
                    accuracy = statistics.median(steps["eval"]["eval/accuracy"] for steps, _ in runs)
                    timed_kl = statistics.median(timed["eval"]["eval/distill/reverse_kl"] for _, timed in runs)
                    timed_accuracy = statistics.median(timed["eval"]["eval/accuracy"] for _, timed in runs)
                    timed_steps = statistics.median(
                        sum("timing/step_s" in row for row in timed["rows"]) for _, timed in runs
                    )
                    print(
                        f"| {staleness} | {med['tokens_per_s']:.0f} | {med['rollout']:.0%} | {med['wait']:.0%} "
                        f"| {med['update']:.0%} | {med['teacher']:.0%} | {kl:.3f} | {accuracy:.1%} | {timed_steps:.0f} "
                        f"| {timed_kl:.3f} | {timed_accuracy:.1%} |",
                        flush=True,
                    )
            finally:
                if server is not None:
                    os.killpg(server.pid, signal.SIGTERM)
                    server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    correction = commands.add_parser("corrections")
    correction.add_argument("--staleness", type=int, default=2)
    correction.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    correction.add_argument(
        "--forward-kl", choices=["both", "default", "off"], default="both", help="the default's forward-KL term"
    )
    speed = commands.add_parser("throughput")
    speed.add_argument("--steps", type=int, default=30)
    speed.add_argument("--rounds", type=int, default=2)
    speed.add_argument("--scenarios", nargs="+", default=["remote", "latency", "vllm"])
    args = parser.parse_args()
    corrections(args) if args.command == "corrections" else throughput(args)


if __name__ == "__main__":
    main()
