"""Data-parallel scaling on this machine: completion tokens per second with 1 and 2 ranks (torchrun,
gloo on CPU), and each step's communication volume.

    python benchmarks/scaling.py [--steps 6] [--work runs/vs-trl/work]

Models and prompts are benchmarks/vs_trl.py's (built there on first use): a 5.2M-parameter Qwen3
student and a 23M teacher, 8 GSM8K prompts x 4 samples x up to 128 new tokens per step, fp32,
full-vocabulary reverse KL. Each configuration is one `opd train` run; the first step is a warm-up and
left out. With R ranks of T threads each, R x T is the machine's 2 cores in every row. The student (its
LM head tied to its embeddings) is replicated in the first two rows and sharded with FSDP2 in the third,
where sampling runs Hugging Face's forward instead of the lean decoding step (which reads weights
directly), so the rollout column also compares the two decoders.

Communication per step and rank, data-parallel: one all-reduce of the student's gradients (a ring
all-reduce sends and receives 2 (R - 1) / R of the gradient bytes) plus a few scalars and the
gathered metrics (a few kilobytes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from opd.io.sinks import read_metrics
from opd.models.loading import load_model
from opd.ops.flops import matmul_parameters

HERE = Path(__file__).resolve().parent


def run(work: Path, ranks: int, threads: int, steps: int, scratch: Path, shard: bool = False) -> dict:
    output_dir = scratch / f"ranks-{ranks}-{shard}"
    config = {
        "run": {
            "output_dir": str(output_dir),
            "max_steps": steps,
            "precision": "fp32",
            "device": "cpu",
            "progress": False,
        },
        "student": {"path": str(work / "models" / "student"), "shard": shard},
        "teacher": {"path": str(work / "models" / "teacher")},
        "data": {"train": str(work / "data" / "train.jsonl"), "shuffle": False, "max_prompt_tokens": 512},
        "rollout": {"samples_per_prompt": 4, "max_new_tokens": 128},
        "loss": {"kind": "reverse_kl"},
        "batch": {"prompts_per_step": 8, "micro_batch_size": 32},
        "optim": {"lr": 1e-3, "schedule": "constant"},
    }
    path = scratch / f"ranks-{ranks}-{shard}.yaml"
    path.write_text(yaml.safe_dump(config))
    with socket.socket() as probe:  # a free port on the loopback interface
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
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
            f"--master-port={port}",
            f"--nproc-per-node={ranks}",
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run([*launcher, "-m", "opd", "train", str(path)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{ranks} ranks failed: {done.stderr.strip().splitlines()[-1]}")
    rows = [row for row in read_metrics(output_dir / "metrics.jsonl") if row["step"] > 1]
    seconds = sum(row["timing/rollout_s"] + row["timing/teacher_s"] + row["timing/update_s"] for row in rows)
    tokens = sum(row["generation/avg_length"] * 32 for row in rows)
    rollout_s = sum(row["timing/rollout_s"] for row in rows)
    return {
        "ranks": ranks,
        "threads": threads,
        "shard": shard,
        "tokens_per_s": tokens / seconds,
        "steps": len(rows),
        "rollout_tokens_per_s": tokens / rollout_s,
        "split": [
            sum(row[key] for row in rows) / seconds
            for key in ("timing/rollout_s", "timing/teacher_s", "timing/update_s")
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--work", type=Path, default=HERE.parent / "runs" / "vs-trl" / "work")
    parser.add_argument("--gsm8k", type=Path, default=HERE.parent.parent / "shared" / "data" / "gsm8k")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from vs_trl import build_work

    work = build_work(args.work, args.gsm8k)
    student = load_model(str(work / "models" / "student"), "student", torch.device("cpu")).model
    gradient_bytes = 4 * sum(p.numel() for p in student.parameters())
    with tempfile.TemporaryDirectory() as scratch:
        results = [
            run(work, ranks, threads, args.steps, Path(scratch), shard)
            for ranks, threads, shard in ((1, 2, False), (2, 1, False), (2, 1, True))
        ]
    lines = [
        "| ranks x threads | student | completion tokens/s | sampling tokens/s | rollout / teacher / update "
        "| communication per step and rank |",
        "| --- | --- | ---: | ---: | --- | ---: |",
    ]
    for result in results:
        ranks, share = result["ranks"], (result["ranks"] - 1) / result["ranks"]
        if ranks == 1:
            volume = "none"
        elif result["shard"]:  # all-gathers for sampling, the update's forward and its backward; one reduce-scatter
            volume = f"about {4 * share * gradient_bytes / 2**20:.0f} MiB (3 all-gathers + 1 reduce-scatter)"
        else:
            volume = f"{2 * share * gradient_bytes / 2**20:.0f} MiB (1 all-reduce)"
        split = " / ".join(f"{part:.0%}" for part in result["split"])
        layout = "sharded (FSDP2)" if result["shard"] else "replicated"
        lines.append(
            f"| {ranks} x {result['threads']} | {layout} | {result['tokens_per_s']:,.0f} | "
            f"{result['rollout_tokens_per_s']:,.0f} | {split} | {volume} |"
        )
    print(
        f"student: {matmul_parameters(student) / 1e6:.1f}M parameters in matrix products, "
        f"{gradient_bytes / 2**20:.1f} MiB of fp32 gradients"
    )
    print("\n".join(lines))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
