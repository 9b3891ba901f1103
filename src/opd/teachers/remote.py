"""A teacher on a server: `opd serve-teacher` or `vllm serve` (/v1/completions with prompt_logprobs), or
SGLang (/generate with max_new_tokens 0). A TokenScorer: ℓᵀ of every completion token, and the
teacher's top-k log-probs where asked. opd's and vLLM's servers also write rollouts (`sample`: their
completions API sampling token ids), which opd.train.served_teacher makes a Sampler of.

The client sends token ids, never text: each row is its prompt (without padding) followed by its
completion, and the log-probs of the completion's positions come back. Rows go in requests of up to
`teacher.request_tokens` tokens, `teacher.concurrency` at a time. A request that fails in a way that
can pass (connection refused or dropped, a timeout, a 5xx or 408/429, a truncated or garbled body) is
retried with exponential backoff and jitter until `teacher.retry_deadline_s`; then the step fails
with `TeacherUnavailable`, before any update, so a step is scored completely or not applied. Other
4xx answers are errors at once. The deadline is for a server that has answered and then falters: one
that has never answered (nothing listening, an unknown host) is retried for NEVER_ANSWERED_GRACE_S
only, a server just starting its listener, and then named in one line.

Each server's API (paths, request bodies, answer formats) is one adapter in opd.teachers.server_apis.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from opd.config.sections import TeacherConfig
from opd.errors import ConfigError, OpdError
from opd.ops.batch import StepBatch
from opd.teachers.base import TeacherScores
from opd.teachers.server_apis import SERVER_APIS, Draw, Samples

NEVER_ANSWERED_GRACE_S = 5.0


class TeacherUnavailable(OpdError):
    """The teacher's server did not answer within teacher.retry_deadline_s."""


class _Retry(Exception):
    """A failure worth retrying: the server may answer the same request correctly later."""


class RemoteTeacher:
    """A TokenScorer whose teacher is on a server (see the module's docstring)."""

    def __init__(self, config: TeacherConfig, vocab_size: int, key: str = "teacher"):
        """vocab_size: the teacher tokenizer's length; key: the config key naming this teacher."""
        try:
            import httpx
        except ImportError:
            raise ConfigError("teacher.url: a teacher on a server needs httpx: pip install 'opd[serve]'") from None

        self.config, self.vocab_size, self.key = config, vocab_size, key
        self.url = config.url.rstrip("/")
        self.top_k = config.top_k or 0  # null only in a config that was never resolved: no top-k
        self.name = f"{config.model or config.api} at {self.url}"
        api_key = config.api_key or os.environ.get(config.api_key_env)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(max_connections=config.concurrency),
        )
        self.pool = ThreadPoolExecutor(max_workers=config.concurrency)
        self.answered = False  # the server has answered once (any HTTP status): failures since may pass
        self.model = config.model
        self.api = SERVER_APIS[config.api]
        self.tokenizer = None  # the teacher's tokenizer, once check() has seen it

    # --- start-up checks -------------------------------------------------------------------------

    def check(self, tokenizer) -> None:
        """Before training: the server answers, serves the expected model, tokenizes like the student and
        accepts the student's whole vocabulary. One-line ConfigError otherwise."""
        self.tokenizer = tokenizer
        self.model = self.api.served_model(self._call, self.model, self.url)
        self.api.check_tokenizer(self._call, self.model, tokenizer, self.url)
        probe = [0, self.vocab_size - 1, 1]  # the student's largest token id must be in the teacher's vocabulary
        try:
            self._score_rows([(probe, 1)])
        except ConfigError as exc:
            raise ConfigError(
                f"teacher.url: {self.url} refused the student's token id {self.vocab_size - 1} "
                f"(its vocabulary must cover the student's {self.vocab_size}): {exc}"
            ) from None

    # --- scoring ---------------------------------------------------------------------------------

    def score(self, batch: StepBatch, keep_hidden: bool = False) -> TeacherScores:
        """ℓᵀ (B, T) of every completion token, 0 outside the mask; with teacher.top_k also (B, T, K)."""
        shape, k = batch.completion_ids.shape, self.top_k
        logprobs = torch.zeros(shape)
        topk_ids, topk_logprobs = torch.zeros(*shape, k, dtype=torch.long), torch.zeros(*shape, k)
        for row, (token_logprobs, ids, values) in self.map_rows(completion_rows(batch), self._score_rows):
            n = len(token_logprobs)
            if not n:
                continue
            logprobs[row, :n] = torch.tensor(token_logprobs)
            if k:
                topk_ids[row, :n], topk_logprobs[row, :n] = torch.tensor(ids), torch.tensor(values)
        device = batch.completion_ids.device
        return TeacherScores(
            logprobs=logprobs.to(device),
            topk_ids=topk_ids.to(device) if k else None,
            topk_logprobs=topk_logprobs.to(device) if k else None,
        )

    def map_rows(self, rows: list[tuple[list[int], int]], fetch) -> list[tuple[int, object]]:
        """(row index, its answer) for every row: `fetch` takes a list of rows, in requests of up to
        teacher.request_tokens tokens, teacher.concurrency at a time, and returns one answer per row."""
        requests, current, size = [], [], 0
        for index, (sequence, _) in enumerate(rows):
            if current and size + len(sequence) > self.config.request_tokens:
                requests.append(current)
                current, size = [], 0
            current.append(index)
            size += len(sequence)
        if current:
            requests.append(current)
        answers = self.pool.map(lambda indices: fetch([rows[i] for i in indices]), requests)
        return [pair for indices, answer in zip(requests, answers) for pair in zip(indices, answer)]

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[list[float], list, list]]:
        """[(sequence, start)] -> for each, the log-probs of sequence[start:] and the top-k ids and
        log-probs there, retried until they come back whole."""
        path, body = self.api.score_request(self.model, rows, self.top_k, self.config.temperature)
        return self._call("POST", path, body, lambda answer: self.api.parse(answer, rows, self.top_k))

    # --- writing rollouts ------------------------------------------------------------------------

    def sample(self, prompts: list[list[int]], draw: Draw) -> Samples:
        """draw.samples samples of each prompt (token ids without padding), per prompt in order: (token
        ids, their log-probs) each. Prompts go in requests of up to teacher.request_tokens tokens
        (n x (prompt + max_tokens)), or one a request where the API takes one seed a request."""
        requests, current, size = [], [], 0
        for index, prompt in enumerate(prompts):
            tokens = draw.samples * (len(prompt) + draw.max_tokens)
            full = len(current) == self.api.samples_per_request or size + tokens > self.config.request_tokens
            if current and full:
                requests.append(current)
                current, size = [], 0
            current.append(index)
            size += tokens
        if current:
            requests.append(current)

        def fetch(indices: list[int]) -> Samples:
            part = replace(
                draw,
                keys=tuple(draw.keys[i] for i in indices),
                stream_seeds=tuple(draw.stream_seeds[i] for i in indices),
            )
            path, body = self.api.sample_request(self.model, [prompts[i] for i in indices], part)
            parse = lambda answer: self.api.parse_samples(answer, len(indices), draw.samples)  # noqa: E731
            # A sampling request answers once every row is decoded: it may take until the retry deadline.
            timeout = max(self.config.timeout_s, self.config.retry_deadline_s)
            return self._call("POST", path, body, parse, timeout=timeout)

        return [samples for answer in self.pool.map(fetch, requests) for samples in answer]

    def _call(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        parse=lambda answer: answer,
        raw: bool = False,
        timeout: float | None = None,
    ):
        """One request, retried with exponential backoff and jitter until retry_deadline_s. parse: of
        the answer's JSON, or with raw of the response itself (a binary answer). timeout: seconds this
        request may take (default teacher.timeout_s)."""
        import httpx

        started = time.monotonic()
        give_up_at, attempt, last = started + self.config.retry_deadline_s, 0, ""
        while True:
            try:
                options = {} if timeout is None else {"timeout": timeout}
                response = self.client.request(method, self.url + path, json=body, **options)
                self.answered = True
                if response.status_code >= 500 or response.status_code in (408, 429):
                    raise _Retry(f"HTTP {response.status_code}")
                if response.status_code >= 400:
                    raise ConfigError(
                        f"teacher.url: {self.url}{path} answered {response.status_code}: {_message(response)}"
                    )
                return parse(response if raw else response.json())
            except httpx.ConnectError as exc:
                last = f"{type(exc).__name__}: {exc}".strip()
                if not self.answered and time.monotonic() - started >= NEVER_ANSWERED_GRACE_S:
                    raise ConfigError(
                        f"teacher.url: nothing answers at {self.url} ({last[:200]}); start the server first "
                        "(opd serve-teacher, vllm serve or SGLang) or fix the URL"
                    ) from None
            except (httpx.TransportError, _Retry, ValueError, KeyError, TypeError, IndexError) as exc:
                last = f"{type(exc).__name__}: {exc}".strip()
            attempt += 1
            pause = min(10.0, 0.25 * 2**attempt) * random.uniform(0.5, 1.5)
            if time.monotonic() + pause > give_up_at:
                raise TeacherUnavailable(
                    f"teacher server {self.url} gave no usable answer for "
                    f"{self.config.retry_deadline_s:g} s (teacher.retry_deadline_s); last error: "
                    f"{last[:200]}"
                )
            time.sleep(pause)


def completion_rows(batch: StepBatch) -> list[tuple[list[int], int]]:
    """Each row of the batch as (its prompt without padding + its completion, where the completion starts)."""
    rows = []
    for prompt, prompt_mask, completion, length in zip(
        batch.prompt_ids.tolist(),
        batch.prompt_mask.tolist(),
        batch.completion_ids.tolist(),
        batch.completion_mask.sum(1).tolist(),
    ):
        tokens = [token for token, keep in zip(prompt, prompt_mask) if keep]
        rows.append((tokens + completion[: int(length)], len(tokens)))
    return rows


def _message(response) -> str:
    try:
        return str(response.json().get("error", {}).get("message") or response.text)[:300]
    except ValueError:
        return response.text[:300]
