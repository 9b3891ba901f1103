"""`opd serve-teacher MODEL`: a Hugging Face model scoring token sequences over HTTP (`pip install 'opd[serve]'`).

It speaks the part of vLLM's OpenAI-compatible `/v1/completions` that scoring needs, so one client
talks to it and to `vllm serve`: token-id prompts (one, or a list), `max_tokens` 1 and
`prompt_logprobs: k`, answered with `choices[i].prompt_logprobs`, one entry per prompt position (the
first null), each a dict keyed by token id (as a string) of `{logprob, rank, decoded_token}` holding
the prompt's token and the k most likely. Two extensions of opd's own: the request's `temperature` is
applied to the prompt log-probs (vLLM ignores it there), and `logprob_start` (one number, or one per
prompt) leaves the positions before it null, so a client asking for completion tokens only doesn't pay
for the prompt's LM head. Also `/health`, `/v1/models` and vLLM's `/tokenize`.

Without `prompt_logprobs` and with `logprobs: 0`, `/v1/completions` samples instead: the teacher writes
rollouts, in vLLM's form (opd.serve.sampling).

And `/v1/hidden_states`, opd's own: the final hidden states (after the model's final norm) that predict
the asked positions, in bf16 or fp32 as the request asks, for a trainer that applies the teacher's LM
head itself and so has its whole distribution (format: opd.teachers.hidden_states). It is batched with
the scoring requests, under the same limits and the same API key, and sends exactly the asked positions.

It binds to 127.0.0.1 unless told otherwise. With an API key, every `/v1` and `/tokenize` request
must carry `Authorization: Bearer KEY` (401 otherwise). A malformed or oversized request gets a 4xx
JSON error, `{"error": {"message", "type", "code"}}`, and the server goes on serving.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.

import asyncio
import hmac
import math
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial

from opd.errors import ConfigError
from opd.models.loading import LoadedModel
from opd.models.precision import Precision
from opd.ops.logprobs import tokens_per_chunk
from opd.serve.sampling import TeacherWriter, parse_sample_request, sample_response
from opd.serve.scoring import Batcher, Scored, _Job, score_sequences
from opd.teachers.hidden_states import HIDDEN_STATES_PATH, WIRE_DTYPES, encode_hidden_states


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _sequences(prompt) -> list[list[int]]:
    """A prompt of token ids, or a list of them; anything else (text included) is refused."""
    if isinstance(prompt, list) and prompt and all(isinstance(token, int) for token in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(each, list) for each in prompt):
        if all(each and all(isinstance(token, int) for token in each) for each in prompt):
            return prompt
    raise RequestError(
        400,
        "prompt: expected a non-empty list of token ids, or a list of such lists "
        "(opd serve-teacher scores token ids, not text)",
    )


# The request fields it reads, and those a client may send only with the value that asks for nothing
# beyond scoring (what vLLM's and OpenAI's clients send by default).
_FIELDS = {"model", "prompt", "prompt_logprobs", "temperature", "logprob_start", "max_tokens", "user", "seed"}
_NEUTRAL = {"n": (1,), "best_of": (1,), "stream": (False,), "top_p": (1,), "top_k": (-1, 0), "echo": (False,)}
_SCORING_FORM = "this server scores prompts: send prompt_logprobs=K with max_tokens 1 (or 0)"


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fields(body: dict) -> None:
    """Every field known, and none asking for what a scoring server doesn't do (sampling, streaming, the
    completions API's echo + logprobs form), each refused by name."""
    if body.get("logprobs") is not None or body.get("echo") not in (None, False):
        raise RequestError(
            400,
            f"echo/logprobs: the completions API's echo + logprobs form is not supported; {_SCORING_FORM} "
            "(vLLM's form; with the OpenAI client, extra_body={'prompt_logprobs': K})",
        )
    for key, value in body.items():
        if key in _NEUTRAL:
            allowed = _NEUTRAL[key]
            neutral = value is False if allowed == (False,) else _number(value) and value in allowed
            if value is not None and not neutral:
                raise RequestError(400, f"{key}: expected {allowed[0]!r} or nothing, got {value!r}; {_SCORING_FORM}")
        elif key not in _FIELDS and key != "logprobs":
            raise RequestError(400, f"{key}: not a field this server reads; {_SCORING_FORM}")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not _integer(max_tokens) or max_tokens not in (0, 1)):
        raise RequestError(
            400, f"max_tokens: expected 1 or 0 (it generates nothing), got {max_tokens!r}; {_SCORING_FORM}"
        )


def parse_completion_request(body, vocab_size: int, context: int, max_batch_tokens: int, max_logprobs: int) -> _Job:
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    _check_fields(body)
    sequences = _sequences(body.get("prompt"))
    top_k = body.get("prompt_logprobs")
    if not _integer(top_k) or not 0 <= top_k <= max_logprobs:
        raise RequestError(
            400,
            f"prompt_logprobs: expected an integer from 0 to {max_logprobs} (this server "
            f"only scores prompts), got {top_k!r}",
        )
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not _number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise RequestError(400, f"temperature: expected a finite positive number, got {temperature!r}")
    starts = _starts_within_limits(body, sequences, vocab_size, context, max_batch_tokens)
    return _Job(sequences, starts, float(temperature), top_k)


_HIDDEN_FIELDS = {"model", "prompt", "logprob_start", "dtype"}


def parse_hidden_request(body, vocab_size: int, context: int, max_batch_tokens: int) -> _Job:
    """A request for hidden states (opd.teachers.hidden_states has the format): the sequences, where each
    one's states start, and the dtype to send them in; the same limits as scoring."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    for key in body:
        if key not in _HIDDEN_FIELDS:
            raise RequestError(400, f"{key}: not a field of {HIDDEN_STATES_PATH} (it reads {sorted(_HIDDEN_FIELDS)})")
    dtype = body.get("dtype", "bf16")
    if dtype not in WIRE_DTYPES:
        raise RequestError(400, f"dtype: expected one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
    sequences = _sequences(body.get("prompt"))
    starts = _starts_within_limits(body, sequences, vocab_size, context, max_batch_tokens)
    return _Job(sequences, starts, 1.0, 0, hidden_dtype=dtype)


def _starts_within_limits(body: dict, sequences: list[list[int]], vocab_size: int, context: int, max_batch_tokens: int):
    """Each sequence's logprob_start, with the sequences checked against the model's vocabulary and
    context and the server's batch limit (a 4xx RequestError naming the field otherwise)."""
    starts = body.get("logprob_start", 0)
    starts = [starts] * len(sequences) if isinstance(starts, int) and not isinstance(starts, bool) else starts
    if (
        not isinstance(starts, list)
        or len(starts) != len(sequences)
        or not all(isinstance(start, int) and start >= 0 for start in starts)
    ):
        raise RequestError(400, "logprob_start: expected a non-negative integer, or one per prompt")
    for sequence, start in zip(sequences, starts):
        if start > len(sequence):
            raise RequestError(400, f"logprob_start: {start} is past the prompt's {len(sequence)} tokens")
        if any(isinstance(token, bool) for token in sequence):
            raise RequestError(400, "prompt: token ids must be integers, not booleans")
        if min(sequence) < 0 or max(sequence) >= vocab_size:
            raise RequestError(
                400,
                f"prompt: token id {max(sequence) if max(sequence) >= vocab_size else min(sequence)} "
                f"is outside this model's vocabulary of {vocab_size}",
            )
        if len(sequence) > context:
            raise RequestError(400, f"prompt: {len(sequence)} tokens exceed the model's context of {context}")
    tokens = sum(map(len, sequences))
    if tokens > max_batch_tokens:
        raise RequestError(
            413,
            f"the request holds {tokens} tokens, more than this server's --max-batch-tokens "
            f"{max_batch_tokens}; split it",
        )
    return starts


def completion_response(model_name: str, job: _Job, scored: list[Scored], token_names: list[str]) -> dict:
    """vLLM's response shape: choices[i].prompt_logprobs[position] = {token id: {logprob, rank, decoded_token}}."""
    choices = []
    for index, (sequence, start, result) in enumerate(zip(job.sequences, job.starts, scored)):
        entries: list[dict | None] = [None] * max(1, start)
        for offset, position in enumerate(range(max(1, start), len(sequence))):
            token = sequence[position]
            entry = {
                str(candidate): {"logprob": logprob, "rank": rank, "decoded_token": token_names[candidate]}
                for rank, (candidate, logprob) in enumerate(
                    zip(result.topk_ids[offset], result.topk_logprobs[offset]), 1
                )
            }
            if str(token) not in entry:  # the position's own token, ranked among all (ties share the best rank)
                entry[str(token)] = {
                    "logprob": result.logprobs[offset],
                    "rank": max(result.ranks[offset], len(entry) + 1),
                    "decoded_token": token_names[token],
                }
            entries.append(entry)
        choices.append(
            {
                "index": index,
                "text": "",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": entries[: len(sequence)],
            }
        )
    tokens = sum(map(len, job.sequences))
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens},
    }


def create_app(
    teacher: LoadedModel,
    precision: Precision,
    model_name: str,
    api_key: str | None = None,
    max_batch_tokens: int = 16384,
    max_logprobs: int = 20,
    chunk_size: int | None = None,
):
    """The FastAPI application serving `teacher` under `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    vocab_size = teacher.vocab_size
    context = getattr(teacher.model.config, "max_position_embeddings", None) or 10**9
    token_names = teacher.tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    limits = {"vocab_size": vocab_size, "context": context, "max_batch_tokens": max_batch_tokens}
    score = partial(score_sequences, teacher, precision, tokens_per_chunk(chunk_size, vocab_size))
    batcher = Batcher(score, max_batch_tokens)

    @asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="opd serve-teacher", lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        kind = {401: "authentication_error", 413: "request_too_large"}.get(status, "invalid_request_error")
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc):
        return error(400, f"invalid request: {exc.errors()[:1]}")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(401, "missing or wrong API key (send Authorization: Bearer KEY)")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "owned_by": "opd",
                    "max_model_len": context,
                    "vocab_size": vocab_size,
                    "hidden_size": teacher.hidden_size,  # what /v1/hidden_states sends a token
                }
            ],
        }

    async def json_body(request: Request):
        try:
            return await request.json()
        except ValueError:
            raise RequestError(400, "the body is not valid JSON") from None

    @app.post("/tokenize")
    async def tokenize(request: Request):
        try:
            body = await json_body(request)
            if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
                raise RequestError(400, "prompt: expected a string")
        except RequestError as exc:
            return error(exc.status, str(exc))
        tokens = teacher.tokenizer.encode(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": context}

    def checked_model(body) -> None:
        """A RequestError where the body names a model this server doesn't serve."""
        if isinstance(body, dict) and body.get("model") not in (None, model_name):
            raise RequestError(404, f"model {body.get('model')!r} is not served here (this server: {model_name!r})")

    async def job_of(request: Request, parse) -> _Job:
        """The request's job, parsed by `parse(body)`; a RequestError for a body or model it can't serve."""
        body = await json_body(request)
        checked_model(body)
        return parse(body)

    writer = TeacherWriter(teacher, precision, max_batch_tokens)

    def parse_sampling(body) -> object:
        sequences = _sequences(body.get("prompt"))
        _starts_within_limits({}, sequences, vocab_size, context, math.inf)  # the writer batches within it
        return parse_sample_request(body, sequences, context, RequestError)

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await json_body(request)
            # Without prompt_logprobs, the request asks for samples (opd.serve.sampling); with it, for scores.
            sampling = isinstance(body, dict) and body.get("prompt_logprobs") is None and "logprobs" in body
            parse = (
                parse_sampling if sampling else partial(parse_completion_request, **limits, max_logprobs=max_logprobs)
            )
            checked_model(body)
            job = parse(body)
        except RequestError as exc:
            return error(exc.status, str(exc))
        if sampling:  # on the worker thread that scores: one model, one computation at a time
            rows = await asyncio.get_running_loop().run_in_executor(batcher.worker, writer.sample, job)
            return JSONResponse(sample_response(model_name, job, rows))
        scored = await batcher.submit(job)
        # A response object goes out as it is: FastAPI's jsonable_encoder walk over thousands of
        # per-position dicts would cost more than the scoring of a small model.
        return JSONResponse(completion_response(model_name, job, scored, token_names))

    @app.post(HIDDEN_STATES_PATH)
    async def hidden_states(request: Request):
        try:
            job = await job_of(request, partial(parse_hidden_request, **limits))
        except RequestError as exc:
            return error(exc.status, str(exc))
        states = await batcher.submit(job)
        content, headers = encode_hidden_states(states, job.hidden_dtype)
        return Response(content, media_type="application/octet-stream", headers=headers)

    return app


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_tokens: int = 16384,
    precision: str = "auto",
    device: str = "auto",
    max_logprobs: int = 20,
    served_model_name: str | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Load `model` and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("opd serve-teacher needs the server extra: pip install 'opd[serve]'") from None
    from opd.models.loading import check_model_path
    from opd.teachers.local import load_teacher

    check_model_path(model, "MODEL")
    resolved = Precision.resolve(precision, device)
    teacher = load_teacher(model, "MODEL", resolved, trust_remote_code=trust_remote_code)
    app = create_app(teacher.loaded, resolved, served_model_name or model, api_key, max_batch_tokens, max_logprobs)
    print(f"serving {model} as {served_model_name or model!r} on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
