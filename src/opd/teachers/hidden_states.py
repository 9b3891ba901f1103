"""A teacher on opd's server that sends its final hidden states, not log-probs: the trainer applies the
teacher's LM head (read alone from its files, opd.models.lm_head) and has the teacher's whole
distribution, as a local teacher does, at H numbers a token instead of V (4,096 against 151,936 for
Qwen3-8B: 37x fewer values, 74x fewer bytes in bf16 than fp32 logits).

The wire format (`POST /v1/hidden_states`, opd's own route): the request is JSON,
`{"model", "prompt": [[token ids], ...], "logprob_start": [s_0, ...], "dtype": "bf16" | "fp32"}`; the
answer is `application/octet-stream`, the hidden states that predict each sequence's tokens from
max(1, s_i) on, sequence after sequence, as one little-endian (N, H) array, with the headers
`x-opd-rows` (n_0,n_1,... positions per sequence), `x-opd-hidden-size` (H) and `x-opd-dtype`. The
states are after the model's final norm: exactly what its LM head reads.
"""

from __future__ import annotations

import torch

from opd.models.lm_head import LMHead
from opd.models.precision import Precision
from opd.ops.batch import StepBatch
from opd.teachers.base import TeacherScores
from opd.teachers.local import scores_from_hidden
from opd.teachers.remote import RemoteTeacher, completion_rows

HIDDEN_STATES_PATH = "/v1/hidden_states"
WIRE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_BYTE_VIEW = {"bf16": torch.int16, "fp32": torch.int32}  # bit-exact views numpy can write
# A served head must give the server's own log-probs within this (nats, at every probed position) in
# fp32, five times this where the hidden states or the head are bf16: the same weights differ by
# rounding (a few hundredths in bf16), another model's head by tenths even between random tiny models.
HEAD_TOLERANCE = 0.1


def encode_hidden_states(states: list[torch.Tensor], dtype: str) -> tuple[bytes, dict[str, str]]:
    """Each sequence's (n_i, H) states -> the answer's body and headers (see the module's docstring)."""
    width = states[0].shape[-1]
    flat = torch.cat([state.reshape(-1, width) for state in states]).to(WIRE_DTYPES[dtype]).contiguous()
    body = flat.view(_BYTE_VIEW[dtype]).numpy().astype(f"<i{flat.element_size()}", copy=False).tobytes()
    headers = {
        "x-opd-rows": ",".join(str(len(state)) for state in states),
        "x-opd-hidden-size": str(width),
        "x-opd-dtype": dtype,
    }
    return body, headers


def decode_hidden_states(body: bytes, headers, expected_rows: list[int], hidden_size: int) -> list[torch.Tensor]:
    """The answer -> each sequence's (n_i, H) states. Raises ValueError where the answer doesn't match
    the request (the transport retries it)."""
    dtype = headers.get("x-opd-dtype")
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"x-opd-dtype {dtype!r}")
    rows = [int(count) for count in headers.get("x-opd-rows", "").split(",") if count]
    if rows != expected_rows or int(headers.get("x-opd-hidden-size", -1)) != hidden_size:
        raise ValueError(f"{rows} positions of width {headers.get('x-opd-hidden-size')} for {expected_rows} asked")
    size = WIRE_DTYPES[dtype].itemsize
    if len(body) != sum(rows) * hidden_size * size:
        raise ValueError(f"{len(body)} bytes for {sum(rows)} x {hidden_size} {dtype} values")
    if not body:
        return [torch.empty(0, hidden_size, dtype=WIRE_DTYPES[dtype]) for _ in rows]
    flat = torch.frombuffer(bytearray(body), dtype=WIRE_DTYPES[dtype]).view(-1, hidden_size)
    return list(flat.split(rows))


class HiddenStateTeacher:
    """A FullDistributionTeacher on opd's server: the server runs the teacher's body and sends hidden
    states; this process applies the teacher's LM head, in chunks, exactly as a local teacher does."""

    def __init__(
        self,
        server: RemoteTeacher,
        head: LMHead,
        vocab_size: int,
        precision: Precision,
        chunk_size: int,
        wire_dtype: str,
    ):
        """vocab_size: the teacher tokenizer's length (head rows past it are padding); wire_dtype: bf16 or fp32."""
        self.server, self.head, self.vocab_size = server, head, vocab_size
        self.precision, self.chunk_size, self.wire_dtype = precision, chunk_size, wire_dtype
        self.temperature, self.top_k = server.config.temperature, server.top_k
        self.name = f"{server.name} (hidden states, its LM head from {head.source})"
        self.bytes_received = 0  # hidden-state bytes on the wire so far, for the benchmark and tests

    @property
    def hidden_size(self) -> int:
        return self.head.hidden_size

    def check(self, tokenizer) -> None:
        """Before training: the head read here is the served model's. The server's own log-probs of a
        probe must match this head's of the server's hidden states; one-line ConfigError otherwise."""
        from opd.errors import ConfigError

        key, url = self.server.key, self.server.url
        models = self.server._call("GET", "/v1/models").get("data", [])
        served = next((model.get("hidden_size") for model in models if model.get("id") == self.server.model), None)
        if served is None:
            raise ConfigError(
                f"{key}.lm_head: {url} does not send hidden states (an opd serve-teacher from before they "
                "were served?); update opd there, or leave lm_head out (token log-probs only)"
            )
        if served != self.head.hidden_size:
            raise ConfigError(
                f"{key}.lm_head: {self.head.source}'s head reads {self.head.hidden_size} numbers a token, the "
                f"model at {url} sends {served}: not the served model's head"
            )
        probe = tokenizer.encode("Probe: 12 + 30 = 42, so the answer is 42.", add_special_tokens=False)
        rows = [(probe, 1)]
        [(expected, _, _)] = self.server._score_rows(rows)
        [states] = self._hidden_rows(rows)
        with self.precision.autocast():
            logits = self.logits(states.to(self.precision.device))
        here = logits.log_softmax(-1).gather(-1, torch.tensor(probe[1:], device=logits.device).unsqueeze(-1))
        gap = (here.squeeze(-1).cpu() - torch.tensor(expected)).abs().max().item()
        exact = self.wire_dtype == "fp32" and self.head.linear.weight.dtype == torch.float32
        limit = HEAD_TOLERANCE if exact else 5 * HEAD_TOLERANCE
        if not gap <= limit:
            raise ConfigError(
                f"{key}.lm_head: the head in {self.head.source} is not the served model's: its log-probs "
                f"of the server's hidden states differ from the server's own by up to {gap:.3g} nats "
                f"(limit {limit:g}); give the served model's files"
            )

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) fp32 logits at the teacher's temperature."""
        with self.precision.autocast():
            raw = self.head.logits(hidden, self.vocab_size)
        return raw.float() / self.temperature

    @torch.no_grad()
    def score(self, batch: StepBatch, keep_hidden: bool = False) -> TeacherScores:
        """The local teacher's scores (ℓᵀ, entropy, top-k; hidden (B, T, H) where kept) from the server's
        hidden states."""
        (rows_count, width), device = batch.completion_ids.shape, batch.completion_ids.device
        hidden = torch.zeros(rows_count, width, self.head.hidden_size, dtype=WIRE_DTYPES[self.wire_dtype])
        for row, states in self.server.map_rows(completion_rows(batch), self._hidden_rows):
            hidden[row, : len(states)] = states
        hidden = hidden.to(device)
        scores = scores_from_hidden(hidden, batch, self.logits, self.chunk_size, self.top_k, keep_hidden)
        scores.flops = 2.0 * self.head.rows * self.head.hidden_size * float(batch.completion_mask.sum())
        return scores

    def _hidden_rows(self, rows: list[tuple[list[int], int]]) -> list[torch.Tensor]:
        """[(sequence, start)] -> each sequence's (len - start, H) hidden states, retried until whole."""
        body = {
            "model": self.server.model,
            "prompt": [sequence for sequence, _ in rows],
            "logprob_start": [start for _, start in rows],
            "dtype": self.wire_dtype,
        }
        expected = [len(sequence) - max(1, start) for sequence, start in rows]

        def parse(response) -> list[torch.Tensor]:
            states = decode_hidden_states(response.content, response.headers, expected, self.head.hidden_size)
            self.bytes_received += len(response.content)
            return states

        return self.server._call("POST", HIDDEN_STATES_PATH, body, parse, raw=True)
