"""The exact bytes each token of a vocabulary stands for, as a table built once per tokenizer.

Two tokenizers can only be compared on the text they both encode, and a sampled token id is a
claim about bytes, not characters: a byte-level BPE can split one emoji over two tokens, and a
SentencePiece vocabulary spells bytes as `<0xNN>` pieces and spaces as `▁`. So every token id
gets its byte string, read from the token's own spelling through the tokenizer's decoder rules:

- ByteLevel (GPT-2, Llama 3, Qwen): each character of the token maps back to one byte.
- SentencePiece-style (Replace `▁` -> space, Metaspace, ByteFallback `<0xNN>`).
- WordPiece (`##` continues a word; other tokens start one with a space).
- No decoder (word-level vocabularies): `Tokenizer.decode` joins tokens with spaces, so each token
  stands for a space and its text.

Each piece is the token's meaning as a continuation of earlier text: `▁Hello` is " Hello" even where
the decoder would strip the space at the start of a sequence. Added tokens (special or not) stand
for their literal text. The pieces sit in one flat byte tensor with offsets, so the bytes of a whole
batch of token ids come out of one gather, with no Python loop over tokens.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np
import torch

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, as transformers converts byte-level tokenizers:
    character -> byte value."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {character: byte for byte, character in bytes_to_unicode().items()}


def _decoder_steps(tokenizer) -> list[dict]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; opd reads token bytes from a `tokenizers` backend"
        )
    decoder = json.loads(backend.to_str()).get("decoder")
    if decoder is None:
        return []
    return decoder["decoders"] if decoder["type"] == "Sequence" else [decoder]


def _piece_rule(steps: list[dict]):
    """token text -> bytes, following the decoder's per-token rules (see the module's docstring)."""
    kinds = {step["type"] for step in steps}
    if "ByteLevel" in kinds:
        alphabet = byte_level_alphabet()
        return lambda token: bytes(alphabet[character] for character in token if character in alphabet)
    if not steps:
        return lambda token: (" " + token).encode()
    replacements = [
        (step["pattern"]["String"], step["content"])
        for step in steps
        if step["type"] == "Replace" and "String" in step.get("pattern", {})
    ]
    replacements += [(step.get("replacement", "▁"), " ") for step in steps if step["type"] == "Metaspace"]
    byte_fallback = "ByteFallback" in kinds
    word_piece = next((step for step in steps if step["type"] == "WordPiece"), None)
    suffix = next((step.get("suffix") for step in steps if step["type"] == "BPEDecoder"), None)

    def piece(token: str) -> bytes:
        if byte_fallback and (match := _BYTE_PIECE.match(token)):
            return bytes([int(match.group(1), 16)])
        if word_piece is not None:
            prefix = word_piece.get("prefix", "##")
            token = token[len(prefix) :] if token.startswith(prefix) else " " + token
        if suffix:
            token = token[: -len(suffix)] + " " if token.endswith(suffix) else token
        for pattern, content in replacements:
            token = token.replace(pattern, content)
        return token.encode()

    return piece


class TokenBytes:
    """A vocabulary's byte table.

    lengths: (V,) bytes per token id; starts: (V,) offset of each piece in `flat`; flat: (sum,) uint8.
    """

    def __init__(self, pieces: list[bytes], unk_id: int | None):
        self.pieces = pieces
        self.lengths = torch.tensor([len(piece) for piece in pieces], dtype=torch.long)
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        joined = b"".join(pieces)
        self.flat = (
            torch.from_numpy(np.frombuffer(joined, dtype=np.uint8).copy())
            if joined
            else torch.zeros(0, dtype=torch.uint8)
        )
        self.unk_id = unk_id

    @classmethod
    def of(cls, tokenizer) -> "TokenBytes":
        size = len(tokenizer)
        rule = _piece_rule(_decoder_steps(tokenizer))
        added = {index: token for index, token in tokenizer.added_tokens_decoder.items() if index < size}
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        pieces = [
            added[index].content.encode() if index in added else rule(token or "") for index, token in enumerate(tokens)
        ]
        return cls(pieces, tokenizer.unk_token_id)

    def bytes_of(self, ids: torch.Tensor) -> bytes:
        """The bytes of a sequence of token ids (n,): one gather over the flat table."""
        ids = ids.to(torch.long).cpu()
        lengths = self.lengths[ids]  # (n,)
        total = int(lengths.sum())
        if total == 0:
            return b""
        piece_of_byte = torch.repeat_interleave(torch.arange(len(ids)), lengths)  # (total,)
        first_byte = torch.cumsum(lengths, 0) - lengths  # (n,) each piece's offset in the output
        positions = self.starts[ids][piece_of_byte] + torch.arange(total) - first_byte[piece_of_byte]
        return self.flat[positions].numpy().tobytes()


def utf8_lengths(text: str) -> np.ndarray:
    """(len(text),) UTF-8 bytes of each character, vectorized."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return 1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000)


def valid_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that is whole UTF-8 characters."""
    try:
        data.decode("utf-8")
        return len(data)
    except UnicodeDecodeError as exc:
        return exc.start
