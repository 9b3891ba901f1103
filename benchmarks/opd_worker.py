"""opd's side of benchmarks/vs_trl.py: one training run in its own process, timed per step.

    python benchmarks/opd_worker.py --work WORK --settings JSON --warmup-steps W \
        (--steps N | --wall-seconds S) --out RESULT.json [--save-student DIR]

WORK holds models/{student,teacher} and data/train.jsonl (see vs_trl.py). Settings keys:
samples_per_prompt, max_new_tokens, prompts_per_step, temperature, lr, seed, precision (fp32|bf16),
micro_batch_size (default: all of a step's rollouts), loss (default reverse_kl: TRL's beta = 1).
The result has the same fields as benchmarks/trl_worker.py's, read from opd's own metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from memory import peak_rss_mb  # benchmarks/memory.py, beside this script

from opd.config.files import validate
from opd.io.sinks import read_metrics
from opd.models.loading import load_model
from opd.ops.flops import matmul_parameters
from opd.train.trainer import train


def opd_config(work: Path, settings: dict, output_dir: Path, max_steps: int) -> dict:
    rollouts = settings["prompts_per_step"] * settings["samples_per_prompt"]
    return {
        "run": {
            "output_dir": str(output_dir),
            "seed": settings["seed"],
            "max_steps": max_steps,
            "log_every": 1,
            "precision": settings["precision"],
            "device": "cpu",
            "progress": False,
        },
        "student": {"path": str(work / "models" / "student")},
        "teacher": {"path": str(work / "models" / "teacher")},
        "data": {"train": str(work / "data" / "train.jsonl"), "shuffle": False, "max_prompt_tokens": 512},
        "rollout": {
            "samples_per_prompt": settings["samples_per_prompt"],
            "max_new_tokens": settings["max_new_tokens"],
            "temperature": settings["temperature"],
        },
        "loss": {"kind": settings.get("loss", "reverse_kl")},
        "batch": {
            "prompts_per_step": settings["prompts_per_step"],
            "micro_batch_size": settings.get("micro_batch_size") or rollouts,
        },
        "optim": {"lr": settings["lr"], "schedule": "constant", "warmup_steps": 0, "max_grad_norm": 1.0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--settings", type=json.loads, required=True)
    parser.add_argument("--warmup-steps", type=int, default=1)
    limit = parser.add_mutually_exclusive_group(required=True)
    limit.add_argument("--steps", type=int)
    limit.add_argument("--wall-seconds", type=float)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-student", type=Path)
    args = parser.parse_args()

    settings = args.settings
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = Path(scratch) / "run"
        max_steps = args.warmup_steps + args.steps if args.steps else 100_000
        config = validate(opd_config(args.work, settings, output_dir, max_steps))
        result = train(config, log=lambda *_: None, time_limit_s=args.wall_seconds)
        rows = [row for row in read_metrics(output_dir / "metrics.jsonl") if "loss" in row]
        train_wall_s = sum(row["timing/rollout_s"] + row["timing/teacher_s"] + row["timing/update_s"] for row in rows)
        student_params = matmul_parameters(load_model(str(output_dir / "final"), "final", torch.device("cpu")).model)
        rollouts = settings["prompts_per_step"] * settings["samples_per_prompt"]
        steps = [
            {
                "rollout_s": row["timing/rollout_s"],
                "teacher_s": row["timing/teacher_s"],
                "update_s": row["timing/update_s"],
                "total_s": row["timing/rollout_s"] + row["timing/teacher_s"] + row["timing/update_s"],
                "completion_tokens": round(row["generation/avg_length"] * rollouts),
                # update FLOPs are 6N per prompt and completion token (opd.ops.flops)
                "prompt_tokens": round(
                    row["compute/update_flops"] / (6 * student_params) - row["generation/avg_length"] * rollouts
                ),
            }
            for row in rows
            if row["step"] > args.warmup_steps
        ]
        if args.save_student:
            shutil.rmtree(args.save_student, ignore_errors=True)
            shutil.copytree(output_dir / "final", args.save_student)
    args.out.write_text(
        json.dumps(
            {
                "system": "opd",
                "settings": settings,
                "steps": steps,
                "train_wall_s": train_wall_s,
                "steps_done": result.steps_run,
                "peak_rss_mb": peak_rss_mb(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
