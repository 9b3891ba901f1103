"""The APIs a teacher's server may speak, one adapter each: what to ask at start-up, how to ask for a
batch's log-probs, and how to read the answer. opd.teachers.remote does the transport (batching,
retries, deadline) and is the same for all.

Response formats, as documented by the projects:
- vLLM (its OpenAI-compatible server's `prompt_logprobs` extension): `choices[i].prompt_logprobs` has one entry per
  prompt position, the first null, each a dict keyed by token id as a string of
  `{logprob, rank, decoded_token}`, holding the position's token and the top k.
- SGLang (`/generate`, docs/references/sampling_params.md; the scheduler's output processor):
  `meta_info.input_token_logprobs` is aligned with `input_ids[logprob_start_len:]` as
  `[logprob, token_id, text]`, its first entry's log-prob null; `input_top_logprobs` likewise, each a
  list of `[logprob, token_id, text]`.
- opd (`opd serve-teacher`): vLLM's format, plus two extensions: `temperature` is applied to the
  prompt log-probs, and `logprob_start` skips the positions before each completion.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol

from opd.errors import ConfigError

PROBE_TEXT = "Probe: 12 + 30 = 42, ça va? 東京"

Rows = list[tuple[list[int], int]]  # [(prompt + completion token ids, where the completion starts)]
# Per prompt, per sample: (token ids, their log-probs, whether a stop token ended it).
Samples = list[list[tuple[list[int], list[float], bool]]]
RowScores = list[tuple[list[float], list, list]]  # per row: ℓᵀ of sequence[start:], top-k ids, top-k log-probs
Call = Callable[..., object]  # RemoteTeacher._call(method, path, body=None, parse=...)


# The sampling fields of vLLM's completions API that would change the distribution, at values that don't.
NEUTRAL_SAMPLING = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}


@dataclass(frozen=True)
class Draw:
    """What a teacher on a server is asked to sample: `samples` of each prompt, of up to max_tokens tokens,
    stopping at stop_ids too; each prompt's draws from its stream (opd.rollout.sampler.stream_seed of
    the run's seed and its key), given both ways: opd's server derives the stream, vLLM takes its seed."""

    samples: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int  # the run's sampling seed
    keys: tuple[int, ...]  # each prompt's stream key
    stream_seeds: tuple[int, ...]  # each prompt's stream seed
    stop_ids: tuple[int, ...]


class ServerApi(Protocol):
    def served_model(self, call: Call, wanted: str | None, url: str) -> str | None:
        """The model name to ask for; ConfigError where the server serves another."""
        ...

    def check_tokenizer(self, call: Call, model: str | None, tokenizer, url: str) -> None: ...

    def score_request(self, model: str | None, rows: Rows, top_k: int, temperature: float) -> tuple[str, dict]:
        """(path, JSON body) asking for the log-probs of each row's completion, and top-k there."""
        ...

    def parse(self, answer, rows: Rows, top_k: int) -> RowScores:
        """Raises ValueError (or KeyError, TypeError, IndexError) on a body that doesn't match the
        request: the transport retries it."""
        ...

    samples_per_request: int | None  # prompts a sampling request may hold (None: as many as fit)

    def sample_request(self, model: str | None, prompts: list[list[int]], draw: Draw) -> tuple[str, dict]:
        """(path, JSON body) asking for draw.samples samples of each prompt (opd.teachers.remote.Draw)."""
        ...

    def parse_samples(self, answer, prompts: int, samples: int) -> Samples:
        """Per prompt, its samples in order; raises as `parse` does on a body that doesn't match."""
        ...


class VllmApi:
    """vLLM's OpenAI-compatible server: /v1/models, /tokenize, /v1/completions with prompt_logprobs."""

    def served_model(self, call: Call, wanted: str | None, url: str) -> str | None:
        served = [entry.get("id") for entry in call("GET", "/v1/models").get("data", [])]
        if wanted is None and len(served) == 1:
            return served[0]
        if wanted not in served:
            raise ConfigError(
                f"teacher.model: {url} serves {served}, not {wanted!r}"
                + ("" if wanted else "; name one with teacher.model")
            )
        return wanted

    def check_tokenizer(self, call: Call, model: str | None, tokenizer, url: str) -> None:
        expected = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
        given = call("POST", "/tokenize", {"model": model, "prompt": PROBE_TEXT, "add_special_tokens": False}).get(
            "tokens"
        )
        if given != expected:
            raise ConfigError(
                f"teacher.url: {url} tokenizes differently from the student ({PROBE_TEXT!r} -> "
                f"{given} there, {expected} here); the teacher must share the student's tokenizer"
            )

    def score_request(self, model: str | None, rows: Rows, top_k: int, temperature: float) -> tuple[str, dict]:
        # Temperature is not applied to prompt log-probs here, so none is sent: ℓᵀ is at temperature 1.
        return "/v1/completions", {
            "model": model,
            "prompt": [sequence for sequence, _ in rows],
            "max_tokens": 1,
            "prompt_logprobs": top_k,
        }

    def parse(self, answer, rows: Rows, top_k: int) -> RowScores:
        return parse_vllm(answer, rows, top_k)

    # One prompt a request: vLLM takes one seed a request, and each prompt has its own stream.
    samples_per_request: int | None = 1

    def sample_request(self, model: str | None, prompts: list[list[int]], draw: Draw) -> tuple[str, dict]:
        (prompt,), (seed,) = prompts, draw.stream_seeds
        return "/v1/completions", {
            "model": model,
            "prompt": prompt,
            "n": draw.samples,
            "max_tokens": draw.max_tokens,
            "temperature": draw.temperature,
            "top_k": draw.top_k or -1,
            "top_p": draw.top_p,
            "seed": seed % 2**62,
            "stop_token_ids": list(draw.stop_ids),
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
            # vLLM fills what a request leaves out from the model's generation_config.json (a repetition
            # penalty, say): the teacher's rows are drawn from its distribution alone.
            **NEUTRAL_SAMPLING,
        }

    def parse_samples(self, answer, prompts: int, samples: int) -> Samples:
        return parse_vllm_samples(answer, prompts, samples)


class OpdApi(VllmApi):
    """`opd serve-teacher`: vLLM's API, with temperature applied and earlier positions skipped; it samples
    a request's prompts together, each from the stream opd's own sampler draws it from (stream_key)."""

    def score_request(self, model: str | None, rows: Rows, top_k: int, temperature: float) -> tuple[str, dict]:
        path, body = super().score_request(model, rows, top_k, temperature)
        return path, {**body, "temperature": temperature, "logprob_start": [start for _, start in rows]}

    samples_per_request: int | None = None

    def sample_request(self, model: str | None, prompts: list[list[int]], draw: Draw) -> tuple[str, dict]:
        path, body = super().sample_request(model, prompts[:1], replace(draw, stream_seeds=draw.stream_seeds[:1]))
        # The server derives each prompt's stream from the seed modulo 2**63, as stream_seed does.
        return path, {**body, "prompt": prompts, "seed": draw.seed % 2**63, "stream_key": list(draw.keys)}


class SglangApi:
    """SGLang: /get_model_info, /generate with max_new_tokens 0 and input log-probs."""

    def served_model(self, call: Call, wanted: str | None, url: str) -> str | None:
        info = call("GET", "/get_model_info")
        if wanted and wanted not in (info.get("model_path"), info.get("served_model_name")):
            raise ConfigError(f"teacher.model: {url} serves {info.get('model_path')!r}, not {wanted!r}")
        return wanted

    def check_tokenizer(self, call: Call, model: str | None, tokenizer, url: str) -> None:
        pass  # no tokenize route to ask; the vocabulary probe still runs

    def score_request(self, model: str | None, rows: Rows, top_k: int, temperature: float) -> tuple[str, dict]:
        return "/generate", {
            "input_ids": [sequence for sequence, _ in rows],
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": [start - 1 for _, start in rows],
            "top_logprobs_num": top_k,
        }

    def parse(self, answer, rows: Rows, top_k: int) -> RowScores:
        return parse_sglang(answer, rows, top_k)

    samples_per_request: int | None = None

    def sample_request(self, model: str | None, prompts: list[list[int]], draw: Draw) -> tuple[str, dict]:
        raise ConfigError("teacher.api: sglang: opd asks an SGLang teacher for scores only, not samples")

    def parse_samples(self, answer, prompts: int, samples: int) -> Samples:
        raise ConfigError("teacher.api: sglang: opd asks an SGLang teacher for scores only, not samples")


def parse_vllm(answer: dict, rows: list[tuple[list[int], int]], top_k: int) -> list[tuple[list[float], list, list]]:
    """vLLM's (and opd's) completions answer -> per row: log-probs of sequence[start:], top-k ids and
    log-probs there. Raises ValueError on a body that doesn't match the request (retried)."""
    choices = sorted(answer["choices"], key=lambda choice: choice["index"])
    if len(choices) != len(rows):
        raise ValueError(f"{len(choices)} choices for {len(rows)} prompts")
    results = []
    for choice, (sequence, start) in zip(choices, rows):
        entries = choice["prompt_logprobs"]
        if len(entries) != len(sequence):
            raise ValueError(f"{len(entries)} prompt_logprobs for {len(sequence)} tokens")
        logprobs, ids, values = [], [], []
        for position in range(start, len(sequence)):
            entry = entries[position]
            logprobs.append(float(entry[str(sequence[position])]["logprob"]))
            if top_k:
                # The k best by log-prob among the entries ranked within k (ties can give one more).
                ranked = sorted(
                    (
                        (-float(item["logprob"]), int(token))
                        for token, item in entry.items()
                        if item.get("rank") is not None and item["rank"] <= top_k
                    )
                )[:top_k]
                if len(ranked) != top_k:
                    raise ValueError(f"{len(ranked)} top log-probs at a position, asked for {top_k}")
                ids.append([token for _, token in ranked])
                values.append([-negative for negative, _ in ranked])
        results.append((logprobs, ids, values))
    return results


def parse_sglang(answer, rows: list[tuple[list[int], int]], top_k: int) -> list[tuple[list[float], list, list]]:
    """SGLang's /generate answer (a list for a batch) -> as parse_vllm. Requested with
    logprob_start_len = start - 1, so entry 0 is the token before the completion (null) and entry j + 1
    the completion's token j."""
    answers = answer if isinstance(answer, list) else [answer]
    if len(answers) != len(rows):
        raise ValueError(f"{len(answers)} answers for {len(rows)} prompts")
    results = []
    for each, (sequence, start) in zip(answers, rows):
        info = each["meta_info"]
        entries = info["input_token_logprobs"]
        if len(entries) != len(sequence) - start + 1:
            raise ValueError(f"{len(entries)} input log-probs for {len(sequence) - start + 1} positions")
        logprobs, ids, values = [], [], []
        for offset, position in enumerate(range(start, len(sequence)), 1):
            logprob, token = entries[offset][0], entries[offset][1]
            if token != sequence[position]:
                raise ValueError(f"token {token} where {sequence[position]} was sent")
            logprobs.append(float(logprob))
            if top_k:
                top = sorted(info["input_top_logprobs"][offset], key=lambda item: -item[0])[:top_k]
                if len(top) != top_k:
                    raise ValueError(f"{len(top)} top log-probs at a position, asked for {top_k}")
                ids.append([int(item[1]) for item in top])
                values.append([float(item[0]) for item in top])
        results.append((logprobs, ids, values))
    return results


def parse_vllm_samples(answer: dict, prompts: int, samples: int) -> Samples:
    """vLLM's completions answer with logprobs 0 and token ids as "token_id:ID": choice i * n + j is
    prompt i's sample j."""
    choices = sorted(answer["choices"], key=lambda choice: choice["index"])
    if [choice["index"] for choice in choices] != list(range(prompts * samples)):
        raise ValueError(f"{len(choices)} samples came back, not {prompts} prompts x {samples}")
    rows = []
    for choice in choices:
        logprobs = choice["logprobs"]
        ids = [int(token.removeprefix("token_id:")) for token in logprobs["tokens"]]
        values = [float(value) for value in logprobs["token_logprobs"]]
        if len(values) != len(ids):
            raise ValueError(f"log-probs for {len(values)} of {len(ids)} sampled tokens came back")
        rows.append((ids, values, choice.get("finish_reason") == "stop"))
    return [rows[prompt * samples : (prompt + 1) * samples] for prompt in range(prompts)]


SERVER_APIS: dict[str, ServerApi] = {"vllm": VllmApi(), "opd": OpdApi(), "sglang": SglangApi()}
