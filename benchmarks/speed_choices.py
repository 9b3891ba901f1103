"""Measure opd's speed choices against plain versions, on this machine.

    python benchmarks/speed_choices.py

Each row times one choice against its plain alternative on the same work, with tiny-to-small Qwen3
models built locally (vocabulary 8,192): batched sampling vs one rollout at a time, the lean decoding
step vs Hugging Face's forward, fp32 vs a bf16 weight copy for sampling, inverse-CDF token draws vs
torch.multinomial, bf16 autocast vs fp32, gathered log-probs vs a full log-softmax, and an LM head
over completion positions only vs over the whole sequence. Freed memory is reused, as in opd's
training process (opd.train.host_memory). Results are medians of a few repeats; the README quotes them.
"""

from __future__ import annotations

import statistics
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from opd.data.prompts import PromptBatch
from opd.data.rows import Example
from opd.models.loading import LoadedModel
from opd.models.precision import Precision
from opd.ops.forward import completion_hidden_states, logits_from_hidden
from opd.ops.logprobs import token_logprobs
from opd.rollout.decoding import HFDecoder
from opd.rollout.sampler import ModelSampler, SamplingSettings, draw
from opd.train.host_memory import keep_freed_memory

CPU = Precision(torch.device("cpu"))


def as_batch(token_ids: list[list[int]]) -> PromptBatch:
    keys = list(range(len(token_ids)))
    return PromptBatch(token_ids, keys, [Example("", None, None, 0)] * len(token_ids), keys)


VOCAB = 8192


def tokenizer() -> PreTrainedTokenizerFast:
    words = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


def model(hidden: int, layers: int, tok) -> LoadedModel:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        head_dim=64,
        max_position_embeddings=1024,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LoadedModel(Qwen3ForCausalLM(config).eval(), tok, "bench")


def median_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompts(count: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(2, VOCAB, (length,), generator=generator).tolist() for _ in range(count)]


def no_eos(student: LoadedModel):
    """Sampling never stops early, so every variant generates the same number of tokens."""
    head = student.model.get_output_embeddings()
    return head.register_forward_hook(lambda module, inputs, output: output.index_fill(-1, torch.tensor([0]), -1e4))


def main() -> None:
    keep_freed_memory()  # as in opd's own training process on a CPU
    tok = tokenizer()
    rows = []
    student = model(256, 4, tok)
    hook = no_eos(student)
    batch_prompts, new_tokens = as_batch(prompts(8, 64)), 64

    sampler = ModelSampler(student, SamplingSettings(new_tokens), CPU)

    def sample_batched():
        sampler.sample(batch_prompts, 4, 0)

    def sample_one_by_one():
        for prompt in batch_prompts.token_ids:
            for _ in range(4):
                sampler.sample(as_batch([prompt]), 1, 0)

    tokens = 8 * 4 * new_tokens
    batched, serial = median_time(sample_batched, 2), median_time(sample_one_by_one, 1)
    rows.append(
        (
            "sampling 32 rollouts x 64 tokens (student 256x4)",
            "one batched loop",
            tokens / batched,
            "one rollout at a time",
            tokens / serial,
            "tokens/s",
        )
    )

    lean_sampler = sampler
    hf_sampler = ModelSampler(student, SamplingSettings(new_tokens), CPU)
    hf_sampler._decoder = HFDecoder(student.model)  # what the sampler falls back to for other architectures
    lean, hf = (median_time(lambda s=s: s.sample(batch_prompts, 4, 0), 2) for s in (lean_sampler, hf_sampler))
    rows.append(
        (
            "sampling, same work",
            "lean Llama-family step",
            tokens / lean,
            "Hugging Face forward",
            tokens / hf,
            "tokens/s",
        )
    )
    copy_sampler = ModelSampler(
        student, SamplingSettings(new_tokens), Precision(CPU.device, torch.bfloat16), low_precision_copy=True
    )
    bf16_copy = median_time(lambda: copy_sampler.sample(batch_prompts, 4, 0), 2)
    rows.append(
        (
            "sampling, same work",
            "fp32 weights (CPU default)",
            tokens / lean,
            "bf16 weight copy",
            tokens / bf16_copy,
            "tokens/s",
        )
    )
    hook.remove()

    logits = torch.randn(32, VOCAB)
    inverse_cdf = median_time(lambda: [draw(logits, torch.rand(32)) for _ in range(100)])
    multinomial = median_time(
        lambda: [
            torch.multinomial(torch.softmax(logits, -1), 1, generator=torch.Generator().manual_seed(0))
            for _ in range(100)
        ]
    )
    rows.append(
        (
            "drawing 32 tokens from 8k-way distributions",
            "inverse CDF (1 uniform/row)",
            3200 / inverse_cdf,
            "torch.multinomial",
            3200 / multinomial,
            "tokens/s",
        )
    )

    teacher = model(512, 6, tok)
    ids = torch.randint(2, VOCAB, (32, 192))
    mask = torch.ones_like(ids)
    completion = ids[:, 64:]

    def forward_backward(dtype):
        student.model.train()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            hidden = completion_hidden_states(student.model, ids, mask, 128)
            logits = logits_from_hidden(student.model, hidden, VOCAB)
        token_logprobs(logits, completion).mean().backward()

    def teacher_forward(dtype):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits_from_hidden(teacher.model, completion_hidden_states(teacher.model, ids, mask, 128), VOCAB)

    fp32_update, bf16_update = (
        median_time(lambda: forward_backward(None)),
        median_time(lambda: forward_backward(torch.bfloat16)),
    )
    rows.append(
        (
            "student forward+backward, 32 x 192 tokens",
            "bf16 autocast",
            32 * 128 / bf16_update,
            "fp32",
            32 * 128 / fp32_update,
            "tokens/s",
        )
    )
    fp32_teacher, bf16_teacher = (
        median_time(lambda: teacher_forward(None)),
        median_time(lambda: teacher_forward(torch.bfloat16)),
    )
    rows.append(
        (
            "teacher forward (512x6), 32 x 192 tokens",
            "bf16 autocast",
            32 * 128 / bf16_teacher,
            "fp32",
            32 * 128 / fp32_teacher,
            "tokens/s",
        )
    )

    def head_completion_only():
        with torch.no_grad():
            logits_from_hidden(teacher.model, completion_hidden_states(teacher.model, ids, mask, 128), VOCAB)

    def head_everywhere():
        with torch.no_grad():
            teacher.model(input_ids=ids, attention_mask=mask).logits[:, 63:-1]

    rows.append(
        (
            "teacher scoring, 64 prompt + 128 completion tokens",
            "LM head on completion only",
            32 * 128 / median_time(head_completion_only),
            "LM head on every position",
            32 * 128 / median_time(head_everywhere),
            "tokens/s",
        )
    )

    logits = torch.randn(16, 128, 32768)
    targets = torch.randint(0, 32768, (16, 128))

    gathered = median_time(lambda: token_logprobs(logits, targets))
    full = median_time(lambda: torch.log_softmax(logits, -1).gather(-1, targets[..., None]))
    rows.append(
        (
            "sampled-token log-probs, 16 x 128 x 32k logits",
            "logit - logsumexp",
            16 * 128 / gathered,
            "log_softmax then gather",
            16 * 128 / full,
            "positions/s",
        )
    )
    extra = logits.numel() * 4 / 2**20
    print(f"(log_softmax then gather also allocates a second {extra:.0f} MiB [B x T x V] tensor; gathering does not)")

    print(f"\n{'work':52} {'opd choice':28} {'rate':>10}   {'plain alternative':28} {'rate':>10}  unit   speed-up")
    for work, ours, ours_rate, plain, plain_rate, unit in rows:
        ratio = f"{ours_rate / plain_rate:.2f}x" if plain_rate == plain_rate else ""
        plain_text = f"{plain_rate:10.0f}" if plain_rate == plain_rate else " " * 10
        print(f"{work:52} {ours:28} {ours_rate:10.0f}   {plain:28} {plain_text}  {unit:6} {ratio}")


if __name__ == "__main__":
    main()
