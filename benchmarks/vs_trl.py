"""opd vs TRL's DistillationTrainer on the same models, prompts and step settings, on this machine.

    pip install -e '.[bench]'            # TRL, a benchmark-only extra
    python benchmarks/vs_trl.py [--reps 2] [--wall-seconds 90] [--out docs/vs_trl.md]

Models (built once into --work, about 5 minutes): a byte-level BPE tokenizer of 8,192 tokens trained
on GSM8K train; a ~5M-parameter Qwen3 student (4 x 256, untrained) and a ~23M Qwen3 teacher (6 x 512)
given some skill by a short `opd sft` on GSM8K train answers. Prompts: GSM8K train questions as
"Question: ...\\nAnswer:", in file order, the same for both systems.

Each configuration runs in its own process (benchmarks/opd_worker.py, benchmarks/trl_worker.py), in
turn A B A B, for --wall-seconds of training each after one warm-up step. Reported per system:
completion tokens per second, the rollout / teacher / update split, peak RSS, model FLOPs
utilization against this machine's matmul peak in the dtype used (measured here, in this run), and
the held-out reverse KL of the student after the equal wall time (opd's evaluator for both: 64 GSM8K
test prompts sampled at T = 1, scored by the teacher). A last row repeats one configuration at a
151,936-token vocabulary (Qwen's) to show peak memory when logits are that wide.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from opd.config.files import validate
from opd.data.prompts import load_prompts
from opd.models.loading import load_model
from opd.models.precision import Precision
from opd.ops.flops import matmul_parameters
from opd.rollout.sampler import ModelSampler, SamplingSettings
from opd.teachers.local import load_teacher
from opd.train.evaluate import evaluate
from opd.train.host_memory import keep_freed_memory

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VOCAB = 8192
LARGE_VOCAB = 151_936
SHAPES = {
    "student": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    ),
    "teacher": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    ),
}
# The step both systems do: 8 prompts x 4 samples x up to 128 new tokens at T = 1, reverse KL, one AdamW step.
EQUAL = {
    "samples_per_prompt": 4,
    "max_new_tokens": 128,
    "prompts_per_step": 8,
    "temperature": 1.0,
    "lr": 1e-3,
    "seed": 0,
    "precision": "fp32",
}
# Each system's fastest options on this machine for that same step (same math, same work per step).
# opd: bf16 autocast (its default `precision: auto` on this CPU). TRL: bf16 (its default), the teacher
# loaded in bf16 and fused AdamW; fp32 everywhere and fp32 with a bf16 teacher measured the same.
BEST = {
    "opd": {**EQUAL, "precision": "bf16"},
    "trl": {**EQUAL, "precision": "bf16", "teacher_dtype": "bf16", "optim": "adamw_torch_fused"},
}
LARGE = {**EQUAL, "prompts_per_step": 4, "samples_per_prompt": 2}


def build_work(work: Path, gsm8k: Path, vocab_size: int = VOCAB) -> Path:
    """Tokenizer, models and prompts under work/ (kept: a second call reuses them)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opd.recipes.gsm8k_tiny import train_tokenizer

    if (work / "models" / "teacher" / "model.safetensors").exists():
        return work
    (work / "data").mkdir(parents=True, exist_ok=True)
    questions = [json.loads(line)["question"] for line in (gsm8k / "train.jsonl").read_text().splitlines()]
    tests = [json.loads(line)["question"] for line in (gsm8k / "test.jsonl").read_text().splitlines()][:64]
    for name, rows in (("train", questions), ("eval", tests)):
        (work / "data" / f"{name}.jsonl").write_text(
            "".join(json.dumps({"prompt": f"Question: {q}\nAnswer:"}) + "\n" for q in rows)
        )
    tokenizer = train_tokenizer(gsm8k / "train.jsonl", VOCAB)
    if vocab_size > len(tokenizer):
        tokenizer = widen_vocabulary(tokenizer, vocab_size)
    for seed, (name, shape) in enumerate(SHAPES.items()):
        torch.manual_seed(seed)
        config = Qwen3Config(
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **shape,
        )
        target = work / "models" / (name if name == "student" else "teacher-init")
        Qwen3ForCausalLM(config).save_pretrained(target)
        tokenizer.save_pretrained(target)
    if vocab_size == VOCAB:
        teach(work, gsm8k)
    else:  # the large-vocabulary row only measures speed and memory: an untrained teacher will do
        (work / "models" / "teacher-init").rename(work / "models" / "teacher")
    return work


def widen_vocabulary(tokenizer, size: int):
    """The same BPE with never-produced filler tokens appended up to `size` entries."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for index in range(len(tokenizer), size):
        vocab[f"<|filler_{index}|>"] = index
    backend = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token
    )


def teach(work: Path, gsm8k: Path) -> None:
    """A short `opd sft` of the teacher on GSM8K train answers, so it has something to teach."""
    from opd.train.trainer import train

    config = validate(
        {
            "run": {"output_dir": str(work / "teacher-sft"), "max_steps": 60, "precision": "auto", "progress": False},
            "student": {"path": str(work / "models" / "teacher-init")},
            "data": {"train": str(gsm8k / "train.jsonl"), "max_prompt_tokens": 256},
            "rollout": {"source": "dataset", "samples_per_prompt": 1, "max_new_tokens": 160},
            "loss": {"kind": "sft"},
            "batch": {"prompts_per_step": 16, "micro_batch_size": 16},
            "optim": {"lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.01},
        }
    )
    print("building the teacher: 60 steps of opd sft on GSM8K train answers", flush=True)
    train(config, log=lambda *_: None)
    (work / "teacher-sft" / "final").rename(work / "models" / "teacher")


def matmul_peak(dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Best FLOP/s of matrix products in `dtype` on this machine, now, with torch's thread count:
    square ones, and the tall ones of these models' projections over a step's worth of tokens."""
    shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (8192, 256, 768), (8192, 512, 1536), (8192, 1536, 512)]
    best = 0.0
    for rows, inner, cols in shapes:
        a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
        a @ b
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / len(shapes):
            a @ b
            count += 1
        best = max(best, 2 * rows * inner * cols * count / (time.perf_counter() - started))
    return best


def run_worker(system: str, work: Path, settings: dict, args: argparse.Namespace, tag: str) -> dict:
    out = args.results / f"{tag}.json"
    python = args.trl_python if system == "trl" else sys.executable
    command = [
        python,
        str(HERE / f"{system}_worker.py"),
        "--work",
        str(work),
        "--settings",
        json.dumps(settings),
        "--warmup-steps",
        "1",
        "--wall-seconds",
        str(args.wall_seconds),
        "--out",
        str(out),
        "--save-student",
        str(args.results / f"{tag}-student"),
    ]
    print(f"  {tag} ...", end="", flush=True)
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, preexec_fn=_cap_memory)
    if completed.returncode != 0:
        tail = (completed.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f" failed ({tail})")
        return {"system": system, "settings": settings, "failed": tail}
    result = json.loads(out.read_text())
    print(f" {time.perf_counter() - started:.0f} s, {len(result['steps'])} measured steps")
    return result


def _cap_memory() -> None:
    """Workers may use at most 20 GiB of address space: a blow-up fails the worker, not the machine."""
    limit = 20 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def held_out_reverse_kl(work: Path, student_dir: Path) -> float:
    fp32 = Precision(torch.device("cpu"))
    student = load_model(str(student_dir), "student", fp32.device)
    teacher = load_teacher(str(work / "models" / "teacher"), "teacher", fp32)
    prompts = load_prompts(str(work / "data" / "eval.jsonl"), "eval", student.tokenizer, 512)
    sampler = ModelSampler(student, SamplingSettings(EQUAL["max_new_tokens"], EQUAL["temperature"]), fp32)
    metrics = evaluate(sampler, teacher, prompts, student.tokenizer, 1, 32, 1)
    return metrics["eval/distill/reverse_kl"]


def summarize(results: list[dict], work: Path, peaks: dict[str, float]) -> dict:
    """Means over repetitions: tokens/s, time split, peak RSS, MFU."""
    ok = [r for r in results if "failed" not in r]
    if not ok:
        return {"failed": results[0]["failed"]}
    student = matmul_parameters(load_model(str(work / "models" / "student"), "s", torch.device("cpu")).model)
    teacher = matmul_parameters(load_model(str(work / "models" / "teacher"), "t", torch.device("cpu")).model)
    per_rep = []
    for result in ok:
        steps = result["steps"]
        seconds = sum(s["total_s"] for s in steps)
        completion = sum(s["completion_tokens"] for s in steps)
        tokens = completion + sum(s["prompt_tokens"] for s in steps)
        model_flops = (2 * student + 2 * teacher + 6 * student) * tokens  # opd.ops.flops: sampling, teacher, update
        per_rep.append(
            {
                "tokens_per_s": completion / seconds,
                "split": [sum(s[key] for s in steps) / seconds for key in ("rollout_s", "teacher_s", "update_s")],
                "rss_mb": result["peak_rss_mb"],
                "mfu": model_flops / seconds / peaks[result["settings"]["precision"]],
                "steps": len(steps),
            }
        )
    mean = {key: statistics.mean(rep[key] for rep in per_rep) for key in ("tokens_per_s", "rss_mb", "mfu")}
    mean["split"] = [statistics.mean(rep["split"][i] for rep in per_rep) for i in range(3)]
    mean["tokens_per_s_range"] = (min(r["tokens_per_s"] for r in per_rep), max(r["tokens_per_s"] for r in per_rep))
    mean["rss_mb_max"] = max(r["rss_mb"] for r in per_rep)
    mean["steps"] = [r["steps"] for r in per_rep]
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2, help="A B repetitions per configuration")
    parser.add_argument("--wall-seconds", type=float, default=90.0, help="training time per run")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "vs-trl")
    parser.add_argument("--gsm8k", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k")
    parser.add_argument("--trl-python", default=sys.executable, help="a Python with trl>=1.16 installed")
    parser.add_argument(
        "--only", choices=["equal", "best", "large"], action="append", help="run only these rows (default: all)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "vs_trl.md")
    args = parser.parse_args()
    check = subprocess.run(
        [args.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True
    )
    if check.returncode != 0:
        sys.exit(f"error: --trl-python {args.trl_python} can't import trl; pip install -e '.[bench]'")
    rows = args.only or ["equal", "best", "large"]
    work = build_work(args.work / "work", args.gsm8k)
    args.results = args.work / "results"
    args.results.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()  # as opd's workers do: the peak is then measured without page-fault stalls
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    table = {}
    plans = {"equal": (work, {"opd": EQUAL, "trl": EQUAL}), "best": (work, BEST)}
    if "large" in rows:
        plans["large"] = (build_work(args.work / "work-large", args.gsm8k, LARGE_VOCAB), {"opd": LARGE, "trl": LARGE})
    for row in rows:
        row_work, settings = plans[row]
        print(f"{row}:")
        results = {"opd": [], "trl": []}
        for rep in range(args.reps if row != "large" else 1):
            for system in ("opd", "trl"):
                results[system].append(run_worker(system, row_work, settings[system], args, f"{row}-{system}-{rep}"))
        for system in ("opd", "trl"):
            summary = summarize(results[system], row_work, peaks)
            if "failed" not in summary and row != "large":
                summary["held_out_kl"] = held_out_reverse_kl(row_work, args.results / f"{row}-{system}-0-student")
            table[(row, system)] = {**summary, "settings": settings[system]}
    initial_kl = held_out_reverse_kl(work, work / "models" / "student")
    report = render(table, peaks, initial_kl, args, check.stdout.strip())
    args.out.write_text(report)
    print(report)


def render(table: dict, peaks: dict, initial_kl: float, args: argparse.Namespace, trl_version: str) -> str:
    lines = [
        "| row | system | precision | completion tokens/s | vs TRL | rollout / teacher / update | peak RSS | MFU "
        f"| held-out reverse KL after {args.wall_seconds:.0f} s |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for (row, system), s in table.items():
        precision = s["settings"]["precision"]
        if "failed" in s:
            lines.append(f"| {row} | {system} | {precision} | failed: {s['failed']} | | | | | |")
            continue
        other = table.get((row, "trl"), {})
        ratio = f"{s['tokens_per_s'] / other['tokens_per_s']:.2f}×" if "tokens_per_s" in other else "n/a"
        low, high = s["tokens_per_s_range"]
        split = " / ".join(f"{part:.0%}" for part in s["split"])
        kl = f"{s['held_out_kl']:.3f}" if "held_out_kl" in s else ""
        lines.append(
            f"| {row} | {system} | {precision} | {s['tokens_per_s']:,.0f} ({low:,.0f}–{high:,.0f}) | {ratio} "
            f"| {split} | {s['rss_mb_max']:,.0f} MB | {s['mfu']:.0%} | {kl} |"
        )
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    return (
        "# opd vs TRL DistillationTrainer\n\n"
        f"`python benchmarks/vs_trl.py --reps {args.reps} --wall-seconds {args.wall_seconds:.0f}` on {machine}, "
        f"TRL {trl_version}. Matmul peak measured in the same run: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s. Held-out reverse KL of the untrained student: {initial_kl:.3f}.\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
