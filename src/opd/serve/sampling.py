"""The sampling form of `/v1/completions` on `opd serve-teacher`: a teacher on a server that writes
rollouts (GKD's mixture, lambda auto's far start, sequence-level KD on its samples).

It is the part of vLLM's completions API a trainer needs. The request gives token-id prompts (one, or
a list) and `n` samples of each, of up to `max_tokens` tokens, under `temperature`, `top_k`, `top_p`
and `seed`. Sampling stops at the model's EOS and at `stop_token_ids`. The request must ask for
`logprobs: 0` and `return_tokens_as_token_ids: true`. The answer is vLLM's: choice `i * n + j` is prompt
i's sample j, its `logprobs.tokens` are `"token_id:ID"` and its `logprobs.token_logprobs` each sampled
token's log-prob under the distribution that drew it. `finish_reason` is `stop` or `length`.

One extension of opd's own: `stream_key` (one per prompt). With it, `seed` is the run's seed and each
prompt's draws are those opd's sampler makes for the prompt of that key
(opd.rollout.sampler.uniforms), so a teacher's rows are the same from its server as from the trainer's
process. Without it, the keys are the prompts' positions in the request.

The prompts of a request are sampled in one batch, on the worker thread that scores, one request at a
time.
"""

# No `from __future__ import annotations`: kept like server.py, whose FastAPI handlers call these.

import time
import uuid
from dataclasses import dataclass

from opd.data.prompts import PromptBatch
from opd.models.loading import LoadedModel
from opd.models.precision import Precision
from opd.ops.batch import TEACHER
from opd.rollout.sampler import ModelSampler, SamplingSettings

SAMPLE_FIELDS = {
    "model",
    "prompt",
    "n",
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stream_key",
    "logprobs",
    "return_tokens_as_token_ids",
    "stop_token_ids",
    "skip_special_tokens",
    "user",
}
_NEUTRAL = {"stream": False, "echo": False}


@dataclass(frozen=True)
class SampleJob:
    prompts: list[list[int]]
    samples: int  # n, per prompt
    settings: SamplingSettings
    seed: int
    keys: list[int]  # each prompt's random-stream key
    stop_ids: tuple[int, ...]  # besides the model's own


def parse_sample_request(
    body: dict, sequences: list[list[int]], context: int, max_batch_tokens: int, error
) -> SampleJob:
    """The sampling request in `body` (its prompts already read and checked as `sequences`); `error(status,
    message)` builds the exception raised for a field it can't serve, named."""
    for key, value in body.items():
        if key in _NEUTRAL:
            if value not in (None, _NEUTRAL[key]):
                raise error(400, f"{key}: expected {_NEUTRAL[key]!r} or nothing, got {value!r}")
        elif key not in SAMPLE_FIELDS:
            raise error(400, f"{key}: not a field this server reads when it samples (it reads {sorted(SAMPLE_FIELDS)})")

    def integer(key: str, default, low: int, high: int | None = None) -> int:
        value = body.get(key, default)
        value = default if value is None else value
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            bounds = f"from {low}" + (f" to {high}" if high is not None else "")
            raise error(400, f"{key}: expected an integer {bounds}, got {body.get(key)!r}")
        return value

    def number(key: str, default: float, low: float, high: float, low_open: bool) -> float:
        value = body.get(key, default)
        value = default if value is None else value
        fits = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
        if not fits or (low_open and value == low):
            raise error(
                400, f"{key}: expected a number in {'(' if low_open else '['}{low:g}, {high:g}], got {body.get(key)!r}"
            )
        return float(value)

    if body.get("return_tokens_as_token_ids") is not True or body.get("logprobs") != 0:
        raise error(
            400,
            "logprobs / return_tokens_as_token_ids: this server samples token ids; send logprobs 0 and "
            "return_tokens_as_token_ids true (or prompt_logprobs K with max_tokens 1 to score)",
        )
    samples = integer("n", 1, 1)
    max_tokens = integer("max_tokens", 16, 1)
    top_k = integer("top_k", -1, -1)
    settings = SamplingSettings(
        max_tokens, number("temperature", 1.0, 0.0, 100.0, True), max(0, top_k), number("top_p", 1.0, 0.0, 1.0, True)
    )
    seed = integer("seed", 0, 0)
    keys = body.get("stream_key", list(range(len(sequences))))
    keys = [keys] if isinstance(keys, int) and not isinstance(keys, bool) else keys
    if not (
        isinstance(keys, list)
        and len(keys) == len(sequences)
        and all(isinstance(key, int) and not isinstance(key, bool) and key >= 0 for key in keys)
    ):
        raise error(400, "stream_key: expected a non-negative integer, or one per prompt")
    stops = body.get("stop_token_ids") or []
    if not isinstance(stops, list) or not all(
        isinstance(token, int) and not isinstance(token, bool) for token in stops
    ):
        raise error(400, "stop_token_ids: expected a list of token ids")
    longest = max(map(len, sequences))
    if longest + max_tokens > context:
        raise error(400, f"max_tokens: {longest} prompt tokens + {max_tokens} exceed the model's context of {context}")
    tokens = samples * sum(len(sequence) + max_tokens for sequence in sequences)
    if tokens > max_batch_tokens:
        raise error(
            413,
            f"the request would hold {tokens} tokens (n x (prompt + max_tokens)), more than this server's "
            f"--max-batch-tokens {max_batch_tokens}; split it",
        )
    return SampleJob(sequences, samples, settings, seed, keys, tuple(stops))


class TeacherWriter:
    """Samples `teacher` for SampleJobs with opd's sampler (one per setting, kept), on the caller's thread."""

    def __init__(self, teacher: LoadedModel, precision: Precision):
        self.teacher, self.precision = teacher, precision
        self.samplers: dict[tuple, ModelSampler] = {}

    def sample(self, job: SampleJob) -> list[tuple[list[int], list[float], bool]]:
        """Per row (prompt-major, n per prompt): the sampled token ids, their log-probs, and whether a stop
        token ended it."""
        key = (job.settings, job.stop_ids)
        if key not in self.samplers:
            self.samplers[key] = ModelSampler(
                self.teacher, job.settings, self.precision, source=TEACHER, extra_stop_ids=job.stop_ids
            )
        prompts = PromptBatch(job.prompts, list(range(len(job.prompts))), [None] * len(job.prompts), job.keys)
        batch = self.samplers[key].sample(prompts, job.samples, job.seed)
        lengths = batch.completion_mask.sum(1).tolist()
        ids, logprobs = batch.completion_ids.tolist(), batch.sampler_logprobs.tolist()
        finished = batch.finished.tolist()
        return [(ids[row][:n], logprobs[row][:n], bool(finished[row])) for row, n in enumerate(map(int, lengths))]


def sample_response(model_name: str, job: SampleJob, rows: list[tuple[list[int], list[float], bool]]) -> dict:
    """vLLM's completions response for sampled rows: choice i * n + j is prompt i's sample j."""
    choices = [
        {
            "index": index,
            "text": "",
            "logprobs": {
                "tokens": [f"token_id:{token}" for token in ids],
                "token_logprobs": logprobs,
                "top_logprobs": None,
                "text_offset": [],
            },
            "finish_reason": "stop" if stopped else "length",
            "stop_reason": None,
        }
        for index, (ids, logprobs, stopped) in enumerate(rows)
    ]
    prompt_tokens = sum(map(len, job.prompts))
    completion_tokens = sum(len(ids) for ids, _, _ in rows)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
