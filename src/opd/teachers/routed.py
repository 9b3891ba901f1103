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
from opd.teachers.base import TeacherScores, TokenScorer


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
        shape = batch.completion_ids.shape
        logprobs, entropy = torch.zeros(shape, device=batch.completion_ids.device), None
        topk_ids = topk_logprobs = chunk_index = None
        every_entropy, flops = True, 0.0  # the teacher's entropy is reported only where every teacher gives it
        parts = self.parts(batch)
        if self.parallel and len(parts) > 1:
            with ThreadPoolExecutor(len(parts), thread_name_prefix="opd-teacher") as pool:
                all_scores = list(pool.map(lambda part: part[1].score(part[3]), parts))
        else:
            all_scores = [scorer.score(part) for _, scorer, _, part in parts]
        for (_, _, rows, part), scores in zip(parts, all_scores):
            flops += scores.flops
            width = part.completion_ids.shape[1]  # select trims the completion columns past the last EOS
            logprobs[rows, :width] = scores.logprobs.to(logprobs.device)
            every_entropy &= scores.entropy is not None
            if scores.entropy is not None:
                entropy = torch.zeros_like(logprobs) if entropy is None else entropy
                entropy[rows, :width] = scores.entropy.to(logprobs.device)
            if scores.chunk_index is not None:  # a teacher of another tokenizer; the others' rows: a chunk per token
                if chunk_index is None:
                    chunk_index = torch.arange(shape[1], device=logprobs.device).expand(shape).clone()
                chunk_index[rows, :width] = scores.chunk_index.to(logprobs.device)
            if scores.topk_ids is not None:
                k = scores.topk_ids.shape[-1]
                if topk_ids is None:
                    topk_ids = torch.zeros(*shape, k, dtype=torch.long, device=logprobs.device)
                    topk_logprobs = torch.zeros(*shape, k, device=logprobs.device)
                topk_ids[rows, :width], topk_logprobs[rows, :width] = scores.topk_ids, scores.topk_logprobs
        return TeacherScores(
            logprobs=logprobs,
            entropy=entropy if every_entropy else None,
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs,
            chunk_index=chunk_index,
            flops=flops,
        )
