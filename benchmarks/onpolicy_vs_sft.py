"""On-policy distillation vs SFT on teacher samples, from the same student, against training FLOPs.

    python benchmarks/onpolicy_vs_sft.py [--steps 150] [--out docs]

Task: the demo's synthetic word problems, teacher and sloppy student (src/opd/demo/assets). Both runs
share every setting (prompts per step, samples per prompt, lr, schedule, seed); they differ in who
writes the completions and the loss:
- on-policy: the student samples, loss reverse_kl_pg (per-token reverse KL as the reward);
- off-policy: the teacher samples, loss sft (sequence-level distillation).
FLOPs follow opd.flops: 2N per token for sampling (N of whichever model samples), 2N_T for teacher
scoring, 6N for the student update. Writes onpolicy_vs_sft.md (table) and onpolicy_vs_sft.png.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from opd.config import validate
from opd.demo.run import ASSETS, demo_config
from opd.demo.task import write_split
from opd.metrics import read_metrics
from opd.trainer import train

RUNS = {
    "on-policy (reverse_kl_pg, student samples)": {"loss": {"kind": "reverse_kl_pg"}, "rollout": {"source": "student"}},
    "off-policy (sft, teacher samples)": {"loss": {"kind": "sft"}, "rollout": {"source": "teacher"}},
}


def run_all(work: Path, steps: int) -> dict[str, list[dict]]:
    (work / "data").mkdir(parents=True)
    write_split(work / "data" / "train.jsonl", 4000, seed=1)
    write_split(work / "data" / "eval.jsonl", 200, seed=2)
    for name in ("teacher", "student"):
        shutil.copytree(ASSETS / name, work / "models" / name)
    results = {}
    for index, (label, changes) in enumerate(RUNS.items()):
        raw = demo_config(work).model_dump(mode="json")
        raw["run"].update(output_dir=str(work / f"run-{index}"), max_steps=steps, eval_every=max(1, steps // 6),
                          save_every=0, progress=False)
        for section, values in changes.items():
            raw[section].update(values)
        train(validate(raw), log=lambda *_: None)
        results[label] = read_metrics(work / f"run-{index}" / "metrics.jsonl")
    return results


def eval_points(rows: list[dict]) -> list[tuple[float, float, float]]:
    """(cumulative training FLOPs, eval accuracy, eval reverse KL) at each evaluation."""
    points, flops = [], 0.0
    for row in rows:
        flops = row.get("compute/flops", flops)
        if "eval/accuracy" in row:
            points.append((flops, row["eval/accuracy"], row["eval/distill/reverse_kl"]))
    return points


def write_outputs(results: dict[str, list[dict]], out: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figure, (accuracy_axis, kl_axis) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    lines = ["| run | training TFLOPs | held-out accuracy | held-out reverse KL (nats/token) |", "| --- | ---: | ---: | ---: |"]
    for label, rows in results.items():
        points = eval_points(rows)
        flops = [p[0] / 1e12 for p in points]
        accuracy_axis.plot(flops, [p[1] for p in points], marker="o", label=label)
        kl_axis.plot(flops, [p[2] for p in points], marker="o", label=label)
        lines += [f"| {label} | {f / 1e12:.2f} | {a:.1%} | {k:.3f} |" for f, a, k in points]
    for axis, title in ((accuracy_axis, "held-out accuracy (pass@1, T=1)"), (kl_axis, "held-out reverse KL (nats/token)")):
        axis.set_xlabel("training TFLOPs (sampling + teacher + update)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.savefig(out / "onpolicy_vs_sft.png", dpi=90)
    plt.close(figure)
    (out / "onpolicy_vs_sft.md").write_text(
        "# On-policy distillation vs SFT on teacher samples (synthetic task)\n\n"
        f"`python benchmarks/onpolicy_vs_sft.py --steps {steps}`: the demo's teacher (1.63M parameters) and sloppy "
        "student (0.22M), 16 prompts x 4 samples per step, lr 3e-4 cosine, seed 0; held-out figures on 200 problems "
        "sampled from the student at temperature 1. FLOPs as in `opd.flops` (2N sampling, 2N_T teacher, 6N update "
        "per token).\n\n" + "\n".join(lines) + "\n\n![accuracy and reverse KL against FLOPs](onpolicy_vs_sft.png)\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        write_outputs(run_all(Path(work), args.steps), args.out, args.steps)
    print((args.out / "onpolicy_vs_sft.md").read_text())


if __name__ == "__main__":
    main()
