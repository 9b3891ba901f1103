"""The demo's figures over seeds: what a fresh clone gets is a range, not one run's digits.

    python benchmarks/demo_seeds.py [--seeds 0 1 2 3 4] [--variants same other self] [--steps 150]   # ~1 min a run

Each run is `opd demo --seed S` (with `--teacher-tokenizer other` or `--self-distill` for the
variants) in a process of its own; prints each run's held-out accuracy and reverse KL before and
after, and each variant's range, with the torch and transformers versions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"same": [], "other": ["--teacher-tokenizer", "other"], "self": ["--self-distill"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=150, help="the demo's steps (the tests run shorter variants)")
    args = parser.parse_args()
    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            rows = []
            for seed in args.seeds:
                out = Path(tmp) / f"{variant}-{seed}"
                command = [sys.executable, "-m", "opd", "demo", "--out", str(out), "--seed", str(seed)]
                command += ["--steps", str(args.steps)]
                done = subprocess.run(command + VARIANTS[variant], capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{' '.join(command + VARIANTS[variant])} failed: {done.stderr[-2000:]}")
                summary = json.loads((out / "demo_summary.json").read_text())
                rows.append(summary)
                print(
                    f"{variant} seed {seed}: accuracy {summary['student_accuracy_before']:.1%} -> "
                    f"{summary['student_accuracy_after']:.1%}, reverse KL {summary['reverse_kl_before']:.3f} -> "
                    f"{summary['reverse_kl_after']:.3f}",
                    flush=True,
                )
            after = [row["student_accuracy_after"] for row in rows]
            falls = [1 - row["reverse_kl_after"] / row["reverse_kl_before"] for row in rows]
            print(
                f"{variant}: accuracy after {min(after):.1%}-{max(after):.1%}, reverse KL falls "
                f"{min(falls):.0%}-{max(falls):.0%} over {len(rows)} seeds",
                flush=True,
            )


if __name__ == "__main__":
    main()
