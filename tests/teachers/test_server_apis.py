"""Each server API's adapter asks for exactly the positions it must: vLLM (no temperature: it would be
ignored for prompt log-probs), opd's server (temperature and the first completion position), SGLang
(logprob_start_len one before the completion); and each reads the model it is told to serve."""

from __future__ import annotations

import pytest

from opd.errors import ConfigError
from opd.teachers.server_apis import SERVER_APIS

ROWS = [([5, 6, 7, 8], 2), ([9, 10, 11], 1)]


def test_request_bodies():
    path, body = SERVER_APIS["vllm"].score_request("m", ROWS, top_k=3, temperature=0.7)
    assert (path, body) == (
        "/v1/completions",
        {"model": "m", "prompt": [[5, 6, 7, 8], [9, 10, 11]], "max_tokens": 1, "prompt_logprobs": 3},
    )
    path, body = SERVER_APIS["opd"].score_request("m", ROWS, top_k=0, temperature=0.7)
    assert path == "/v1/completions" and body["temperature"] == 0.7 and body["logprob_start"] == [2, 1]
    assert body["prompt"] == [[5, 6, 7, 8], [9, 10, 11]] and body["prompt_logprobs"] == 0
    path, body = SERVER_APIS["sglang"].score_request(None, ROWS, top_k=2, temperature=0.7)
    assert path == "/generate" and body["input_ids"] == [[5, 6, 7, 8], [9, 10, 11]]
    assert body["logprob_start_len"] == [1, 0] and body["top_logprobs_num"] == 2
    assert body["sampling_params"] == {"max_new_tokens": 0} and "temperature" not in body


def test_the_served_model_is_the_one_asked_for():
    def vllm_call(method, path, body=None, parse=None):
        assert (method, path) == ("GET", "/v1/models")
        return {"data": [{"id": "teacher-8b"}]}

    vllm = SERVER_APIS["vllm"]
    assert vllm.served_model(vllm_call, None, "http://h") == "teacher-8b"  # the only one, when none is named
    assert vllm.served_model(vllm_call, "teacher-8b", "http://h") == "teacher-8b"
    with pytest.raises(ConfigError, match=r"teacher.model: http://h serves \['teacher-8b'\], not 'other'"):
        vllm.served_model(vllm_call, "other", "http://h")

    def sglang_call(method, path, body=None, parse=None):
        assert (method, path) == ("GET", "/get_model_info")
        return {"model_path": "/models/teacher", "served_model_name": "teacher"}

    sglang = SERVER_APIS["sglang"]
    assert sglang.served_model(sglang_call, "teacher", "http://h") == "teacher"
    with pytest.raises(ConfigError, match="serves '/models/teacher', not 'other'"):
        sglang.served_model(sglang_call, "other", "http://h")
