"""A student's completions in a teacher's tokens: exact bytes, the teacher's encoding, the chunk alignment.

The student's sampled ids become the bytes they stand for (one gather over the byte table for the
whole batch; never a re-encoding on the student's side). The teacher encodes its prompt followed by
that text in one batched tokenizer call, so the seam is tokenized as its template would: to save
encoding the whole prompt again per sample, each row is encoded after its prompt's last tokens only
(an anchor), and the row falls back to the whole prompt where the anchor does not tokenize as it does
inside the prompt. Then `opd.teachers.alignment` splits both sides into chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from opd.teachers.alignment import TRUNCATED, UNREPRESENTABLE, ChunkAlignment, align_chunks
from opd.teachers.token_bytes import TokenBytes, utf8_lengths, valid_utf8_prefix


@dataclass
class TeacherPrompt:
    """A row's prompt on the teacher's side: its text, its ids, and the anchor that precedes a completion
    in the teacher's encoding (the text of its last plain tokens, and those tokens). separator: the
    whitespace the teacher's template puts before a reply's text, where the student's template puts
    student_separator (Llama 2's "[/INST] " against ChatML's "assistant\n"): a reply that starts with
    the student's gets the teacher's instead, the two counted as one chunk's bytes."""

    text: str
    ids: list[int]
    anchor_text: str
    anchor_ids: list[int]
    separator: str = ""
    student_separator: str = ""


@dataclass
class TeacherCompletions:
    """rows: each row's teacher completion ids (its end-of-turn token last where the student's turn ended);
    ended: (B,) whether it did; alignment: the chunks."""

    rows: list[list[int]]
    ended: list[bool]
    alignment: ChunkAlignment


class CrossTokenizer:
    """Turns a batch's completions into a teacher's tokens (see the module's docstring)."""

    def __init__(self, student_tokenizer, teacher_tokenizer, stop_ids: torch.Tensor, end_id: int):
        self.student_bytes, self.teacher_bytes = TokenBytes.of(student_tokenizer), TokenBytes.of(teacher_tokenizer)
        self.teacher_tokenizer, self.stop_ids, self.end_id = teacher_tokenizer, stop_ids, end_id

    def completions(
        self,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        finished: torch.Tensor,
        prompts: list[TeacherPrompt],
    ) -> TeacherCompletions:
        """completion_ids, completion_mask: (B, T) the student's; finished: (B,); prompts: each row's. The
        alignment comes on the completions' device."""
        ids, mask = completion_ids.cpu(), completion_mask.cpu().bool()
        rows, width = ids.shape
        lengths = mask.sum(1)  # (B,)
        last = (lengths - 1).clamp(min=0)
        ended = (
            finished.cpu().bool()
            & (lengths > 0)
            & torch.isin(ids.gather(1, last.unsqueeze(1)).squeeze(1), self.stop_ids)
        )  # (B,)
        text_mask = mask & ~(ended.unsqueeze(1) & (torch.arange(width) == last.unsqueeze(1)))  # (B, T)
        token_lengths = self.student_bytes.lengths[ids] * text_mask  # (B, T) bytes of each text token
        data = self.student_bytes.bytes_of(ids[text_mask])  # every row's text bytes, row after row
        row_bytes = token_lengths.sum(1).tolist()
        ends = token_lengths.cumsum(1)  # (B, T)
        texts, keeps, codes, ended, shifts = [], [], [], ended.tolist(), []
        offset, text_tokens = 0, text_mask.sum(1).tolist()
        for row in range(rows):
            row_data = data[offset : offset + row_bytes[row]]
            offset += row_bytes[row]
            usable, tail_code = _usable_bytes(row_data, ends[row, : text_tokens[row]], ended[row])
            text, prompt = row_data[:usable].decode("utf-8"), prompts[row]
            if prompt.separator != prompt.student_separator and text.startswith(prompt.student_separator):
                text = prompt.separator + text[len(prompt.student_separator) :]
                shifts.append((len(prompt.student_separator.encode()), len(prompt.separator.encode())))
            else:
                shifts.append((0, 0))
            texts.append(text)
            keeps.append(
                int((ends[row, : text_tokens[row]] <= usable).sum()) if usable < len(row_data) else text_tokens[row]
            )
            codes.append(tail_code)
            ended[row] = ended[row] and usable == len(row_data)  # the end-of-turn chunk needs all the text
        teacher_ids, teacher_lengths, unknown = self._encode(texts, prompts)
        aligned = [row for row in range(rows) if teacher_lengths[row] is not None]
        one = torch.ones(1, dtype=torch.long)

        def side(lengths_: torch.Tensor, row: int, shift: int) -> torch.Tensor:
            """A row's token byte lengths past its separator, and the end of its turn as one virtual byte."""
            lengths_ = _shifted(lengths_, shift)
            return torch.cat([lengths_, one]) if ended[row] else lengths_

        pairs = align_chunks(
            [side(token_lengths[row, : keeps[row]], row, shifts[row][0]) for row in aligned],
            [side(teacher_lengths[row], row, shifts[row][1]) for row in aligned],
        )
        teacher_rows = [
            ids_ + [self.end_id] if ended[row] or teacher_lengths[row] is None or not ids_ else ids_
            for row, ids_ in enumerate(teacher_ids)
        ]  # never an empty row: a placeholder, unscored
        student_chunk = torch.full((rows, width), TRUNCATED, dtype=torch.long)
        teacher_chunk = torch.full((rows, max(map(len, teacher_rows))), -1, dtype=torch.long)
        for row, length in enumerate(lengths.tolist()):
            student_chunk[row, :length] = codes[row] if teacher_lengths[row] is not None else UNREPRESENTABLE
        for row, (student, teacher) in zip(aligned, pairs):
            student_chunk[row, : len(student)] = student
            teacher_chunk[row, : len(teacher)] = teacher
            if bool(unknown[row].any()) or not ended[row]:
                _drop_chunks(
                    student_chunk[row, : len(student)],
                    teacher_chunk[row, : len(teacher)],
                    unknown[row],
                    trailing=not ended[row],
                )
        device = completion_ids.device
        return TeacherCompletions(
            teacher_rows, ended, ChunkAlignment(student_chunk.to(device), teacher_chunk.to(device))
        )

    def _encode(self, texts: list[str], prompts: list[TeacherPrompt]):
        """Each text encoded by the teacher after its prompt: after the prompt's anchor for every row in one
        call, then for a row where that does not hold (the anchor tokenized otherwise, or bytes that don't
        come back) after the whole prompt, then alone. Returns per row the teacher's completion ids, their
        byte lengths (None where no encoding gives back the text's bytes exactly), and which are unknown tokens."""
        backend = self.teacher_tokenizer.backend_tokenizer  # its Encodings: ids now, offsets only where needed
        table = self.teacher_bytes
        anchored = backend.encode_batch(
            [prompt.anchor_text + text for prompt, text in zip(prompts, texts)], add_special_tokens=False
        )
        candidates = [
            encoding.ids[len(prompt.anchor_ids) :]
            if encoding.ids[: len(prompt.anchor_ids)] == prompt.anchor_ids
            else []
            for encoding, prompt in zip(anchored, prompts)
        ]
        # Every row checked at once: one gather of lengths, one of bytes, then a bytes comparison per row.
        flat = torch.tensor([token for ids in candidates for token in ids], dtype=torch.long)
        counts = [len(ids) for ids in candidates]
        lengths = table.lengths[flat].split(counts)
        data, offset = table.bytes_of(flat), 0
        has_unknown = (flat == table.unk_id) if table.unk_id is not None else torch.zeros_like(flat, dtype=torch.bool)
        unknown_rows = set(
            torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))[has_unknown].tolist()
        )
        results = []
        for row, (prompt, text) in enumerate(zip(prompts, texts)):
            size = int(lengths[row].sum())
            found = None
            if (
                row not in unknown_rows
                and data[offset : offset + size] == text.encode("utf-8")
                and (candidates[row] or not text)
            ):
                found = (candidates[row], lengths[row], torch.zeros(counts[row], dtype=torch.bool))
            offset += size
            if found is None and candidates[row]:  # an unknown token, or bytes that differ: checked one by one
                found = self._verified(anchored[row], len(prompt.anchor_ids), prompt.anchor_text + text, text)
            if found is None:  # the seam moved: the whole prompt, then the text alone
                prefix = backend.encode(prompt.text, add_special_tokens=False).ids
                whole = backend.encode(prompt.text + text, add_special_tokens=False)
                if whole.ids[: len(prefix)] == prefix:
                    found = self._verified(whole, len(prefix), prompt.text + text, text)
            if found is None:
                found = self._verified(backend.encode(text, add_special_tokens=False), 0, text, text)
            results.append(found or ([], None, torch.zeros(0, dtype=torch.bool)))
        return tuple(map(list, zip(*results))) if results else ([], [], [])

    def _verified(self, encoding, skip: int, source: str, text: str):
        """(ids, byte lengths, unknown) of `encoding`'s tokens after the first `skip`, if their bytes are the
        text's (an unknown token standing for the text since the previous token's end); else None."""
        table, tokenizer = self.teacher_bytes, self.teacher_tokenizer
        ids = encoding.ids[skip:]
        tensor = torch.tensor(ids, dtype=torch.long)
        lengths = table.lengths[tensor] if ids else torch.zeros(0, dtype=torch.long)
        unknown = (
            (tensor == table.unk_id) if table.unk_id is not None and ids else torch.zeros(len(ids), dtype=torch.bool)
        )
        data = text.encode("utf-8")
        if not bool(unknown.any()):
            return (ids, lengths, unknown) if table.bytes_of(tensor) == data else None
        base = len(source) - len(text)
        byte_at = np.concatenate([[0], np.cumsum(utf8_lengths(source))]) - len(source[:base].encode())
        offsets, pieces, position_bytes = encoding.offsets[skip:], [], 0
        for position, token in enumerate(ids):  # only rows with an unknown token come here
            if unknown[position]:
                start, end = offsets[position]
                lengths[position] = int(byte_at[end]) - position_bytes
                pieces.append(data[position_bytes : int(byte_at[end])])
                unknown[position] = source[start:end] != tokenizer.unk_token  # the literal is no failure
            else:
                pieces.append(table.pieces[token])
            position_bytes += int(lengths[position])
        return (ids, lengths, unknown) if b"".join(pieces) == data else None


def _shifted(lengths: torch.Tensor, separator_bytes: int) -> torch.Tensor:
    """Token byte lengths (n,) counted from the end of a leading separator: the tokens within it have none,
    so they join the first chunk, whose bytes then agree across the two separators."""
    if not separator_bytes:
        return lengths
    ends = (torch.cumsum(lengths, 0) - separator_bytes).clamp(min=0)
    return torch.diff(ends, prepend=ends.new_zeros(1))


def _usable_bytes(data: bytes, token_ends: torch.Tensor, ended: bool) -> tuple[int, int]:
    """How many of a completion's bytes the teacher can read (whole UTF-8 characters, ending at a
    student token boundary), and the code of the student tokens past them: TRUNCATED where the bytes
    stop mid-character at the end of a cut completion, UNREPRESENTABLE where they are not text."""
    if valid_utf8_prefix(data) == len(data):
        return len(data), TRUNCATED
    usable = len(data)
    while True:
        prefix = valid_utf8_prefix(data[:usable])
        inside = token_ends[token_ends <= prefix]
        at_boundary = int(inside.max()) if len(inside) else 0
        if at_boundary == usable:
            break
        usable = at_boundary
    try:  # only an incomplete last character (a cut completion) is truncation
        data[valid_utf8_prefix(data) :].decode("utf-8")
        cut_character = False
    except UnicodeDecodeError as exc:
        cut_character = exc.reason == "unexpected end of data" and not ended
    return usable, TRUNCATED if cut_character else UNREPRESENTABLE


def _drop_chunks(
    student_chunk: torch.Tensor, teacher_chunk: torch.Tensor, unknown: torch.Tensor, trailing: bool
) -> None:
    """In place: chunks holding a teacher unknown token become UNREPRESENTABLE; a cut completion's last
    chunk becomes TRUNCATED unless it is one token on each side (see opd.teachers.alignment)."""
    if bool(unknown.any()):
        bad = torch.unique(teacher_chunk[: len(unknown)][unknown])
        teacher_chunk[torch.isin(teacher_chunk, bad)] = -1
        student_chunk[torch.isin(student_chunk, bad)] = UNREPRESENTABLE
    if trailing:
        last = int(student_chunk.max()) if bool((student_chunk >= 0).any()) else -1
        if last >= 0 and not (int((student_chunk == last).sum()) == 1 and int((teacher_chunk == last).sum()) == 1):
            student_chunk[student_chunk == last] = TRUNCATED
            teacher_chunk[teacher_chunk == last] = -1
