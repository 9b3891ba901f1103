"""A far-apart pair on 2 CPU cores: does the default objective collapse, does the guard see it, and what
fixes it?

    python benchmarks/far_apart.py [--steps 100] [--out far_apart_results]      # about 3 minutes

The pair: the demo's teacher (4 Qwen3 layers x 192, 1.6M parameters, trained on the demo task) and, as
the student, the same model with its first three decoder layers dropped ("prune, then distill"). The
student starts far away: held-out reverse KL about 11.6 nats/token, against 0.6 for the demo's own
student. Every run starts from that student with the same data, seed and settings (16 prompts x 4
samples x 40 tokens, lr 5e-3 constant after 5 warm-up steps, fp32), and evaluates every 10 steps on 100
held-out problems. Every run is on-policy (lambda 1) unless it says otherwise:
- `reverse_kl_pg` alone (`loss.forward_kl_coef: 0`, opd's default until issue 21), guard on `warn`;
- the same, guard on `stop`;
- on-policy + 1.0 x forward KL on the same samples (`loss.forward_kl_coef` left null, which a local
  teacher of the student's vocabulary resolves to 1.0): the default before lambda auto, and still the
  default for a near student;
- GKD's mixture: lambda rising linearly from 0 to 0.5 over 50 steps, then half of each step's prompts
  sampled by the teacher and trained with the forward KL (`rollout.student_fraction: 0.5`,
  `student_fraction_start: 0`, `student_fraction_ramp_steps: 50`);
- the default: `rollout.student_fraction: auto`, which measures the student at step 0 and picks one of
  the two above (docs/far_apart.md).
With --served, the teacher is on opd's server instead (`opd serve-teacher`, one thread):
- the default with the teacher's LM head here (`teacher.lm_head`): hidden states, the exact forward KL;
- the forward-KL term estimated from the server's top-20 and a tail bucket (`teacher.top_k: 20`,
  `loss.forward_kl_coef: 1.0`): all a vLLM or SGLang teacher can send (vLLM's default --max-logprobs);
- `reverse_kl_pg` alone (`teacher.top_k: 0`, which turns the term off there; the default before);
- the default, lambda auto: measured far, the server samples the teacher's rows, trained by NLL
  (without the LM head here a server gives no whole distribution), or with `teacher.lm_head` by the
  forward KL;
- lambda auto with `rollout.off_policy_source: dataset` and `loss.off_policy_kind: sft`: measured far,
  the run mixes in the data's reference answers (NLL) instead.
With --real MODEL (a folder of SmolLM2-135M-Instruct, built by ../shared/models/smollm2.py), the pair is
real: that model as the teacher, the same without every `--drop-every` N-th decoder layer as the student
(N = 2, the default: 15 of 30 layers; 4: 23 of 30, a nearer pair), GSM8K's questions through its chat
template (../shared/data/gsm8k, or $OPD_GSM8K_DIR), 4 prompts x 4 samples x 96 tokens a step, lr 1e-5
constant after 3 warm-up steps, fp32, evaluated every 10 steps on 32 held-out questions; the runs are
on-policy + forward KL, `reverse_kl_pg` alone, sequence-level KD (the teacher's samples, NLL: what `opd
sft` trains), the mixture (lambda 0 -> 0.5 over 15 steps), a handover (lambda 0 -> 1 over 20 steps, the
forward-KL term on the student's rows) and the default (lambda auto), each with its wall time. With
--real and --served, the served runs on the real pair. --seed sets every run's run.seed (default 0).
Writes OUT/far_apart.md (table) and OUT/far_apart.png (curves), or far_apart_served.*, far_apart_real.*,
far_apart_real_served.*.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from teacher_server import free_port, wait_healthy  # noqa: E402  (the benchmarks' own helpers)

from opd.config.files import validate
from opd.data.prompts import load_prompts
from opd.demo.far_pair import pruned_teacher
from opd.demo.run import ASSETS
from opd.demo.task import write_split
from opd.errors import StudentCollapsed
from opd.io.sinks import read_metrics
from opd.models.loading import load_model
from opd.models.precision import Precision
from opd.ops.batch import StepBatch
from opd.rollout.sampler import ModelSampler, SamplingSettings
from opd.train.metrics import repetition
from opd.train.trainer import train

STEP = re.compile(r"step \d+")
# Every run is on-policy (lambda 1) unless it says otherwise; "the default: auto" leaves lambda to opd.
AUTO = {"rollout.student_fraction": "auto"}
RUNS = {
    "reverse_kl_pg alone": {"loss.forward_kl_coef": 0.0},
    "reverse_kl_pg alone, guard stop": {"loss.forward_kl_coef": 0.0, "run.collapse_guard": "stop"},
    "on-policy + forward KL (auto, 1.0; the default before lambda auto)": {},
    "mixture, lambda 0 -> 0.5": {
        "loss.forward_kl_coef": 0.0,
        "rollout.student_fraction": 0.5,
        "rollout.student_fraction_start": 0.0,
        "rollout.student_fraction_ramp_steps": 50,
    },
    "the default: lambda auto (measured at step 0)": AUTO,
}


SERVED_RUNS = {  # with --served; "teacher.url" is filled in with the server's, a "teacher.lm_head" with its files
    "served, hidden states: the default (exact forward KL)": {"teacher.lm_head": str(ASSETS / "teacher")},
    "served, top-20 + tail forward KL": {"teacher.top_k": 20, "loss.forward_kl_coef": 1.0},
    "served, reverse_kl_pg alone (teacher.top_k 0: no term)": {"teacher.top_k": 0},
    # lambda auto as it runs with a served teacher: measured far, its server samples the other rows.
    "served, lambda auto: the teacher's samples from its server, NLL (the served default)": AUTO,
    "served, hidden states, lambda auto: the teacher's samples from its server, forward KL": {
        **AUTO,
        "teacher.lm_head": str(ASSETS / "teacher"),
    },
    # The data's reference answers (NLL) as the far start's other rows.
    "served, lambda auto with the data's answers (off_policy_source dataset, off_policy_kind sft)": {
        **AUTO,
        "rollout.off_policy_source": "dataset",
        "loss.off_policy_kind": "sft",
    },
}


REAL_RUNS = {  # with --real: the teacher in this process
    "on-policy + forward KL (auto, 1.0; the default before lambda auto)": {},
    "reverse_kl_pg alone": {"loss.forward_kl_coef": 0.0},
    "sequence-level KD (the teacher's samples, NLL)": {"loss.kind": "sft", "rollout.source": "teacher"},
    "mixture, lambda 0 -> 0.5": {
        "loss.forward_kl_coef": 0.0,
        "rollout.student_fraction": 0.5,
        "rollout.student_fraction_start": 0.0,
        "rollout.student_fraction_ramp_steps": 15,
    },
    # A candidate default for far pairs: start from the teacher's samples (forward KL on them), hand
    # over to the student's own linearly, the default's forward-KL term on the student's rows throughout.
    "handover: the teacher's samples to the student's over 20 steps": {
        "rollout.student_fraction": 1.0,
        "rollout.student_fraction_start": 0.0,
        "rollout.student_fraction_ramp_steps": 20,
    },
    "the default: lambda auto (measured at step 0)": AUTO,
}


def real_pair(work: Path, model: Path, drop_every: int = 2) -> tuple[Path, dict]:
    """The real pair's student (`model` without every `drop_every`-th decoder layer: 2 keeps 15 of 30, 4
    keeps 23) and its data; returns the student and the config changes that make the demo pair's config
    the real pair's."""
    from opd.demo.far_pair import pruned_model

    gsm8k = Path(os.environ.get("OPD_GSM8K_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"))
    for name, source, count in (("train.jsonl", "train.jsonl", 2000), ("eval.jsonl", "test.jsonl", 32)):
        rows = [json.loads(line) for line in (gsm8k / source).read_text().splitlines()[:count]]
        (work / name).write_text(
            "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows)
        )
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    keep = [index for index in range(layers) if index % drop_every != drop_every - 1]
    student = pruned_model(model, work / "student", keep)
    changes = {
        "teacher.path": str(model),
        "data.max_prompt_tokens": 256,
        "data.eval_max_prompts": 32,
        "rollout.max_new_tokens": 96,
        "batch.prompts_per_step": 4,
        "batch.micro_batch_size": 8,
        "optim.lr": 1e-5,
        "optim.warmup_steps": 3,
    }
    return student, changes


def config(work: Path, name: str, student: Path, steps: int, changes: dict, seed: int = 0) -> dict:
    raw = {
        "run": {
            "output_dir": str(work / name),
            "max_steps": steps,
            "eval_every": 10,
            "precision": "fp32",
            "progress": False,
            "seed": seed,
        },
        "student": {"path": str(student)},
        "teacher": {"path": str(ASSETS / "teacher")},
        "data": {
            "train": str(work / "train.jsonl"),
            "eval": str(work / "eval.jsonl"),
            "max_prompt_tokens": 64,
            "eval_max_prompts": 100,
        },
        "rollout": {"samples_per_prompt": 4, "max_new_tokens": 40, "student_fraction": 1.0},
        "loss": {"kind": "reverse_kl_pg"},
        "batch": {"prompts_per_step": 16, "micro_batch_size": 64},
        "optim": {"lr": 5e-3, "warmup_steps": 5, "schedule": "constant"},
    }
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return raw


@contextmanager
def served_teacher(model: Path):
    """`opd serve-teacher MODEL` with one thread on 127.0.0.1, stopped on the way out; yields its url."""
    port = free_port()
    argv = [sys.executable, "-m", "opd", "serve-teacher", str(model), "--port", str(port), "--precision", "fp32"]
    job = subprocess.Popen(argv, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", job, timeout_s=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        job.terminate()
        job.wait(30)


def summarize(name: str, rows: list[dict], outcome: str) -> dict:
    evals = [row for row in rows if "eval/distill/reverse_kl" in row]
    trained = [row for row in rows if "entropy/student" in row]  # none where the student sampled no rows
    start_entropy = evals[0]["eval/entropy/student"]  # the untrained student, the same for every run
    return {
        "run": name,
        "outcome": outcome,
        "kl_start": evals[0]["eval/distill/reverse_kl"],
        "kl_end": evals[-1]["eval/distill/reverse_kl"],
        "kl_best": min(row["eval/distill/reverse_kl"] for row in evals),
        "entropy_start": start_entropy,
        "entropy_min_fraction": min(row["entropy/student"] for row in trained) / start_entropy if trained else None,
        "eval_entropy_end_fraction": evals[-1]["eval/entropy/student"] / start_entropy,
        "repetition_max": max((row["generation/repetition"] for row in trained), default=None),
        "eval_repetition_end": evals[-1].get("eval/generation/repetition"),
        "accuracy_end": evals[-1].get("eval/accuracy"),
    }


def _share(value: float | None, spec: str = ".0%") -> str:
    return "—" if value is None else format(value, spec)


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("entropy/student", "entropy of the student's sampling distribution"),
        ("generation/repetition", "repeated 4-grams in the student's samples"),
        ("eval/distill/reverse_kl", "held-out reverse KL (nats/token)"),
        ("eval/entropy/student", "held-out entropy/student"),
    ]
    figure, axes = plt.subplots(1, 4, figsize=(20, 4.5), constrained_layout=True)
    for index, (name, rows) in enumerate(curves.items()):
        for axis, (key, title) in zip(axes, panels):
            points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
            if points:
                axis.plot(
                    *zip(*points),
                    color=f"C{index}",
                    marker="o" if key.startswith("eval/") else None,
                    markersize=3,
                    label=name,
                )
            axis.set_title(title)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def held_out_samples(model_dir: Path, work: Path, length: int, count: int | None = None) -> tuple[StepBatch, object]:
    """A model's held-out completions, sampled as evaluation samples them (T = 1, fixed seed, one a prompt;
    each prompt's draws are fixed by its key, whichever prompts share the batch): of the first `count`
    held-out prompts, or of all. Returns the batch and the model's tokenizer."""
    precision = Precision(torch.device("cpu"))
    model = load_model(str(model_dir), "model", precision.device)
    prompts = load_prompts(str(work / "eval.jsonl"), "eval", model.tokenizer, 256)
    chosen = list(range(len(prompts) if count is None else count))
    return ModelSampler(model, SamplingSettings(length), precision).sample(
        prompts.batch(chosen), 1, seed=1
    ), model.tokenizer


def completions(model_dir: Path, work: Path, count: int = 3, length: int = 40) -> list[str]:
    """A few held-out completions of a student (held_out_samples)."""
    batch, tokenizer = held_out_samples(model_dir, work, length, count)
    return batch.completion_texts(tokenizer)


def own_figures(batch: StepBatch) -> dict:
    """A model's own repetition and mean entropy over its held-out samples (held_out_samples): the
    teacher's are what a distilled student should come near."""
    mask = batch.completion_mask.float()
    return {
        "repetition": repetition(batch.completion_ids, batch.completion_mask),
        "entropy": float((batch.sampler_entropy * mask).sum() / mask.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("far_apart_results"))
    parser.add_argument("--served", action="store_true", help="the teacher on opd's server (see above)")
    parser.add_argument("--real", type=Path, metavar="MODEL", help="the real pair cut from MODEL (see above)")
    parser.add_argument(
        "--drop-every",
        type=int,
        default=2,
        metavar="N",
        help="with --real: the student drops "
        "every N-th layer (2: half of them, the far pair; 4: a quarter, a nearer pair)",
    )
    parser.add_argument("--seed", type=int, default=0, help="run.seed of every run (sampling, data order)")
    parser.add_argument("--only", nargs="+", metavar="WORD", help="only the runs whose name holds one of these")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        runs = RUNS
        work, pair = Path(scratch), {}
        if args.real:
            student, pair = real_pair(work, args.real, args.drop_every)
            runs = REAL_RUNS
        if args.served:
            served_model = args.real or ASSETS / "teacher"
            url = stack.enter_context(served_teacher(served_model))
            runs = {
                name: {
                    **changes,
                    "teacher.url": url,
                    "teacher.path": None,
                    **({"teacher.lm_head": str(served_model)} if "teacher.lm_head" in changes else {}),
                }
                for name, changes in SERVED_RUNS.items()
            }
        if not args.real:
            write_split(work / "train.jsonl", 4000, seed=1)
            write_split(work / "eval.jsonl", 200, seed=2)
            student = pruned_teacher(work / "student", keep=[3])
        if args.only:
            runs = {name: changes for name, changes in runs.items() if any(word in name for word in args.only)}
        summaries, curves = [], {}
        length = pair.get("rollout.max_new_tokens", 40)
        samples = {"untrained student": completions(student, work, length=length)}
        if args.real:
            batch, tokenizer = held_out_samples(args.real, work, length)
            samples["the teacher"] = batch.completion_texts(tokenizer)[:3]
            teacher = own_figures(batch)
            print(
                f"the teacher's own held-out repetition {teacher['repetition']:.2f}, entropy {teacher['entropy']:.2f}"
            )
        for name, changes in runs.items():
            print(f"{name} ...", flush=True)
            raw = config(work, re.sub(r"\W+", "_", name), student, args.steps, {**pair, **changes}, args.seed)
            warnings = []
            started = time.perf_counter()
            try:
                train(validate(raw), log=lambda message: warnings.append(str(message)))
                fired = [STEP.search(w).group() for w in warnings if "collapsed" in w]
                outcome = f"finished; the guard warned at {', '.join(fired)}" if fired else "finished; no warning"
            except StudentCollapsed as exc:
                outcome = f"stopped by the guard at {STEP.search(str(exc)).group()}"
            wall = time.perf_counter() - started
            rows = read_metrics(Path(raw["run"]["output_dir"]) / "metrics.jsonl")
            curves[name] = rows
            if (Path(raw["run"]["output_dir"]) / "final").is_dir():
                samples[name] = completions(Path(raw["run"]["output_dir"]) / "final", work, length=length)
            summaries.append({**summarize(name, rows, outcome), "wall_s": wall})
            print(json.dumps(summaries[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "far_apart" + ("_real" if args.real else "") + ("_served" if args.served else "")
    plot(curves, args.out / f"{stem}.png")
    lines = [
        "| run | outcome | held-out reverse KL: start → end (best) | change | lowest entropy/student in training, "
        "fraction of the untrained student's | held-out entropy at the end, fraction | highest repetition in "
        "training | held-out repetition at the end | held-out accuracy at the end | wall time |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        change = s["kl_end"] / s["kl_start"] - 1
        lines.append(
            f"| {s['run']} | {s['outcome']} | {s['kl_start']:.2f} → {s['kl_end']:.2f} ({s['kl_best']:.2f}) "
            f"| {change:+.0%} | {_share(s['entropy_min_fraction'])} | {s['eval_entropy_end_fraction']:.0%} "
            f"| {_share(s['repetition_max'], '.2f')} | {_share(s['eval_repetition_end'], '.2f')} "
            f"| {_share(s['accuracy_end'], '.1%')} | {s['wall_s'] / 60:.1f} min |"
        )
    if args.real:
        lines.append(
            f"\nThe teacher's own held-out samples: repetition {teacher['repetition']:.2f}, entropy "
            f"{teacher['entropy']:.2f} nats/token."
        )
    table = "\n".join(lines)
    reading = "\n".join(
        f"- {name}:\n" + "\n".join(f"  - `{text!r}`" for text in texts) for name, texts in samples.items()
    )
    (args.out / f"{stem}.md").write_text(
        "# A far-apart pair: collapse, the guard, and two remedies\n\n"
        f"`python benchmarks/far_apart.py --steps {args.steps}{' --served' if args.served else ''}"
        f"{' --real MODEL' if args.real else ''}` "
        "(see its docstring for the pair and the settings).\n\n" + table + f"\n\n![curves]({stem}.png)\n\n"
        "Reading it: the entropy and repetition columns are over the training steps' own samples, against the "
        "untrained student's held-out entropy; the two `reverse_kl_pg` runs share their first steps exactly "
        "(same seed), so the stopped run shows what the guard cut short. One seed per run: treat differences "
        "of a few tenths of a nat as noise.\n\n"
        "## The final students' own words\n\nThe first three held-out problems, sampled at T = 1 from each final "
        "student (the stopped run has none):\n\n" + reading + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
