"""What `opd serve-teacher` computes: log-probs of token sequences, batched across concurrent requests.

Concurrent requests are batched up to a token budget within a few milliseconds and scored in one
forward on a worker thread (the server's event loop keeps accepting meanwhile). Only the asked
positions go through the LM head, in chunks, so a 151k vocabulary never makes [tokens x V] logits at
once.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from opd.models.loading import LoadedModel
from opd.models.precision import Precision
from opd.ops.batch import left_pad, right_pad
from opd.ops.forward import completion_hidden_states, completion_hidden_states_of, logits_from_hidden

BATCH_WINDOW_S = 0.003  # how long the batcher waits for more requests once one has arrived


@dataclass
class Scored:
    """One sequence's scores at positions start..len-1: the token's log-prob and rank (1 = most likely),
    and the top-k ids and log-probs there."""

    logprobs: list[float]
    ranks: list[int]
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]


@torch.no_grad()
def score_sequences(
    teacher: LoadedModel,
    precision: Precision,
    chunk_size: int,
    sequences: list[list[int]],
    starts: list[int],
    temperatures: list[float],
    top_ks: list[int],
    hidden: list[bool] | None = None,
) -> list[Scored | torch.Tensor]:
    """Log-probs of each sequence's tokens from position starts[i] (at least 1) on, under temperatures[i],
    with the top_ks[i] most likely tokens there; or, where hidden[i], the final hidden states (n_i, H)
    that predict those tokens (on the CPU, in the forward's dtype), which skip the LM head. Where every
    sequence starts past its first token, the part before the start is a prompt, encoded once for the
    sequences that share it; otherwise the sequences are left-padded into one forward. Only the asked
    positions go through the LM head, chunk_size at a time."""
    hidden = hidden or [False] * len(sequences)
    counts = [max(0, len(sequence) - max(1, start)) for sequence, start in zip(sequences, starts)]
    if not sum(counts):  # nothing to score
        return [torch.empty(0, teacher.hidden_size) if wants else Scored([], [], [], []) for wants in hidden]
    if min(starts) >= 1:
        flat, targets, temperature = _split_hidden(teacher, precision, sequences, starts, temperatures)
    else:
        flat, targets, temperature = _whole_hidden(teacher, precision, sequences, starts, temperatures)
    per_position = torch.tensor(hidden).repeat_interleave(torch.tensor(counts))  # (N,) True: send hidden states
    scored = (~per_position).nonzero().squeeze(-1).to(flat.device)  # (M,) the positions the LM head scores
    k = max((top_k for top_k, wants in zip(top_ks, hidden) if not wants), default=0)
    logprobs, ranks = torch.zeros(len(targets)), torch.zeros(len(targets), dtype=torch.long)
    topk_values, topk_indices = torch.zeros(len(targets), k), torch.zeros(len(targets), k, dtype=torch.long)
    for begin in range(0, len(scored), chunk_size):
        part = scored[begin : begin + chunk_size]
        with precision.autocast():
            logits = logits_from_hidden(teacher.model, flat[part], teacher.vocab_size)
        chunk = (logits.float() / temperature[part].unsqueeze(-1)).log_softmax(-1)  # (c, V)
        own = chunk.gather(-1, targets[part].unsqueeze(-1))  # (c, 1)
        rows = part.cpu()
        logprobs[rows] = own.squeeze(-1).cpu()
        ranks[rows] = ((chunk > own).sum(-1) + 1).cpu()
        if k:
            values, indices = chunk.topk(k, dim=-1)
            topk_values[rows], topk_indices[rows] = values.cpu(), indices.cpu()
    results, begin = [], 0
    for count, top_k, wants in zip(counts, top_ks, hidden):
        end = begin + count
        if wants:
            results.append(flat[begin:end].cpu())
        else:
            results.append(
                Scored(
                    logprobs[begin:end].tolist(),
                    ranks[begin:end].tolist(),
                    topk_indices[begin:end, :top_k].tolist(),
                    topk_values[begin:end, :top_k].tolist(),
                )
            )
        begin = end
    return results


def _whole_hidden(teacher, precision, sequences, starts, temperatures):
    """Hidden states (N, H) predicting every asked position, from one left-padded forward; with their
    target tokens (N,) and temperatures (N,), sequence by sequence."""
    ids, mask = left_pad(sequences, 0, precision.device)  # (B, L)
    asked = torch.zeros_like(mask, dtype=torch.bool)
    for row, (sequence, start) in enumerate(zip(sequences, starts)):
        asked[row, ids.shape[1] - len(sequence) + max(1, start) :] = True
    with precision.autocast():
        hidden = completion_hidden_states(teacher.model, ids, mask, ids.shape[1] - 1)  # column c predicts c + 1
    return _asked(hidden, ids[:, 1:], asked[:, 1:], temperatures)


def _split_hidden(teacher, precision, sequences, starts, temperatures):
    """As _whole_hidden, where every sequence is a prompt (before its start) and a completion: the
    teacher's own forward of (prompt, completion) rows, each distinct prompt encoded once for all the
    sequences that share it, the local teacher's computation exactly."""
    device = precision.device
    groups: dict[tuple[int, ...], int] = {}
    prompt_index = [
        groups.setdefault(tuple(sequence[:start]), len(groups)) for sequence, start in zip(sequences, starts)
    ]
    prompt_ids, prompt_mask = left_pad([sequence[:start] for sequence, start in zip(sequences, starts)], 0, device)
    completion_ids, completion_mask = right_pad(
        [sequence[start:] for sequence, start in zip(sequences, starts)], 0, device
    )
    with precision.autocast():
        hidden = completion_hidden_states_of(
            teacher.model,
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            torch.tensor(prompt_index, device=device),
        )  # (B, T, H)
    return _asked(hidden, completion_ids, completion_mask.bool(), temperatures)


def _asked(hidden: torch.Tensor, targets: torch.Tensor, asked: torch.Tensor, temperatures: list[float]):
    """hidden (B, T, H), targets (B, T), asked (B, T) -> the asked positions' hidden states (N, H), target
    tokens (N,) and temperatures (N,), in row-major order."""
    per_row = torch.tensor(temperatures, device=hidden.device).repeat_interleave(asked.sum(1))
    return hidden[asked], targets[asked], per_row


@dataclass
class _Job:
    sequences: list[list[int]]
    starts: list[int]
    temperature: float
    top_k: int
    hidden_dtype: str | None = None  # a request for hidden states (in this dtype), not log-probs
    done: asyncio.Future = field(default=None)

    @property
    def tokens(self) -> int:
        return sum(map(len, self.sequences))


class Batcher:
    """Collects concurrent requests for up to BATCH_WINDOW_S, or until `max_batch_tokens`, and scores
    them in one call of `score` on a worker thread (requests for log-probs and for hidden states alike)."""

    def __init__(self, score, max_batch_tokens: int):
        self.score, self.max_batch_tokens = score, max_batch_tokens
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(max_workers=1)
        self.batches = 0  # scoring calls made, for the benchmark and tests

    async def submit(self, job: _Job) -> list[Scored]:
        job.done = asyncio.get_running_loop().create_future()
        await self.queue.put(job)
        return await job.done

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        waiting: _Job | None = None
        while True:
            jobs = [waiting or await self.queue.get()]
            waiting, tokens, deadline = None, jobs[0].tokens, time.monotonic() + BATCH_WINDOW_S
            while tokens < self.max_batch_tokens:
                try:
                    job = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                if tokens + job.tokens > self.max_batch_tokens:
                    waiting = job  # starts the next batch
                    break
                jobs.append(job)
                tokens += job.tokens
            sequences = [sequence for job in jobs for sequence in job.sequences]
            starts = [start for job in jobs for start in job.starts]
            temperatures = [job.temperature for job in jobs for _ in job.sequences]
            top_ks = [job.top_k for job in jobs for _ in job.sequences]
            hidden = [job.hidden_dtype is not None for job in jobs for _ in job.sequences]
            self.batches += 1
            try:
                scored = await loop.run_in_executor(
                    self.worker, self.score, sequences, starts, temperatures, top_ks, hidden
                )
            except Exception as exc:  # the batch fails, the server keeps serving
                for job in jobs:
                    if not job.done.done():
                        job.done.set_exception(exc)
                continue
            begin = 0
            for job in jobs:
                if not job.done.done():  # a client that went away cancelled its future
                    job.done.set_result(scored[begin : begin + len(job.sequences)])
                begin += len(job.sequences)
