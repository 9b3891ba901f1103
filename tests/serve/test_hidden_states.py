"""The whole distribution from a teacher on opd's server: hidden states over the wire and the teacher's
LM head read alone here. The head against the whole model's, the wire format both ways, the scores
against a local teacher's, the bytes a token costs, the route's contract (key, malformed and oversized
requests), a head that is not the served model's, and training against a local teacher's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from opd.config.schema import TeacherConfig  # noqa: E402
from opd.errors import ConfigError, ModelError  # noqa: E402
from opd.models.lm_head import load_lm_head  # noqa: E402
from opd.ops.forward import logits_from_hidden  # noqa: E402
from opd.teachers.hidden_states import (  # noqa: E402
    HIDDEN_STATES_PATH,
    HiddenStateTeacher,
    decode_hidden_states,
    encode_hidden_states,
)
from opd.teachers.local import load_teacher  # noqa: E402
from opd.teachers.remote import RemoteTeacher  # noqa: E402

from conftest import CPU, make_tiny_model  # noqa: E402
from processes import launch, served  # noqa: E402
from weights import assert_same_learning, final_weights  # noqa: E402


@pytest.mark.parametrize("tied, extra_rows", [(False, 7), (True, 0)])
def test_the_head_read_alone_gives_the_whole_models_logits(tmp_path, tied, extra_rows):
    folder = make_tiny_model(tmp_path / "model", hidden=48, layers=1, seed=3, extra_vocab_rows=extra_rows, tied=tied)
    model = AutoModelForCausalLM.from_pretrained(folder)
    head = load_lm_head(str(folder), "teacher.lm_head", torch.device("cpu"), torch.float32)
    hidden = torch.randn(5, 48)
    vocab = model.config.vocab_size - extra_rows
    assert head.rows == model.config.vocab_size and head.hidden_size == 48
    torch.testing.assert_close(head.logits(hidden, vocab), logits_from_hidden(model, hidden, vocab), atol=0, rtol=0)


def test_a_head_that_cant_be_read_here_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelError, match=r"teacher.lm_head: 'someone/big-teacher' is neither a folder nor in the local"
    ):
        load_lm_head("someone/big-teacher", "teacher.lm_head", torch.device("cpu"), torch.float32)
    folder = make_tiny_model(tmp_path / "model", layers=1)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelError, match=r"teacher.lm_head: .* holds no safetensors files"):
        load_lm_head(str(folder), "teacher.lm_head", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_wire_format_round_trips_and_refuses_what_was_not_asked(dtype):
    states = [torch.randn(3, 8), torch.randn(0, 8), torch.randn(2, 8)]
    body, headers = encode_hidden_states(states, dtype)
    assert len(body) == 5 * 8 * (2 if dtype == "bf16" else 4)
    decoded = decode_hidden_states(body, headers, [3, 0, 2], 8)
    wire = torch.bfloat16 if dtype == "bf16" else torch.float32
    for sent, got in zip(states, decoded):
        assert got.dtype == wire and torch.equal(got, sent.to(wire))
    for rows, width, cut in (([3, 0, 1], 8, 0), ([3, 0, 2], 4, 0), ([3, 0, 2], 8, 2)):
        with pytest.raises(ValueError):  # a garbled or mismatched answer: the client retries it
            decode_hidden_states(body[: len(body) - cut], headers, rows, width)


def scoring_batch(vocab: int):
    from test_teacher_server import scoring_batch as batch

    return batch(vocab)


def hidden_teacher(
    url: str, tokenizer, head_path: Path, vocab: int, wire: str = "fp32", **config
) -> HiddenStateTeacher:
    server = RemoteTeacher(TeacherConfig(url=url, request_tokens=12, retry_deadline_s=10, **config), vocab)
    server.check(tokenizer)
    head = load_lm_head(str(head_path), "teacher.lm_head", torch.device("cpu"), torch.float32)
    teacher = HiddenStateTeacher(server, head, vocab, CPU, chunk_size=3, wire_dtype=wire)
    teacher.check(tokenizer)
    return teacher


@pytest.mark.e2e
def test_the_served_hidden_states_give_the_local_teachers_scores_at_a_fraction_of_the_bytes(tiny_models):
    """The tiny teacher has 7 padding rows past its tokenizer: neither side may score them."""
    local = load_teacher(str(tiny_models["teacher"]), "teacher", CPU, temperature=0.7, top_k=3)
    vocab, tokenizer = local.loaded.vocab_size, local.loaded.tokenizer
    batch = scoring_batch(vocab)
    expected = local.score(batch, keep_hidden=True)
    mask = batch.completion_mask.bool()
    tokens = int(mask.sum())
    with served(tiny_models["teacher"]) as url:
        remote = hidden_teacher(url, tokenizer, tiny_models["teacher"], vocab, temperature=0.7, top_k=3)
        remote.bytes_received = 0
        scores = remote.score(batch, keep_hidden=True)
        assert remote.bytes_received == tokens * 48 * 4  # H fp32 numbers a scored token, nothing else
        bf16 = hidden_teacher(url, tokenizer, tiny_models["teacher"], vocab, wire="bf16", temperature=0.7)
        bf16.bytes_received = 0
        rounded = bf16.score(batch)
        assert bf16.bytes_received == tokens * 48 * 2
        # The same positions as log-probs with a top-20, in the JSON vLLM's clients read, for comparison:
        json_bytes = len(
            httpx.post(
                url + "/v1/completions",
                json={"prompt": [[5] * 12], "max_tokens": 1, "prompt_logprobs": 20, "logprob_start": 1},
            ).content
        )
    for name in ("logprobs", "entropy", "topk_logprobs"):
        torch.testing.assert_close(getattr(scores, name)[mask], getattr(expected, name)[mask], atol=1e-5, rtol=0)
    assert torch.equal(scores.topk_ids[mask], expected.topk_ids[mask])
    torch.testing.assert_close(scores.hidden[mask], expected.hidden[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(rounded.logprobs[mask], expected.logprobs[mask], atol=0.05, rtol=0)
    assert (scores.logprobs[~mask] == 0).all() and (scores.hidden[~mask] == 0).all()
    # Per token: 96 bytes of bf16 hidden states, against the JSON top-20's and fp32 logits' (V x 4).
    assert json_bytes / 11 > 10 * 96 and vocab * 4 > 96


def post_hidden(url: str, body, key: str | None = None, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["content-type"] = "application/json"
        return httpx.post(url + HIDDEN_STATES_PATH, content=raw, headers=headers)
    return httpx.post(url + HIDDEN_STATES_PATH, json=body, headers=headers)


@pytest.mark.e2e
def test_the_route_sends_only_what_was_asked_behind_the_key_and_refuses_the_malformed(tiny_models):
    good = {"prompt": [[5, 6, 7, 8], [9, 10]], "logprob_start": [2, 0], "dtype": "fp32"}
    malformed = [
        ({"prompt": "text"}, 400, "prompt: expected a non-empty list of token ids"),
        ({"prompt": []}, 400, "prompt:"),
        ({"prompt": [[]]}, 400, "prompt:"),
        ({"prompt": [[1, 2.5]]}, 400, "prompt:"),
        ({"prompt": [[1, True]]}, 400, "not booleans"),
        ({"prompt": [[1, -2]]}, 400, "outside this model's vocabulary"),
        ({"prompt": [[1, 10**9]]}, 400, "outside this model's vocabulary"),
        ({"prompt": [[1] * 300]}, 400, "exceed the model's context of 256"),
        ({"prompt": [[1, 2]], "dtype": "fp16"}, 400, "dtype: expected one of ['bf16', 'fp32']"),
        ({"prompt": [[1, 2]], "dtype": None}, 400, "dtype:"),
        ({"prompt": [[1, 2]], "logprob_start": 3}, 400, "logprob_start: 3 is past the prompt's 2 tokens"),
        ({"prompt": [[1, 2]], "logprob_start": -1}, 400, "logprob_start:"),
        ({"prompt": [[1, 2]], "logprob_start": [0, 0]}, 400, "logprob_start:"),
        ({"prompt": [[1, 2]], "logprob_start": "1"}, 400, "logprob_start:"),
        ({"prompt": [[1, 2]], "layers": [3]}, 400, "layers: not a field of /v1/hidden_states"),
        ({"prompt": [[1, 2]], "prompt_logprobs": 1}, 400, "prompt_logprobs: not a field"),
        ({"prompt": [[1, 2]], "model": "other"}, 404, "model 'other' is not served here"),
        ({"prompt": [[1] * 200] * 3}, 413, "more than this server's --max-batch-tokens 512"),
        ([1, 2], 400, "the body must be a JSON object"),
        (5, 400, "the body must be a JSON object"),
    ]
    with served(tiny_models["teacher"], "--api-key", "sesame", "--max-batch-tokens", "512") as url:
        assert post_hidden(url, good).status_code == 401  # no key
        assert post_hidden(url, good, key="wrong").status_code == 401
        for body, status, message in malformed:
            answer = post_hidden(url, body, key="sesame")
            assert answer.status_code == status, (body, answer.text)
            assert message in answer.json()["error"]["message"], (body, answer.text)
        garbled = post_hidden(url, None, key="sesame", raw=b"{not json")
        assert garbled.status_code == 400 and "not valid JSON" in garbled.json()["error"]["message"]
        answer = post_hidden(url, good, key="sesame")  # still serving, and exactly the asked positions
        assert answer.status_code == 200 and answer.headers["x-opd-rows"] == "2,1"
        assert len(answer.content) == 3 * 48 * 4
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sesame"}).json()
        assert models["data"][0]["hidden_size"] == 48


@pytest.mark.e2e
def test_a_head_that_is_not_the_served_models_is_refused_before_training(tiny_models, tmp_path):
    local = load_teacher(str(tiny_models["teacher"]), "teacher", CPU)
    vocab, tokenizer = local.loaded.vocab_size, local.loaded.tokenizer
    same_shape = make_tiny_model(tmp_path / "other", hidden=48, layers=2, seed=99, extra_vocab_rows=7)
    with served(tiny_models["teacher"]) as url:
        with pytest.raises(
            ConfigError, match=r"teacher.lm_head: .* reads 32 numbers a token, the model at .* sends 48"
        ):
            hidden_teacher(url, tokenizer, tiny_models["student"], vocab)
        with pytest.raises(ConfigError, match=r"teacher.lm_head: the head in .* is not the served model's"):
            hidden_teacher(url, tokenizer, same_shape, vocab)


@pytest.mark.e2e
def test_the_dry_run_and_training_name_a_head_that_cant_be_read(tiny_config, tmp_path):
    import yaml

    from conftest import run_cli

    raw = {**tiny_config, "teacher": {"url": "http://127.0.0.1:9", "lm_head": str(tmp_path / "nowhere")}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    for args in (["--dry-run"], []):
        result = run_cli("train", *args, str(path))
        assert result.returncode != 0
        assert (
            result.stderr.strip().splitlines()[-1]
            == f"error: teacher.lm_head: no such model folder '{tmp_path / 'nowhere'}'"
        )


@pytest.fixture(scope="module")
def teacher_url(tiny_models):
    with served(tiny_models["teacher"]) as url:
        yield url


def run_config(tiny_config, output_dir: Path, teacher: dict, changes: dict) -> dict:
    raw = {
        **tiny_config,
        "run": {**tiny_config["run"], "output_dir": str(output_dir), "max_steps": 3},
        "teacher": teacher,
        "optim": {"lr": 1e-2, "schedule": "constant", "eps": 1e-3},
    }
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


OBJECTIVES = {
    "defaults": {},  # reverse_kl_pg with its forward-KL term, which the head turns on
    "forward_kl": {"loss": {"kind": "forward_kl"}},
    "jsd": {"loss": {"kind": "jsd"}},
    "mixture": {
        "rollout": {"student_fraction": 0.5, "off_policy_source": "dataset"},
        "loss": {"off_policy_kind": "forward_kl"},
    },
}


@pytest.mark.e2e
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_training_on_served_hidden_states_equals_training_on_the_local_teacher(
    tiny_config, tiny_models, teacher_url, tmp_path, objective
):
    import yaml

    from opd.config.files import validate
    from opd.train.trainer import train

    changes = OBJECTIVES[objective]
    served_teacher = {"url": teacher_url, "lm_head": str(tiny_models["teacher"]), "retry_deadline_s": 60}
    train(validate(run_config(tiny_config, tmp_path / "local", tiny_config["teacher"], changes)), log=lambda *_: None)
    train(validate(run_config(tiny_config, tmp_path / "remote", served_teacher, changes)), log=lambda *_: None)
    if objective == "defaults":
        assert yaml.safe_load((tmp_path / "remote" / "resolved.yaml").read_text())["loss"]["forward_kl_coef"] == 1.0
    assert_same_learning(
        final_weights(tmp_path / "local"), final_weights(tmp_path / "remote"), tiny_config["student"]["path"], 0.01
    )


@pytest.mark.e2e
def test_two_ranks_on_served_hidden_states_equal_one_rank_on_the_local_teacher(
    tiny_config, tiny_models, teacher_url, tmp_path
):
    """Under torchrun each rank asks the server for its own rows' hidden states and holds the head."""
    from opd.config.files import validate
    from opd.train.trainer import train

    served_teacher = {"url": teacher_url, "lm_head": str(tiny_models["teacher"]), "retry_deadline_s": 60}
    train(validate(run_config(tiny_config, tmp_path / "local", tiny_config["teacher"], {})), log=lambda *_: None)
    raw = run_config(tiny_config, tmp_path / "remote", served_teacher, {})
    result = launch(raw, tmp_path, "remote", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_learning(
        final_weights(tmp_path / "local"), final_weights(tmp_path / "remote"), tiny_config["student"]["path"], 0.01
    )


@pytest.mark.e2e
def test_routed_teachers_on_servers_equal_the_same_teachers_here(tiny_config, tiny_models, tiny_data, tmp_path):
    """Two teachers of different widths (H 48 and 32), each on opd's server with its head here, each row to
    its own: the defaults (with their forward-KL term) train as with the two teachers in this process."""
    from opd.config.files import validate
    from opd.train.trainer import train

    other = make_tiny_model(tmp_path / "other", hidden=32, layers=1, seed=9)
    rows = tiny_data["train"].read_text().splitlines()
    files = {}
    for name, part in (("a", rows[:16]), ("b", rows[16:32])):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(part) + "\n")
    data = {
        **tiny_config["data"],
        "train": [{"path": str(files[name]), "teacher": name} for name in files],
        "eval": None,
    }
    paths = {"a": tiny_models["teacher"], "b": other}

    def routed(output: str, teachers: list[dict]) -> dict:
        raw = run_config(tiny_config, tmp_path / output, None, {"data": data})
        del raw["teacher"]
        return {**raw, "teachers": teachers}

    train(validate(routed("local", [{"name": n, "path": str(p)} for n, p in paths.items()])), log=lambda *_: None)
    with served(paths["a"]) as url_a, served(paths["b"]) as url_b:
        urls = {"a": url_a, "b": url_b}
        teachers = [{"name": n, "url": urls[n], "lm_head": str(p), "retry_deadline_s": 60} for n, p in paths.items()]
        train(validate(routed("remote", teachers)), log=lambda *_: None)
    assert_same_learning(
        final_weights(tmp_path / "local"), final_weights(tmp_path / "remote"), tiny_config["student"]["path"], 0.01
    )


@pytest.mark.e2e
def test_without_the_head_the_default_reads_the_servers_top_20(tiny_config, teacher_url, tmp_path):
    """A server that sends no hidden states (vLLM, SGLang, opd's without lm_head): the default's
    forward-KL term is the top-k estimate, teacher.top_k resolving to 20; top_k 0 turns it off."""
    import yaml

    from opd.config.files import validate
    from opd.train.trainer import train

    served_teacher = {"url": teacher_url, "retry_deadline_s": 60}
    train(validate(run_config(tiny_config, tmp_path / "default", served_teacher, {})), log=lambda *_: None)
    resolved = yaml.safe_load((tmp_path / "default" / "resolved.yaml").read_text())
    assert resolved["loss"]["forward_kl_coef"] == 1.0 and resolved["teacher"]["top_k"] == 20
    plain_teacher = {**served_teacher, "top_k": 0}
    train(validate(run_config(tiny_config, tmp_path / "plain", plain_teacher, {})), log=lambda *_: None)
    resolved = yaml.safe_load((tmp_path / "plain" / "resolved.yaml").read_text())
    assert resolved["loss"]["forward_kl_coef"] == 0.0 and resolved["teacher"]["top_k"] == 0
    default, plain = final_weights(tmp_path / "default"), final_weights(tmp_path / "plain")
    assert max(float((default[name] - plain[name]).abs().max()) for name in default) > 1e-4  # the term trained
