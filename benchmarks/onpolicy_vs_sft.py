"""On-policy distillation vs SFT on teacher samples, from the same student, against training FLOPs.

    python benchmarks/onpolicy_vs_sft.py [--task synthetic|gsm8k_tiny] [--steps N] [--out docs]

Tasks:
- synthetic: the demo's word problems, teacher and sloppy student (src/opd/demo/assets); ~2 minutes.
- gsm8k_tiny: real GSM8K prompts, examples/gsm8k_tiny.yaml's models (built into --models first if
  missing: tokenizer, untrained models, ~10 minutes of teacher SFT); ~12 minutes for the pair.
Both runs share every setting (prompts per step, samples per prompt, lr, schedule, seed); they differ
in who writes the completions and the loss:
- on-policy: the student samples, loss reverse_kl_pg (per-token reverse KL as the reward);
- off-policy: the teacher samples, loss sft (sequence-level distillation).
FLOPs follow opd.ops.flops: 2N per token for sampling (N of whichever model samples), 2N_T for a teacher
scoring pass (the off-policy run needs none: its sampling pass gave ℓᵀ), 6N for the student update.
Writes onpolicy_vs_sft[_TASK].md (table) and .png (plot) into --out.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from opd.config.files import load_config, validate
from opd.demo.run import ASSETS, demo_config
from opd.demo.task import write_split
from opd.io.sinks import read_metrics
from opd.recipes import gsm8k_tiny
from opd.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "on-policy (reverse_kl_pg, student samples)": {"loss": {"kind": "reverse_kl_pg"}, "rollout": {"source": "student"}},
    "off-policy (sft, teacher samples)": {"loss": {"kind": "sft"}, "rollout": {"source": "teacher"}},
}


def synthetic_config(work: Path, args: argparse.Namespace) -> dict:
    (work / "data").mkdir(parents=True)
    write_split(work / "data" / "train.jsonl", 4000, seed=1)
    write_split(work / "data" / "eval.jsonl", 200, seed=2)
    for name in ("teacher", "student"):
        shutil.copytree(ASSETS / name, work / "models" / name)
    return demo_config(work).model_dump(mode="json")


def gsm8k_tiny_config(work: Path, args: argparse.Namespace) -> dict:
    models, data = args.models, args.gsm8k
    if not (models / "teacher-sft" / "final").is_dir():  # the recipe's first two commands
        gsm8k_tiny.main(["--data", str(data / "train.jsonl"), "--out", str(models)])
        teacher_recipe = load_config(
            ROOT / "examples" / "gsm8k_tiny_teacher.yaml",
            defaults={"loss.kind": "sft", "rollout.source": "dataset"},
            overrides=[
                f"run.output_dir={models / 'teacher-sft'}",
                f"student.path={models / 'teacher-init'}",
                f"data.train={data / 'train.jsonl'}",
                "run.progress=false",
            ],
        )
        train(teacher_recipe, log=print)
    recipe = load_config(
        ROOT / "examples" / "gsm8k_tiny.yaml",
        overrides=[
            f"student.path={models / 'student-init'}",
            f"teacher.path={models / 'teacher-sft' / 'final'}",
            f"data.train={data / 'train.jsonl'}",
            f"data.eval={data / 'test.jsonl'}",
        ],
    )
    return recipe.model_dump(mode="json")


TASKS = {
    "synthetic": (
        synthetic_config,
        150,
        "the demo's teacher (1.63M parameters) and sloppy student (0.22M), 16 prompts x "
        "4 samples per step, lr 3e-4 cosine, seed 0; held-out figures on 200 problems sampled from the "
        "student at temperature 1",
    ),
    "gsm8k_tiny": (
        gsm8k_tiny_config,
        100,
        "GSM8K prompts; teacher 4 x 256 made by `opd sft` on GSM8K train answers, "
        "untrained student 2 x 128, 8 prompts x 4 samples x 128 tokens per step, lr 1e-3 cosine, seed 0 "
        "(examples/gsm8k_tiny.yaml); held-out figures on the first 64 GSM8K test prompts sampled from the "
        "student at temperature 1",
    ),
}


def run_all(work: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    make_config = TASKS[args.task][0]
    base = make_config(work, args)
    results = {}
    for index, (label, changes) in enumerate(RUNS.items()):
        raw = {section: dict(values) if isinstance(values, dict) else values for section, values in base.items()}
        raw["run"].update(
            output_dir=str(work / f"run-{index}"),
            max_steps=args.steps,
            eval_every=max(1, args.steps // 5),
            save_every=0,
            progress=False,
        )
        for section, values in changes.items():
            raw[section].update(values)
        train(validate(raw), log=lambda *_: None)
        results[label] = read_metrics(work / f"run-{index}" / "metrics.jsonl")
        print(f"{label}: done")
    return results


def eval_points(rows: list[dict]) -> list[tuple[float, float, float]]:
    """(cumulative training FLOPs, eval accuracy, eval reverse KL) at each evaluation."""
    points, flops = [], 0.0
    for row in rows:
        flops = row.get("compute/flops", flops)
        if "eval/accuracy" in row:
            points.append((flops, row["eval/accuracy"], row["eval/distill/reverse_kl"]))
    return points


def write_outputs(results: dict[str, list[dict]], args: argparse.Namespace) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = "onpolicy_vs_sft" + ("" if args.task == "synthetic" else f"_{args.task}")
    args.out.mkdir(parents=True, exist_ok=True)
    figure, (accuracy_axis, kl_axis) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    lines = [
        "| run | training TFLOPs | held-out accuracy | held-out reverse KL (nats/token) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, rows in results.items():
        points = eval_points(rows)
        flops = [p[0] / 1e12 for p in points]
        accuracy_axis.plot(flops, [p[1] for p in points], marker="o", label=label)
        kl_axis.plot(flops, [p[2] for p in points], marker="o", label=label)
        lines += [f"| {label} | {f / 1e12:.2f} | {a:.1%} | {k:.3f} |" for f, a, k in points]
    for axis, title in (
        (accuracy_axis, "held-out accuracy (pass@1, T=1)"),
        (kl_axis, "held-out reverse KL (nats/token)"),
    ):
        axis.set_xlabel("training TFLOPs (sampling + teacher + update)")
        axis.set_title(f"{args.task}: {title}")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.savefig(args.out / f"{stem}.png", dpi=90)
    plt.close(figure)
    command = f"python benchmarks/onpolicy_vs_sft.py --task {args.task} --steps {args.steps}"
    table = args.out / f"{stem}.md"
    table.write_text(
        f"# On-policy distillation vs SFT on teacher samples ({args.task})\n\n"
        f"`{command}`: {TASKS[args.task][2]}. FLOPs as in `opd.ops.flops` (2N sampling, 2N_T teacher scoring, 6N "
        "update "
        "per token; the SFT run's teacher sampling pass gives ℓᵀ, so it runs no scoring pass).\n\n"
        + "\n".join(lines)
        + f"\n\n![accuracy and reverse KL against FLOPs]({stem}.png)\n"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="synthetic")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: 150 synthetic, 100 gsm8k_tiny)")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument(
        "--gsm8k",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "gsm8k",
        help="folder with GSM8K train.jsonl and test.jsonl (gsm8k_tiny)",
    )
    parser.add_argument(
        "--models",
        type=Path,
        default=ROOT / "runs" / "gsm8k-tiny",
        help="gsm8k_tiny models; built here first if teacher-sft/final is missing",
    )
    args = parser.parse_args()
    args.steps = args.steps or TASKS[args.task][1]
    with tempfile.TemporaryDirectory() as work:
        table = write_outputs(run_all(Path(work), args), args)
    print(table.read_text())


if __name__ == "__main__":
    main()
