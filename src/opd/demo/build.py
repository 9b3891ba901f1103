"""Rebuild the demo's committed assets: tokenizer, teacher and weaker student.

    python -m opd.demo.build [--out src/opd/demo/assets]

Both models are Qwen3-architecture transformers trained from scratch by supervised fine-tuning on
the synthetic task, with opd's own forward and log-prob code. The student is smaller, and its
training answers are sloppy: 70% of them end with `#### <first step's result>` instead of the final
one. It learns the format and some of the arithmetic, and the habit; the teacher never shows it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd import losses
from opd.checkpoint import save_model
from opd.demo.task import make_problem
from opd.demo.tokenizer import build_tokenizer
from opd.batch import left_pad, right_pad
from opd.forward import completion_hidden_states, logits_from_hidden
from opd.loading import LoadedModel

ASSETS = Path(__file__).parent / "assets"

TEACHER_SHAPE = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=32)
STUDENT_SHAPE = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=3,
                     num_key_value_heads=1, head_dim=32)


def new_model(tokenizer, shape: dict, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **shape,
    )
    return LoadedModel(Qwen3ForCausalLM(config), tokenizer, source="new")


def save_portable(model: LoadedModel, folder: Path) -> None:
    """Save, naming the tokenizer class that transformers 4.x and 5.x both know."""
    save_model(model, folder)
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def supervised_loss(model: LoadedModel, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
    """Mean negative log-likelihood of the answer tokens (EOS included) given their prompts."""
    eos = model.tokenizer.eos_token_id
    prompt_ids, prompt_mask = left_pad(prompts, eos, torch.device("cpu"))  # (B, P)
    answer_ids, answer_mask = right_pad([answer + [eos] for answer in answers], eos, torch.device("cpu"))  # (B, T)
    input_ids = torch.cat([prompt_ids, answer_ids], 1)
    attention = torch.cat([prompt_mask, answer_mask], 1)
    hidden = completion_hidden_states(model.model, input_ids, attention, answer_ids.shape[1])  # (B, T, H)
    logprobs = losses.token_logprobs(logits_from_hidden(model.model, hidden, model.vocab_size), answer_ids)
    return losses.reduce_tokens(-logprobs, answer_mask, answer_mask.sum())


def train_supervised(
    model: LoadedModel, steps: int, batch_size: int, lr: float, seed: int, slip: float = 0.0, log=print
) -> None:
    tokenizer = model.tokenizer
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.model.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        problems = [make_problem(rng, slip) for _ in range(batch_size)]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--student-steps", type=int, default=1000)
    parser.add_argument("--student-slip", type=float, default=0.7,
                        help="fraction of the student's training answers whose last line repeats the first result")
    parser.add_argument("--skip-teacher", action="store_true", help="keep the teacher already in --out")
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer()
    if not args.skip_teacher:
        teacher = new_model(tokenizer, TEACHER_SHAPE, seed=1)
        train_supervised(teacher, args.teacher_steps, batch_size=64, lr=2e-3, seed=11)
        save_portable(teacher, args.out / "teacher")
    student = new_model(tokenizer, STUDENT_SHAPE, seed=2)
    train_supervised(student, args.student_steps, batch_size=64, lr=2e-3, seed=12, slip=args.student_slip)
    save_portable(student, args.out / "student")


if __name__ == "__main__":
    main()
