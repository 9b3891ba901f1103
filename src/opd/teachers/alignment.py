"""The chunk estimator: a teacher with another tokenizer scores the student's completion chunk by chunk.

Both tokenizations of the same completion bytes are split where both have a token boundary. For each
chunk C, Δ_C = Σ_{t∈C} ℓˢ_t − Σ_{u∈C} ℓᵀ_u, and the Δ_C add up (telescope) to
log p_S(y) − log p_T(y), the sequence-level log-ratio, whatever the two tokenizers. The end of a
turn (the student's stop token, the teacher's end-of-turn token) is a chunk of its own.

The alignment is vectorized: token end offsets are cumulative sums of the byte-length tables
(`opd.teachers.token_bytes`), common boundaries an `isin` of the two, and each token's chunk a `searchsorted`.
Every row of a batch is aligned in one pass, rows separated by a one-byte spacer that both sides
share. With one tokenizer on both sides every boundary is common, each chunk is one token, and
Δ_C is the per-token k_t: the direct path exactly.

Chunk codes of a student token: its chunk's position in the row (0, 1, ...), or
- TRUNCATED (−1): in the trailing chunk of a completion cut by max_new_tokens. The teacher might
  tokenize that text differently once it goes on ("12" may be the start of "123"), so the chunk's Δ
  would be biased; it is dropped, unless it is one token on each side (then it is a token-for-token
  comparison, as in the direct path).
- UNREPRESENTABLE (−2): bytes the teacher could not encode (its tokenizer's unknown token), or bytes
  that are not UTF-8 text, or a row whose teacher encoding does not reproduce the bytes.
Dropped tokens get no advantage, so no gradient; they still count in the step's token normalizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRUNCATED, UNREPRESENTABLE = -1, -2


def align_chunks(
    student_lengths: list[torch.Tensor], teacher_lengths: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row, the chunk of each student token (n_s,) and of each teacher token (n_t,), numbered from 0.

    student_lengths, teacher_lengths: per row, the bytes of each token (a virtual byte for an end-of-turn
    token); each row's two totals must be equal.
    """
    if not student_lengths:
        return []
    spacer = torch.ones(1, dtype=torch.long)

    def ends(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global end offsets of every token with a spacer before each row; each token's row; spacer positions."""
        pieces = [part for row in rows for part in (spacer, row.to(torch.long).cpu())]
        counts = torch.tensor([len(row) + 1 for row in rows])
        row_of = torch.repeat_interleave(torch.arange(len(rows)), counts)
        spacers = torch.cumsum(counts, 0) - counts
        return torch.cumsum(torch.cat(pieces), 0), row_of, spacers

    student_ends, student_rows, student_spacers = ends(student_lengths)
    teacher_ends, teacher_rows, teacher_spacers = ends(teacher_lengths)
    common = torch.unique_consecutive(student_ends[torch.isin(student_ends, teacher_ends)])  # sorted
    student_chunk = torch.searchsorted(common, student_ends)  # first common boundary at or after each end
    teacher_chunk = torch.searchsorted(common, teacher_ends)
    row_base = student_chunk[student_spacers]  # (rows,) the spacer's chunk; the row's chunks follow it
    # A token of no bytes at a row's start lands in the spacer's chunk: count it with the row's first.
    student_local = (student_chunk - row_base[student_rows] - 1).clamp(min=0)
    teacher_local = (teacher_chunk - row_base[teacher_rows] - 1).clamp(min=0)
    keep_student = torch.ones_like(student_local, dtype=torch.bool)
    keep_student[student_spacers] = False
    keep_teacher = torch.ones_like(teacher_local, dtype=torch.bool)
    keep_teacher[teacher_spacers] = False
    student_split = student_local[keep_student].split([len(row) for row in student_lengths])
    teacher_split = teacher_local[keep_teacher].split([len(row) for row in teacher_lengths])
    return list(zip(student_split, teacher_split))


@dataclass
class ChunkAlignment:
    """How a batch's teacher tokens map onto its student tokens.

    student_chunk: (B, T) each student completion token's chunk code (see the module's docstring).
    teacher_chunk: (B, U) each teacher completion token's chunk position, −1 where no kept chunk.
    """

    student_chunk: torch.Tensor
    teacher_chunk: torch.Tensor

    def fold(self, teacher_logprobs: torch.Tensor) -> torch.Tensor:
        """Teacher log-probs (B, U) -> (B, T): each kept chunk's sum Σ ℓᵀ at its last student token, 0
        elsewhere, so per-row sums and chunk sums of ℓˢ − ℓ̃ᵀ are the chunk estimator's."""
        rows, width = self.student_chunk.shape
        chunks = width + 1  # a row has at most as many chunks as student tokens
        device = teacher_logprobs.device
        teacher_chunk = self.teacher_chunk.to(device)
        kept = teacher_chunk >= 0
        row_of = torch.arange(rows, device=device).unsqueeze(1).expand_as(teacher_chunk)
        slot = (row_of * chunks + teacher_chunk.clamp(min=0))[kept]
        sums = torch.zeros(rows * chunks, dtype=teacher_logprobs.dtype, device=device)
        sums.index_add_(0, slot, teacher_logprobs[kept])  # (B * chunks,) Σ ℓᵀ per chunk
        student_chunk = self.student_chunk.to(device)
        last = last_token_of_chunk(student_chunk)
        slots = torch.arange(rows, device=device).unsqueeze(1) * chunks + student_chunk.clamp(min=0)
        return torch.where(last, sums[slots], torch.zeros((), dtype=sums.dtype, device=device))


def last_token_of_chunk(chunk_index: torch.Tensor) -> torch.Tensor:
    """(B, T) chunk codes -> (B, T) True at the last student token of each kept chunk."""
    following = torch.cat([chunk_index[:, 1:], torch.full_like(chunk_index[:, :1], TRUNCATED)], dim=1)
    return (chunk_index >= 0) & (following != chunk_index)
