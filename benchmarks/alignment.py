"""What the cross-tokenizer alignment costs per step: the teacher's view of a batch (completion ids to
bytes, the teacher's encoding of prompt + completion, the chunk alignment) plus folding its scores and
the chunk advantages.

    python benchmarks/alignment.py [--repeats 20] [--demo-step-s S]

Two pairs:
1. The demo's: the word-level student and the byte-level BPE teacher (opd.demo.tokenizer), a step of
   16 prompts x 4 samples of the synthetic task's answers. Against the demo's measured step time
   (`opd demo --teacher-tokenizer other`'s timing/* in metrics.jsonl, passed as --demo-step-s).
2. A 151k / 128k vocabulary pair, the sizes of Qwen's and Llama 3's: two byte-level BPEs trained here
   on GSM8K text plus pseudo-words until their vocabularies reach 151,643 and 128,000 entries (cached
   in --cache; the first run trains them, a few minutes). A step of the reference recipe's shape
   (8 prompts x 8 samples x up to 128 tokens, GSM8K answers as the completions). No GPU here, so
   the step it is compared with is a lower bound: the FLOPs of Qwen3-8B scoring and a Qwen3-1.7B
   sampling and update (2 + 2 + 6 FLOPs per parameter per token) at 400 TFLOP/s (bf16 on an
   H100-class GPU at about 40% of peak).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from opd.data.rows import Example
from opd.demo.task import make_problem
from opd.demo.tokenizer import build_bpe_tokenizer, build_tokenizer
from opd.objectives.losses import chunk_advantages
from opd.ops.batch import StepBatch, left_pad, right_pad
from opd.teachers.view import TeacherView, ViewSettings

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def pseudo_words(count: int, seed: int) -> list[str]:
    """Made-up words from syllables: enough distinct byte pairs for a BPE to learn 150k merges."""
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in ["a", "e", "i", "o", "u", "ai", "ou", "ee"]]
    return [" " + "".join(rng.choice(syllables) for _ in range(rng.randint(2, 5))) for _ in range(count)]


def large_bpe(vocab_size: int, seed: int, cache: Path) -> PreTrainedTokenizerFast:
    path = cache / f"bpe-{vocab_size}-{seed}.json"
    if not path.is_file():
        rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
        text = [row["question"] + "\n" + row["answer"] for row in rows]
        words = pseudo_words(3_000_000, seed)
        text += ["".join(words[start : start + 50]) for start in range(0, len(words), 50)]
        random.Random(seed).shuffle(text)
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.train_from_iterator(
            text,
            trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=SPECIALS,
                show_progress=False,
                min_frequency=1,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        cache.mkdir(parents=True, exist_ok=True)
        backend.save(str(path))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return tokenizer


def make_batch(student, prompts: list[str], completions: list[str], samples: int) -> StepBatch:
    """A step's batch as a sampler would give it: each prompt `samples` times, completions the student's
    encoding of the texts plus its EOS."""
    examples = [
        Example(prompt=prompt, messages=None, answer=None, line=index + 1, fields={})
        for index, prompt in enumerate(prompts)
    ]
    rows = [example for example in examples for _ in range(samples)]  # a prompt's samples share its row
    prompt_ids, prompt_mask = left_pad(
        [student(row.prompt)["input_ids"] for row in rows], student.pad_token_id, torch.device("cpu")
    )
    texts = [completions[index % len(completions)] for index in range(len(rows))]
    encoded = [student(text, add_special_tokens=False)["input_ids"] + [student.eos_token_id] for text in texts]
    completion_ids, completion_mask = right_pad(encoded, student.pad_token_id, torch.device("cpu"))
    group = torch.arange(len(prompts)).repeat_interleave(samples)
    return StepBatch(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        -torch.rand(completion_ids.shape) * completion_mask,
        torch.ones(len(rows), dtype=torch.bool),
        group,
        group,
        rows,
    )


def time_alignment(view: TeacherView, batch: StepBatch, repeats: int) -> float:
    """Seconds per step: the teacher's view, folding its scores, the chunk advantages (best of repeats)."""
    best = float("inf")
    for _ in range(repeats):
        view._prompts.clear()  # a step's prompts are new to the cache, as in training
        started = time.perf_counter()
        teacher_batch, alignment = view.teacher_batch(batch)
        folded = alignment.fold(-torch.rand(teacher_batch.completion_ids.shape))
        chunk_advantages(batch.sampler_logprobs, folded, alignment.student_chunk, batch.completion_mask)
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--demo-step-s", type=float, help="the cross-tokenizer demo's measured seconds per step")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/opd-bench-tokenizers"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    word, bpe = build_tokenizer(), build_bpe_tokenizer()
    rng = random.Random(0)
    problems = [make_problem(rng) for _ in range(16)]
    batch = make_batch(word, [p["prompt"] for p in problems], [p["answer"] for p in problems], samples=4)
    view = TeacherView(word, bpe, [word.eos_token_id], ViewSettings())
    seconds = time_alignment(view, batch, args.repeats)
    tokens = batch.num_tokens
    share = f", {seconds / args.demo_step_s:.1%} of a {args.demo_step_s:.2f} s step" if args.demo_step_s else ""
    print(
        f"demo pair (word-level {len(word)} -> BPE {len(bpe)}): {seconds * 1e3:.1f} ms per step of {tokens} "
        f"completion tokens ({seconds / tokens * 1e6:.1f} us/token){share}"
    )

    started = time.perf_counter()
    qwen_like, llama_like = large_bpe(151_643, 1, args.cache), large_bpe(128_000, 2, args.cache)
    print(
        f"large tokenizers ready in {time.perf_counter() - started:.0f} s: {len(qwen_like)} and {len(llama_like)} "
        "entries",
        file=sys.stderr,
    )
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:8]]
    answers = [json.loads(line)["answer"] for line in GSM8K.read_text().splitlines()[8:72]]
    answers = [qwen_like.decode(qwen_like(" " + text, add_special_tokens=False)["input_ids"][:127]) for text in answers]
    batch = make_batch(qwen_like, [row["question"] for row in rows], answers, samples=8)
    started = time.perf_counter()
    view = TeacherView(qwen_like, llama_like, [qwen_like.eos_token_id], ViewSettings())
    print(f"table build (both byte tables, once per run): {time.perf_counter() - started:.2f} s")
    seconds = time_alignment(view, batch, args.repeats)
    tokens = batch.num_tokens
    student_parameters, teacher_parameters = 1.7e9, 8.2e9
    bound = (10 * student_parameters + 2 * teacher_parameters) * tokens / 400e12
    print(
        f"151k -> 128k pair: {seconds * 1e3:.1f} ms per step of {tokens} completion tokens "
        f"({seconds / tokens * 1e6:.1f} us/token); the step's FLOP lower bound is {bound * 1e3:.0f} ms, so at most "
        f"{seconds / bound:.1%} of it"
    )


if __name__ == "__main__":
    main()
