"""`opd demo`: distill a tiny teacher into a tinier student on the synthetic task, offline.

Variants, each an ordinary opd run too:
- `--teacher-tokenizer other`: the teacher reads byte-level BPE tokens (`assets/teacher_bpe`), the
  student word-level ones; the chunk estimator bridges them.
- `--self-distill`: no teacher model: the frozen initial student, shown the reference answer's last
  line (`#### N`) before the question, teaches itself without it (`assets/student_hinted`, a student
  that learned to use such a hint).

The run directory it leaves is an ordinary opd run: data/ and models/ hold the inputs, config.yaml
points at them, and `opd train DIR/config.yaml --set run.output_dir=NEW` repeats the run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from safetensors import safe_open

from opd.config.files import validate
from opd.config.schema import Config
from opd.data.prompts import load_prompts
from opd.demo import DEMO_STEPS
from opd.demo.task import HINT_FORMAT, write_split
from opd.errors import ConfigError
from opd.io.report import write_report
from opd.models.precision import Precision
from opd.rollout.sampler import ModelSampler, SamplingSettings
from opd.teachers.local import load_teacher
from opd.train.evaluate import evaluate
from opd.train.trainer import train

ASSETS = Path(__file__).parent / "assets"


def demo_config(
    out: Path, teacher: str = "teacher", student: str = "student", seed: int = 0, steps: int = DEMO_STEPS
) -> Config:
    """teacher: a folder under models/, or `student` (self-distillation, the hint shown to the teacher)."""
    hinted = teacher == "student"
    return validate(
        {
            "run": {
                "output_dir": str(out),
                "seed": seed,
                "max_steps": steps,
                "save_every": 50,
                "eval_every": 50,
                "precision": "fp32",
            },
            "student": {"path": str(out / "models" / student)},
            "teacher": {"path": teacher if hinted else str(out / "models" / teacher)},
            "data": {
                "train": str(out / "data" / "train.jsonl"),
                "eval": str(out / "data" / "eval.jsonl"),
                "max_prompt_tokens": 64,
                "eval_max_prompts": 200,
                **({"teacher_context_format": HINT_FORMAT} if hinted else {}),
            },
            "rollout": {"samples_per_prompt": 4, "max_new_tokens": 40, "temperature": 1.0},
            "loss": {"kind": "reverse_kl_pg"},
            "batch": {"prompts_per_step": 16, "micro_batch_size": 64},
            "optim": {"lr": 3e-4, "warmup_steps": 5, "schedule": "cosine", "max_grad_norm": 1.0},
        },
        origin="demo config",
    )


def teacher_accuracy(config: Config, eval_path: Path | None = None) -> float:
    """The teacher's own accuracy on the held-out prompts (eval_path: those prompts as it sees them)."""
    precision = Precision.resolve(config.run.precision, config.run.device)
    teacher = load_teacher(config.teacher_path("teacher"), "teacher.path", precision).loaded
    prompts = load_prompts(
        str(eval_path or config.data.eval), "data.eval", teacher.tokenizer, config.data.max_prompt_tokens
    )
    sampler = ModelSampler(teacher, SamplingSettings.of(config.rollout), precision)
    metrics = evaluate(
        sampler,
        None,
        prompts,
        teacher.tokenizer,
        samples_per_prompt=1,
        batch_prompts=256,
        seed=config.run.seed + 1,
        max_prompts=config.data.eval_max_prompts,
    )
    return metrics["eval/accuracy"]


def run_demo(
    out: str | Path, teacher_tokenizer: str = "same", self_distill: bool = False, seed: int = 0, steps: int = DEMO_STEPS
) -> dict[str, float]:
    """teacher_tokenizer: "same" (word-level) or "other" (the BPE teacher); self_distill: the hinted student
    teaches itself (see the module's docstring); seed: the run's (sampling and data order; the models and
    the data set are the same for every seed); steps: the run's optimizer steps."""
    started = time.perf_counter()
    console = Console()
    config = prepare_demo(out, teacher_tokenizer, self_distill, seed, steps, console.print)
    out = Path(config.run.output_dir)
    teacher_acc = teacher_accuracy(config, out / "data" / "eval_hinted.jsonl" if self_distill else None)
    result = train(config, log=console.print)
    summary = {
        "teacher_accuracy": teacher_acc,
        "student_accuracy_before": result.first_eval["eval/accuracy"],
        "student_accuracy_after": result.last_eval["eval/accuracy"],
        # Sequence-level, per completion token: defined across tokenizers (the per-token figure where one).
        "reverse_kl_before": result.first_eval["eval/distill/seq_reverse_kl"],
        "reverse_kl_after": result.last_eval["eval/distill/seq_reverse_kl"],
        "wall_time_s": time.perf_counter() - started,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report([out])
    console.print(_table(summary))
    console.print(f"Run directory: {out} (metrics.jsonl, checkpoints/, final/, config.yaml, report.html, report.png)")
    return summary


def prepare_demo(
    out: str | Path,
    teacher_tokenizer: str = "same",
    self_distill: bool = False,
    seed: int = 0,
    steps: int = DEMO_STEPS,
    log=print,
) -> Config:
    """The demo's run directory before training: its data, its models and its config (see run_demo)."""
    out = Path(out).resolve()  # the run's config.yaml then works from any folder
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: '{out}' already exists and is not empty; choose a new directory")
    if self_distill and teacher_tokenizer != "same":
        raise ConfigError("--self-distill: the teacher is the student itself, so --teacher-tokenizer does not apply")
    (out / "data").mkdir(parents=True, exist_ok=True)
    write_split(out / "data" / "train.jsonl", 4000, seed=1, hint=self_distill)
    write_split(out / "data" / "eval.jsonl", 200, seed=2, hint=self_distill)  # held-out KL against the hinted teacher
    teacher, student = (
        ("student", "student_hinted")
        if self_distill
        else ("teacher_bpe" if teacher_tokenizer == "other" else "teacher", "student")
    )
    for name in {student} | ({teacher} if teacher != "student" else set()):  # `student`: the student's own weights
        shutil.copytree(ASSETS / name, out / "models" / name)
    config = demo_config(out, teacher, student, seed, steps)
    if self_distill:
        write_split(out / "data" / "eval_hinted.jsonl", 200, seed=2, hint_in_prompt=True)
        log(
            f"[bold]opd demo[/bold]: a {_size(out / 'models' / student)} student teaches itself, its "
            f"frozen copy shown the reference answer's last line; run directory {out}"
        )
    else:
        log(
            f"[bold]opd demo[/bold]: distilling a {_size(out / 'models' / teacher)} teacher "
            f"({'byte-level BPE' if teacher_tokenizer == 'other' else 'word-level'} tokens) into a "
            f"{_size(out / 'models' / student)} student (word-level tokens); run directory {out}"
        )
    return config


def _size(model_dir: Path) -> str:
    with safe_open(model_dir / "model.safetensors", "pt") as handle:
        count = sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return f"{count / 1e6:.2f}M-parameter"


def _table(summary: dict[str, float]) -> Table:
    table = Table(title="opd demo: held-out results (200 problems, sampled at temperature 1)")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("teacher accuracy (as it sees the prompts)", f"{summary['teacher_accuracy']:.1%}", "")
    table.add_row(
        "student accuracy", f"{summary['student_accuracy_before']:.1%}", f"{summary['student_accuracy_after']:.1%}"
    )
    before = summary["reverse_kl_before"]
    change = f" ({summary['reverse_kl_after'] / before - 1:+.0%})" if abs(before) > 1e-6 else ""
    table.add_row(
        "held-out reverse KL (sequence, nats/token)",
        f"{summary['reverse_kl_before']:.3f}",
        f"{summary['reverse_kl_after']:.3f}{change}",
    )
    table.add_row("wall time", "", f"{summary['wall_time_s']:.0f} s")
    return table
