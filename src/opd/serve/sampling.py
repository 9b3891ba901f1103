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

The prompts of a request are sampled in batches of up to `--max-batch-tokens` (n x (the longest
prompt + max_tokens)), a prompt over it alone, on the worker thread that scores, one request at a
time. Each prompt draws from its own stream, so the batching doesn't change the draws.
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
from opd.teachers.server_apis import NEUTRAL_SAMPLING

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
# Fields read only at the value that changes nothing (what vLLM's and OpenAI's clients may send).
_NEUTRAL = {"stream": False, "echo": False, **NEUTRAL_SAMPLING}
MAX_CACHED_SAMPLERS = 8  # one sampler per distinct setting: a client varying them can't grow the cache


@dataclass(frozen=True)
class SampleJob:
    prompts: list[list[int]]
    samples: int  # n, per prompt
    settings: SamplingSettings
    seed: int
    keys: list[int]  # each prompt's random-stream key
    stop_ids: tuple[int, ...]  # besides the model's own


def _neutral(key: str, value) -> bool:
    wanted = _NEUTRAL[key]
    if isinstance(wanted, bool) or isinstance(value, bool):
        return value is wanted
    return isinstance(value, (int, float)) and value == wanted


def parse_sample_request(body: dict, sequences: list[list[int]], context: int, error) -> SampleJob:
    """The sampling request in `body` (its prompts already read and checked as `sequences`); `error(status,
    message)` builds the exception raised for a field it can't serve, named."""
    for key, value in body.items():
        if key in _NEUTRAL:
            if value is not None and not _neutral(key, value):
                raise error(400, f"{key}: expected {_NEUTRAL[key]!r} or nothing, got {value!r}")
        elif key not in SAMPLE_FIELDS:
            raise error(400, f"{key}: not a field this server reads when it samples (it reads {sorted(SAMPLE_FIELDS)})")

    def integer(key: str, default, low: int) -> int:
        value = body.get(key, default)
        value = default if value is None else value
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise error(400, f"{key}: expected an integer from {low}, got {body.get(key)!r}")
        return value

    def number(key: str, default: float, low: float, high: float) -> float:
        """A number in (low, high]."""
        value = body.get(key, default)
        value = default if value is None else value
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low < value <= high:
            raise error(400, f"{key}: expected a number in ({low:g}, {high:g}], got {body.get(key)!r}")
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
    temperature, top_p = number("temperature", 1.0, 0.0, 100.0), number("top_p", 1.0, 0.0, 1.0)
    settings = SamplingSettings(max_tokens, temperature, max(0, top_k), top_p)
    seed = integer("seed", 0, 0)
    keys = body.get("stream_key", list(range(len(sequences))))
    keys = [keys] if isinstance(keys, int) and not isinstance(keys, bool) else keys
    if not (
        isinstance(keys, list)
        and len(keys) == len(sequences)
        and all(isinstance(key, int) and not isinstance(key, bool) and key >= 0 for key in keys)
    ):
        raise error(400, "stream_key: expected a non-negative integer, or one per prompt")
    stops = body.get("stop_token_ids")
    stops = [] if stops is None else stops
    if not isinstance(stops, list) or not all(
        isinstance(token, int) and not isinstance(token, bool) for token in stops
    ):
        raise error(400, "stop_token_ids: expected a list of token ids")
    longest = max(map(len, sequences))
    if longest + max_tokens > context:
        raise error(400, f"max_tokens: {longest} prompt tokens + {max_tokens} exceed the model's context of {context}")
    return SampleJob(sequences, samples, settings, seed, keys, tuple(stops))


class TeacherWriter:
    """Samples `teacher` for SampleJobs with opd's sampler (one per setting, kept), on the caller's thread,
    in batches of prompts within `max_batch_tokens` (see the module)."""

    def __init__(self, teacher: LoadedModel, precision: Precision, max_batch_tokens: int):
        self.teacher, self.precision, self.max_batch_tokens = teacher, precision, max_batch_tokens
        self.samplers: dict[tuple, ModelSampler] = {}

    def sample(self, job: SampleJob) -> list[tuple[list[int], list[float], bool]]:
        """Per row (prompt-major, n per prompt): the sampled token ids, their log-probs, and whether a stop
        token ended it."""
        key = (job.settings, job.stop_ids)
        if key not in self.samplers:
            if len(self.samplers) >= MAX_CACHED_SAMPLERS:
                self.samplers.clear()
            self.samplers[key] = ModelSampler(
                self.teacher, job.settings, self.precision, source=TEACHER, extra_stop_ids=job.stop_ids
            )
        rows = []
        for group in self.batches(job):
            prompts = PromptBatch(
                [job.prompts[i] for i in group], group, [None] * len(group), [job.keys[i] for i in group]
            )
            batch = self.samplers[key].sample(prompts, job.samples, job.seed)
            lengths = [int(n) for n in batch.completion_mask.sum(1).tolist()]
            ids, logprobs = batch.completion_ids.tolist(), batch.sampler_logprobs.tolist()
            finished = batch.finished.tolist()
            rows += [(ids[row][:n], logprobs[row][:n], bool(finished[row])) for row, n in enumerate(lengths)]
        return rows

    def batches(self, job: SampleJob) -> list[list[int]]:
        """The job's prompts (by position, in order) in batches of n x (the longest prompt + max_tokens)
        x prompts within max_batch_tokens; a prompt over it alone."""
        batches, current, longest = [], [], 0
        for index, prompt in enumerate(job.prompts):
            width = max(longest, len(prompt)) + job.settings.max_new_tokens
            if current and job.samples * (len(current) + 1) * width > self.max_batch_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(index)
            longest = max(longest, len(prompt))
        return batches + [current]


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
