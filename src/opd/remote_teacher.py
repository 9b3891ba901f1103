"""A teacher on a server: `opd serve-teacher` or `vllm serve` (/v1/completions with prompt_logprobs), or
SGLang (/generate with max_new_tokens 0). A TokenScorer: ℓᵀ of every completion token, and the
teacher's top-k log-probs where asked.

The client sends token ids, never text: each row is its prompt (without padding) followed by its
completion, and the log-probs of the completion's positions come back. Rows go in requests of up to
`teacher.request_tokens` tokens, `teacher.concurrency` at a time. A request that fails in a way that
can pass (connection refused or dropped, a timeout, a 5xx or 408/429, a truncated or garbled body) is
retried with exponential backoff and jitter until `teacher.retry_deadline_s`; then the step fails
with `TeacherUnavailable`, before any update, so a step is scored completely or not applied. Other
4xx answers are errors at once.

Response formats, as documented by the projects:
- vLLM (its OpenAI-compatible server's `prompt_logprobs` extension): `choices[i].prompt_logprobs` has one entry per
  prompt position, the first null, each a dict keyed by token id as a string of
  `{logprob, rank, decoded_token}`, holding the position's token and the top k.
- SGLang (`/generate`, docs/references/sampling_params.md; the scheduler's output processor):
  `meta_info.input_token_logprobs` is aligned with `input_ids[logprob_start_len:]` as
  `[logprob, token_id, text]`, its first entry's log-prob null; `input_top_logprobs` likewise, each a
  list of `[logprob, token_id, text]`.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from opd.batch import StepBatch
from opd.config import TeacherConfig
from opd.errors import ConfigError, OpdError
from opd.teacher import TeacherScores

PROBE_TEXT = "Probe: 12 + 30 = 42, ça va? 東京"


class TeacherUnavailable(OpdError):
    """The teacher's server did not answer within teacher.retry_deadline_s."""


class _Retry(Exception):
    """A failure worth retrying: the server may answer the same request correctly later."""


class RemoteTeacher:
    """A TokenScorer whose teacher is on a server (see the module's docstring)."""

    def __init__(self, config: TeacherConfig, vocab_size: int):
        try:
            import httpx
        except ImportError:
            raise ConfigError("teacher.url: a teacher on a server needs httpx: pip install 'opd[serve]'") from None

        self.config, self.vocab_size = config, vocab_size
        self.url = config.url.rstrip("/")
        self.top_k = config.top_k
        self.name = f"{config.model or config.api} at {self.url}"
        api_key = config.api_key or os.environ.get(config.api_key_env)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(config.timeout_s),
                                   limits=httpx.Limits(max_connections=config.concurrency))
        self.pool = ThreadPoolExecutor(max_workers=config.concurrency)
        self.model = config.model

    def scoring_flops(self, batch: StepBatch) -> float:
        return 0.0  # spent on the server; not counted in this run's compute/*

    # --- start-up checks -------------------------------------------------------------------------

    def check(self, tokenizer) -> None:
        """Before training: the server answers, serves the expected model, tokenizes like the student and
        accepts the student's whole vocabulary. One-line ConfigError otherwise."""
        if self.config.api == "sglang":
            info = self._call("GET", "/get_model_info")
            if self.model and self.model not in (info.get("model_path"), info.get("served_model_name")):
                raise ConfigError(f"teacher.model: {self.url} serves {info.get('model_path')!r}, not {self.model!r}")
        else:
            served = [entry.get("id") for entry in self._call("GET", "/v1/models").get("data", [])]
            if self.model is None and len(served) == 1:
                self.model = served[0]
            elif self.model not in served:
                raise ConfigError(f"teacher.model: {self.url} serves {served}, not {self.model!r}"
                                  + ("" if self.model else "; name one with teacher.model"))
            expected = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
            given = self._call("POST", "/tokenize", {"model": self.model, "prompt": PROBE_TEXT,
                                                     "add_special_tokens": False}).get("tokens")
            if given != expected:
                raise ConfigError(f"teacher.url: {self.url} tokenizes differently from the student ({PROBE_TEXT!r} -> "
                                  f"{given} there, {expected} here); the teacher must share the student's tokenizer")
        probe = [0, self.vocab_size - 1, 1]  # the student's largest token id must be in the teacher's vocabulary
        try:
            self._score_rows([(probe, 1)])
        except ConfigError as exc:
            raise ConfigError(f"teacher.url: {self.url} refused the student's token id {self.vocab_size - 1} "
                              f"(its vocabulary must cover the student's {self.vocab_size}): {exc}") from None

    # --- scoring ---------------------------------------------------------------------------------

    def score(self, batch: StepBatch, keep_hidden: bool = False) -> TeacherScores:
        """ℓᵀ (B, T) of every completion token, 0 outside the mask; with teacher.top_k also (B, T, K)."""
        rows = []
        for prompt, prompt_mask, completion, length in zip(
                batch.prompt_ids.tolist(), batch.prompt_mask.tolist(), batch.completion_ids.tolist(),
                batch.completion_mask.sum(1).tolist()):
            tokens = [token for token, keep in zip(prompt, prompt_mask) if keep]
            rows.append((tokens + completion[: int(length)], len(tokens)))
        requests, current, size = [], [], 0
        for index, (sequence, _) in enumerate(rows):
            if current and size + len(sequence) > self.config.request_tokens:
                requests.append(current)
                current, size = [], 0
            current.append(index)
            size += len(sequence)
        if current:
            requests.append(current)
        answers = list(self.pool.map(lambda indices: self._score_rows([rows[i] for i in indices]), requests))
        shape, k = batch.completion_ids.shape, self.top_k
        logprobs = torch.zeros(shape)
        topk_ids, topk_logprobs = torch.zeros(*shape, k, dtype=torch.long), torch.zeros(*shape, k)
        for indices, answer in zip(requests, answers):
            for row, (token_logprobs, ids, values) in zip(indices, answer):
                n = len(token_logprobs)
                if not n:
                    continue
                logprobs[row, :n] = torch.tensor(token_logprobs)
                if k:
                    topk_ids[row, :n], topk_logprobs[row, :n] = torch.tensor(ids), torch.tensor(values)
        device = batch.completion_ids.device
        return TeacherScores(logprobs=logprobs.to(device), topk_ids=topk_ids.to(device) if k else None,
                             topk_logprobs=topk_logprobs.to(device) if k else None)

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[list[float], list, list]]:
        """[(sequence, start)] -> for each, the log-probs of sequence[start:] and the top-k ids and
        log-probs there, retried until they come back whole."""
        sequences = [sequence for sequence, _ in rows]
        starts = [start for _, start in rows]
        if self.config.api == "sglang":
            body = {"input_ids": sequences, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                    "logprob_start_len": [start - 1 for start in starts], "top_logprobs_num": self.top_k}
            return self._call("POST", "/generate", body, lambda answer: parse_sglang(answer, rows, self.top_k))
        body = {"model": self.model, "prompt": sequences, "max_tokens": 1, "prompt_logprobs": self.top_k}
        if self.config.api == "opd":  # opd's own extensions: temperature applied, earlier positions skipped
            body.update(temperature=self.config.temperature, logprob_start=starts)
        return self._call("POST", "/v1/completions", body, lambda answer: parse_vllm(answer, rows, self.top_k))

    def _call(self, method: str, path: str, body: dict | None = None, parse=lambda answer: answer):
        """One request, retried with exponential backoff and jitter until retry_deadline_s."""
        import httpx

        give_up_at, attempt, last = time.monotonic() + self.config.retry_deadline_s, 0, ""
        while True:
            try:
                response = self.client.request(method, self.url + path, json=body)
                if response.status_code >= 500 or response.status_code in (408, 429):
                    raise _Retry(f"HTTP {response.status_code}")
                if response.status_code >= 400:
                    raise ConfigError(f"teacher.url: {self.url}{path} answered {response.status_code}: "
                                      f"{_message(response)}")
                return parse(response.json())
            except (httpx.TransportError, _Retry, ValueError, KeyError, TypeError, IndexError) as exc:
                last = f"{type(exc).__name__}: {exc}".strip()
            attempt += 1
            pause = min(10.0, 0.25 * 2**attempt) * random.uniform(0.5, 1.5)
            if time.monotonic() + pause > give_up_at:
                raise TeacherUnavailable(f"teacher server {self.url} gave no usable answer for "
                                         f"{self.config.retry_deadline_s:g} s (teacher.retry_deadline_s); last error: "
                                         f"{last[:200]}")
            time.sleep(pause)


def _message(response) -> str:
    try:
        return str(response.json().get("error", {}).get("message") or response.text)[:300]
    except ValueError:
        return response.text[:300]


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
                ranked = sorted(((-float(item["logprob"]), int(token)) for token, item in entry.items()
                                 if item.get("rank") is not None and item["rank"] <= top_k))[:top_k]
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
