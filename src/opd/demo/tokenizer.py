"""The demo's tokenizers, built locally with the `tokenizers` library: a word-level one for the
teacher and student, and a byte-level BPE for the cross-tokenizer teacher."""

from __future__ import annotations

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from opd.demo.task import make_problem, vocabulary_words

EOS = "<|endoftext|>"
UNK = "<unk>"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Words and numbers are single tokens; pad is EOS on purpose, the case TRL #6357 got wrong."""
    words = [EOS, UNK] + [word for word in vocabulary_words() if word not in (EOS, UNK)]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token=UNK))
    # Newlines are tokens of their own; spaces only separate words, and decoding joins with spaces.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("\n"), behavior="isolated"), pre_tokenizers.Split(Regex(" +"), behavior="removed")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=EOS, unk_token=UNK, clean_up_tokenization_spaces=False
    )


def build_bpe_tokenizer(vocab_size: int = 400, problems: int = 4000, seed: int = 0) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on the task's own text, with token boundaries unlike the
    word-level tokenizer's: at 400 tokens the template words merge whole (" apples", " \\n") but most
    numbers don't (" 32" is " 3" + "2"), so the two tokenizations of an answer rarely align. The
    same EOS literal, also the pad. Deterministic for a given seed."""
    rng = random.Random(seed)
    text = []
    for _ in range(problems):
        problem = make_problem(rng)
        text.append(problem["prompt"] + problem["answer"])  # exactly the strings the model will see
    backend = Tokenizer(models.BPE())
    # No prefix space: the answer's own leading space marks the seam, so prompt and answer tokenize
    # the same apart as together.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=EOS, clean_up_tokenization_spaces=False
    )
