"""A word-level tokenizer for the demo task, built locally with the `tokenizers` library."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opd.demo.task import vocabulary_words

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
