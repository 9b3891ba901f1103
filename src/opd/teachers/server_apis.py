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

from typing import Callable, Protocol

from opd.errors import ConfigError

PROBE_TEXT = "Probe: 12 + 30 = 42, ça va? 東京"

Rows = list[tuple[list[int], int]]  # [(prompt + completion token ids, where the completion starts)]
RowScores = list[tuple[list[float], list, list]]  # per row: ℓᵀ of sequence[start:], top-k ids, top-k log-probs
Call = Callable[..., object]  # RemoteTeacher._call(method, path, body=None, parse=...)


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


class OpdApi(VllmApi):
    """`opd serve-teacher`: vLLM's API, with temperature applied and earlier positions skipped."""

    def score_request(self, model: str | None, rows: Rows, top_k: int, temperature: float) -> tuple[str, dict]:
        path, body = super().score_request(model, rows, top_k, temperature)
        return path, {**body, "temperature": temperature, "logprob_start": [start for _, start in rows]}


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


SERVER_APIS: dict[str, ServerApi] = {"vllm": VllmApi(), "opd": OpdApi(), "sglang": SglangApi()}
