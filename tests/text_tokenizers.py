"""Tokenizers of different families, built locally with `tokenizers`, for the cross-tokenizer tests:
a byte-level BPE (GPT-2 / Qwen style: bytes as printable characters, emoji and CJK split across
tokens), a SentencePiece-style unigram (Llama 2 style: `▁` for spaces, `<0xNN>` byte fallback, BOS
added on encoding, a dummy-prefix space) and the demo's word-level tokenizer. Each has a chat template
of its own family."""

from __future__ import annotations

import random
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

WORDS = [
    "hello",
    "world",
    "Mia",
    "has",
    "12",
    "apples",
    "東京",
    "ça",
    "va",
    "😀",
    "naïve",
    "price",
    "€5",
    "\n",
    "the",
    "answer",
    "is",
    "####",
    "7",
    "127",
    "  ",
    "don't",
    "Ωmega",
]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>{% else %} {{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
)


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@lru_cache(maxsize=None)
def byte_level_bpe(vocab_size: int = 290) -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        [random_text(rng, 10) for _ in range(3000)],
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


@lru_cache(maxsize=None)
def sentencepiece_unigram() -> PreTrainedTokenizerFast:
    """Whole words with `▁`, ASCII letters and digits, and 256 `<0xNN>` byte pieces for everything else."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    ascii_pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    ascii_pieces += list("0123456789#'.,:?![]/<>") + ["▁"]
    words = ["▁" + word for word in WORDS if word.isascii() and word.strip()] + ["▁[INST]", "▁[/INST]", "ap", "ple"]
    vocab = [(piece, 0.0) for piece in pieces] + [(piece, -5.0) for piece in ascii_pieces] + [(w, -2.0) for w in words]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tokenizer.chat_template = LLAMA2
    return tokenizer


@lru_cache(maxsize=None)
def word_level_with_unknowns() -> PreTrainedTokenizerFast:
    """A word-level vocabulary that lacks most of WORDS: its `<unk>` stands for text it can't encode."""
    words = ["<unk>", "</s>", "hello", "world", "has", "the", "is", "\n"]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="</s>")
