"""Inputs of the gsm8k_tiny recipe: a BPE tokenizer trained on GSM8K and two untrained tiny Qwen3s.

    python -m opd.recipes.gsm8k_tiny [--data ../shared/data/gsm8k/train.jsonl] [--out runs/gsm8k-tiny]
    opd sft examples/gsm8k_tiny_teacher.yaml      # the teacher: SFT on GSM8K train answers
    opd train examples/gsm8k_tiny.yaml            # distill it into the smaller student on GSM8K prompts

Everything is made locally: the tokenizer with `tokenizers` (byte-level BPE, 4,096 tokens, pad = EOS),
the models from Qwen3 configs (teacher 4 layers x 256, student 2 layers x 128).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

EOS = "<|endoftext|>"
SHAPES = {
    "teacher-init": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    ),
    "student-init": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
    ),
}


def train_tokenizer(data: Path, vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    texts = [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in rows]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k/train.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("runs/gsm8k-tiny"))
    args = parser.parse_args(argv)
    tokenizer = train_tokenizer(args.data)
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
        Qwen3ForCausalLM(config).save_pretrained(args.out / name)
        tokenizer.save_pretrained(args.out / name)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
