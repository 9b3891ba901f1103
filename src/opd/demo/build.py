"""Rebuild the demo's committed assets: tokenizer, teacher and weaker student.

    python -m opd.demo.build [--out src/opd/demo/assets] [--only NAME ...]

All models are Qwen3-architecture transformers trained from scratch by supervised fine-tuning on
the synthetic task, with opd's own forward and log-prob code. The student is smaller, and its
training answers are sloppy: 70% of them end with `#### <first step's result>` instead of the final
one. It learns the format and some of the arithmetic, and the habit; the teacher never shows it.

Without --only it builds `teacher` and `student`. Two more assets are built only when named:

- `teacher_bpe` (--only teacher_bpe): the teacher's shape and training, but with a byte-level BPE
  tokenizer (tokenizer.build_bpe_tokenizer) that splits most numbers, for cross-tokenizer demos.
- `student_hinted` (--only student_hinted): the student (same shape, tokenizer and slip), but in 30%
  of its training examples the prompt starts with the reference answer's last line, see task.HINT_FORMAT,
  and those answers never slip. Shown the hint it answers right, like an LLM given privileged context;
  without it, it keeps the habit: a frozen copy shown the hint is a teacher for self-distillation.

Each asset's held-out accuracy (200 problems, sampled at temperature 1) is printed once it is saved.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd.demo.task import hinted_prompt, make_problem, write_split
from opd.demo.tokenizer import build_bpe_tokenizer, build_tokenizer
from opd.io.checkpoint import save_model
from opd.models.loading import LoadedModel
from opd.objectives import losses
from opd.ops.batch import left_pad, right_pad
from opd.ops.forward import completion_hidden_states, logits_from_hidden
from opd.ops.logprobs import token_logprobs
from opd.train.evaluate import evaluate_model

ASSETS = Path(__file__).parent / "assets"
ASSET_NAMES = ["teacher", "student", "teacher_bpe", "student_hinted"]

TEACHER_SHAPE = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=32,
)
STUDENT_SHAPE = dict(
    hidden_size=96,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=32,
)


def new_model(tokenizer, shape: dict, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    return LoadedModel(Qwen3ForCausalLM(config), tokenizer, path="new")


def save_portable(model: LoadedModel, folder: Path) -> None:
    """Save, naming the tokenizer class that transformers 4.x and 5.x both know."""
    save_model(model, folder)
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def training_problem(rng: random.Random, slip: float, hint: float) -> dict[str, str]:
    """A problem from make_problem; with probability `hint` its prompt carries the hint, and then its
    answer never slips, so the model learns to copy a shown final answer rather than to slip past it."""
    if hint and rng.random() < hint:  # no draw when hint is 0: the plain builds keep their random stream
        problem = make_problem(rng)
        return {"prompt": hinted_prompt(problem), "answer": problem["answer"]}
    return make_problem(rng, slip)


def supervised_loss(model: LoadedModel, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
    """Mean negative log-likelihood of the answer tokens (EOS included) given their prompts."""
    eos = model.tokenizer.eos_token_id
    prompt_ids, prompt_mask = left_pad(prompts, eos, torch.device("cpu"))  # (B, P)
    answer_ids, answer_mask = right_pad([answer + [eos] for answer in answers], eos, torch.device("cpu"))  # (B, T)
    input_ids = torch.cat([prompt_ids, answer_ids], 1)
    attention = torch.cat([prompt_mask, answer_mask], 1)
    hidden = completion_hidden_states(model.model, input_ids, attention, answer_ids.shape[1])  # (B, T, H)
    logprobs = token_logprobs(logits_from_hidden(model.model, hidden, model.vocab_size), answer_ids)
    return losses.reduce_tokens(-logprobs, answer_mask, answer_mask.sum())


def train_supervised(
    model: LoadedModel,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    slip: float = 0.0,
    hint: float = 0.0,
    log=print,
) -> None:
    tokenizer = model.tokenizer
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.model.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        problems = [training_problem(rng, slip, hint) for _ in range(batch_size)]
        prompts = [tokenizer(p["prompt"])["input_ids"] for p in problems]
        answers = [tokenizer(p["answer"])["input_ids"] for p in problems]
        loss = supervised_loss(model, prompts, answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(f"step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")


def held_out_accuracy(folder: Path, hinted: bool = False, count: int = 200) -> float:
    """Accuracy on the demo's held-out problems (write_split seed 2) through `opd eval`'s path, at
    temperature 1 and 40 new tokens as `opd demo` measures it. `hinted`: each prompt carries its hint."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "eval.jsonl"
        write_split(path, count, seed=2, hint_in_prompt=hinted)
        metrics = evaluate_model(str(folder), str(path), max_new_tokens=40, seed=1, precision="fp32")
    return metrics["eval/accuracy"]


def build(name: str, args: argparse.Namespace) -> LoadedModel:
    """One asset, trained from scratch; fixed seeds, so a rebuild gives the same weights on one machine."""
    if name == "teacher":
        model = new_model(build_tokenizer(), TEACHER_SHAPE, seed=1)
        train_supervised(model, args.teacher_steps, batch_size=64, lr=2e-3, seed=11)
    elif name == "student":
        model = new_model(build_tokenizer(), STUDENT_SHAPE, seed=2)
        train_supervised(model, args.student_steps, batch_size=64, lr=2e-3, seed=12, slip=args.student_slip)
    elif name == "teacher_bpe":
        model = new_model(build_bpe_tokenizer(), TEACHER_SHAPE, seed=3)
        train_supervised(model, args.teacher_bpe_steps, batch_size=64, lr=2e-3, seed=13)
    else:
        model = new_model(build_tokenizer(), STUDENT_SHAPE, seed=4)
        train_supervised(
            model,
            args.student_hinted_steps,
            batch_size=64,
            lr=2e-3,
            seed=14,
            slip=args.student_slip,
            hint=args.hint_fraction,
        )
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=ASSET_NAMES,
        help=f"build just these, of {', '.join(ASSET_NAMES)} (default: teacher and student)",
    )
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--student-steps", type=int, default=1000)
    # More steps than the teacher's: numbers are spelled digit by digit in up to three BPE tokens.
    parser.add_argument("--teacher-bpe-steps", type=int, default=3000)
    parser.add_argument("--student-hinted-steps", type=int, default=1000)
    parser.add_argument(
        "--student-slip",
        type=float,
        default=0.7,
        help="fraction of the student's training answers whose last line repeats the first result",
    )
    parser.add_argument(
        "--hint-fraction",
        type=float,
        default=0.3,
        help="fraction of student_hinted's training prompts that carry the hint",
    )
    parser.add_argument("--skip-teacher", action="store_true", help="keep the teacher already in --out")
    args = parser.parse_args(argv)
    names = args.only or (["student"] if args.skip_teacher else ["teacher", "student"])
    for name in names:
        started = time.perf_counter()
        model = build(name, args)
        save_portable(model, args.out / name)
        built = time.perf_counter() - started
        accuracy = f"held-out accuracy {held_out_accuracy(args.out / name):.1%}"
        if name == "student_hinted":
            accuracy += f", {held_out_accuracy(args.out / name, hinted=True):.1%} with the hint"
        print(f"{name}: built in {built:.0f}s; {accuracy}")


if __name__ == "__main__":
    main()
