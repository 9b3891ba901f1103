"""What the default's forward-KL term costs a step on a larger vocabulary, alternated in one process.

    python benchmarks/forward_kl_cost.py [--steps 6] [--precision bf16]      # about 3 minutes

The demo's models have 265 tokens, so the term's cost there says little about a real vocabulary. Here
the student is a random Qwen3 with hidden 512, 8 layers and a 32k word-level vocabulary (the one
benchmarks/rollout_engines.py builds), and the teacher is another random copy of it (seed 1). Each run
trains `--steps` steps of 8 prompts x 4 samples x 64 new tokens, first with `loss.forward_kl_coef: 0`
(reverse_kl_pg alone), then with the default (resolved to 1.0), three times in turn. It reports the
median step and its parts (rollout, teacher, update) of each run's best round, after the first step
(warm-up). Memory is not compared here: runs in one process reuse each other's freed pages, so the
measured peak of the later runs says nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import Qwen3ForCausalLM

from opd.config.files import validate
from opd.io.sinks import read_metrics
from opd.train.trainer import train

from rollout_engines import big_student


def teacher_copy(student: Path, folder: Path) -> Path:
    """The student's architecture and tokenizer with other random weights."""
    model = Qwen3ForCausalLM.from_pretrained(student)
    torch.manual_seed(1)
    model.apply(model._init_weights)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (student / name).is_file():
            (folder / name).write_bytes((student / name).read_bytes())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        student = big_student(work / "student")
        teacher = teacher_copy(student, work / "teacher")
        rng = random.Random(0)
        (work / "train.jsonl").write_text(
            "".join(
                json.dumps({"prompt": " ".join(f"w{rng.randrange(2, 32_000)}" for _ in range(24))}) + "\n"
                for _ in range(256)
            )
        )
        best: dict[str, dict] = {}
        for round_index in range(args.rounds):
            for name, coef in (
                ("reverse_kl_pg alone (forward_kl_coef 0)", 0.0),
                ("the default (+ forward KL, 1.0)", None),
            ):
                output = work / f"{round_index}-{coef}"
                train(
                    validate(
                        {
                            "run": {
                                "output_dir": str(output),
                                "max_steps": args.steps,
                                "precision": args.precision,
                                "progress": False,
                            },
                            "student": {"path": str(student)},
                            "teacher": {"path": str(teacher)},
                            "data": {"train": str(work / "train.jsonl"), "max_prompt_tokens": 32},
                            "rollout": {"samples_per_prompt": 4, "max_new_tokens": 64},
                            "loss": {"forward_kl_coef": coef},
                            "batch": {"prompts_per_step": 8, "micro_batch_size": 8},
                            "optim": {"lr": 1e-5},
                        }
                    ),
                    log=lambda *_: None,
                )
                rows = read_metrics(output / "metrics.jsonl")[1:]  # after the warm-up step
                figures = {
                    part: statistics.median(row[f"timing/{part}_s"] for row in rows)
                    for part in ("rollout", "teacher", "update")
                }
                figures["step"] = sum(figures.values())
                if name not in best or figures["step"] < best[name]["step"]:
                    best[name] = figures
                print(name, json.dumps(figures), flush=True)
    print("\n| run | median step s | rollout s | teacher s | update s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, figures in best.items():
        print(
            f"| {name} | {figures['step']:.2f} | {figures['rollout']:.2f} | {figures['teacher']:.2f} "
            f"| {figures['update']:.2f} |"
        )


if __name__ == "__main__":
    main()
