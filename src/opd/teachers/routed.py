"""Several named teachers (`teachers:`): every row is scored by its own.

A row's teacher is its `teacher` field, else the teacher its training file names (`data.train` as a
list of {path, teacher}), else the only teacher. Routes are checked before any weight loads: a row
naming an unknown teacher, or none where there are several, is an error naming the file and line.
Each teacher scores its rows (local or remote, as any TokenScorer); the advantages of each row then
come from its own teacher's ℓᵀ. The teachers score their parts at once, each on a thread of its own
(servers answer in parallel; local teachers' forwards overlap), unless a teacher is sharded across
ranks, whose collectives must keep one order on every rank. `RoutedTeachers.parts` is how a batch
splits between them, which the training metrics report per teacher
(opd.train.metrics.per_teacher_metrics).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from opd.data.prompts import PromptSet
from opd.errors import DataError
from opd.ops.batch import StepBatch
from opd.teachers.base import TeacherScores, TokenScorer, assemble_scores


def route(row, names: list[str]) -> str | None:
    """A row's teacher (see the module's docstring); None where it names none and there are several."""
    return getattr(row, "teacher", None) or (names[0] if len(names) == 1 else None)


def check_routes(prompts: PromptSet | None, names: list[str], key: str) -> None:
    """Every row has a known teacher (one line naming the file and line otherwise)."""
    if prompts is None:
        return
    for example in prompts.examples:
        name = route(example, names)
        where = f"{key}: {example.file}:{example.line}"
        if name is None:
            raise DataError(f"{where}: the row names no teacher (a 'teacher' field) and its file none; one of {names}")
        if name not in names:
            raise DataError(f"{where}: teacher {name!r} is not one of the teachers {names}")


class RoutedTeachers:
    """A TokenScorer over named teachers: each row to its own (see the module's docstring)."""

    def __init__(self, scorers: dict[str, TokenScorer], parallel: bool = True):
        """parallel: score the teachers' parts at once (False where a teacher makes collective calls)."""
        self.scorers, self.parallel = scorers, parallel
        self.name = " + ".join(scorers)

    def parts(self, batch: StepBatch) -> list[tuple[str, TokenScorer, list[int], StepBatch]]:
        """(name, scorer, row indices, the batch's rows) of each teacher with rows in `batch`."""
        names = list(self.scorers)
        routes = [route(row, names) for row in batch.rows]
        parts = []
        for name, scorer in self.scorers.items():
            rows = [index for index, each in enumerate(routes) if each == name]
            if rows:
                parts.append((name, scorer, rows, batch.select(rows)))
        return parts

    def score(self, batch: StepBatch, keep_hidden: bool = False) -> TeacherScores:
        parts = self.parts(batch)
        if self.parallel and len(parts) > 1:
            with ThreadPoolExecutor(len(parts), thread_name_prefix="opd-teacher") as pool:
                all_scores = list(pool.map(lambda part: part[1].score(part[3], keep_hidden), parts))
        else:
            all_scores = [scorer.score(part, keep_hidden) for _, scorer, _, part in parts]
        scores = assemble_scores(
            batch.completion_ids.shape,
            batch.completion_ids.device,
            [(rows, scores) for (_, _, rows, _), scores in zip(parts, all_scores)],
        )
        if keep_hidden:
            scores.hidden = self._tagged_hidden(batch, parts, all_scores)
        return scores

    def _tagged_hidden(self, batch: StepBatch, parts, all_scores) -> torch.Tensor:
        """Each row's teacher hidden states (B, T, H_max + 1), padded to the widest teacher's H, with the
        row's teacher (its index in `scorers`) in the last column, so that `logits` sends each position
        to its own teacher's head however the loss chunks the batch."""
        names = list(self.scorers)
        width = max(scores.hidden.shape[-1] for scores in all_scores)
        sample = all_scores[0].hidden
        hidden = torch.zeros(*batch.completion_ids.shape, width + 1, dtype=sample.dtype, device=sample.device)
        for (name, _, rows, _), scores in zip(parts, all_scores):
            length, size = scores.hidden.shape[1], scores.hidden.shape[2]
            hidden[rows, :length, :size] = scores.hidden
            hidden[rows, :, -1] = names.index(name)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H_max + 1) tagged hidden states (see `_tagged_hidden`) -> (..., V) logits, each position's
        from its own teacher at that teacher's temperature. Every teacher shares the student's vocabulary."""
        owner = hidden[..., -1].long()  # (...,)
        logits = None
        for index, scorer in enumerate(self.scorers.values()):
            mine = owner == index
            if not mine.any():
                continue
            own = scorer.logits(hidden[mine][:, : scorer.hidden_size])  # (n, V)
            if logits is None:
                logits = own.new_zeros(*owner.shape, own.shape[-1])
            logits[mine] = own
        return logits
