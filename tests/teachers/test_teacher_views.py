"""Training runs with a teacher that sees differently: the chunk path against the direct path, a teacher
with another tokenizer (in this process and behind a server), and self-distillation with privileged
context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.config.files import load_config, validate
from opd.errors import ConfigError
from opd.train.trainer import train

from conftest import make_tiny_model, run_cli
from processes import served
from text_tokenizers import byte_level_bpe
from weights import assert_same_learning, final_weights


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def with_teacher(tiny_config: dict, output_dir: Path, steps: int = 3, **teacher) -> dict:
    return {
        **tiny_config,
        "run": {**tiny_config["run"], "output_dir": str(output_dir), "max_steps": steps, "eval_every": 1},
        "teacher": {**tiny_config["teacher"], **teacher},
        "optim": {"lr": 1e-2, "schedule": "constant"},
    }


@pytest.fixture(scope="module")
def bpe_teacher(tmp_path_factory) -> Path:
    """A tiny teacher whose tokenizer is a byte-level BPE: other ids, other boundaries, other EOS."""
    return make_tiny_model(
        tmp_path_factory.mktemp("bpe") / "teacher", hidden=48, layers=2, seed=4, tokenizer=byte_level_bpe()
    )


@pytest.mark.parametrize("discount", [0.0, 0.5])
def test_forced_chunk_path_with_one_tokenizer_trains_exactly_as_the_direct_path(tiny_config, tmp_path, discount):
    """Identity: one chunk per token, so the same advantages, loss and weights to the last bit (the
    default's forward-KL term is off across chunks, so off here on both sides)."""
    loss = {"loss": {"discount": discount, "forward_kl_coef": 0.0}}
    train(validate({**with_teacher(tiny_config, tmp_path / "direct"), **loss}), log=lambda *_: None)
    train(validate({**with_teacher(tiny_config, tmp_path / "chunks", alignment="chunks"), **loss}), log=lambda *_: None)
    direct, chunked = metrics(tmp_path / "direct"), metrics(tmp_path / "chunks")
    for a, b in zip(direct, chunked):
        for key in ("loss", "grad_norm", "eval/logprob/teacher"):
            if key in a:
                assert a[key] == b[key], key
        for prefix in ("", "eval/"):
            if prefix + "distill/reverse_kl" in a:
                assert a[prefix + "distill/reverse_kl"] == b[prefix + "distill/seq_reverse_kl"]
                assert prefix + "distill/reverse_kl" not in b and b[prefix + "align/tokens_per_chunk"] == 1.0
                assert b[prefix + "align/unrepresentable_fraction"] == b[prefix + "align/truncated_fraction"] == 0.0
    weights_direct, weights_chunks = final_weights(tmp_path / "direct"), final_weights(tmp_path / "chunks")
    assert all(torch.equal(weights_direct[name], weights_chunks[name]) for name in weights_direct)


def test_a_teacher_with_another_tokenizer_trains_the_student(tiny_config, tmp_path, bpe_teacher):
    output = tmp_path / "cross"
    train(validate(with_teacher(tiny_config, output, path=str(bpe_teacher))), log=lambda *_: None)
    rows = metrics(output)
    last = rows[-1]
    for name in (
        "distill/seq_reverse_kl",
        "logprob/teacher",
        "align/truncated_fraction",
        "align/tokens_per_chunk",
        "eval/distill/seq_reverse_kl",
        "eval/align/unrepresentable_fraction",
    ):
        assert name in last, name
    assert "distill/reverse_kl" not in last and "eval/distill/reverse_kl" not in last  # not defined across tokenizers
    assert last["align/tokens_per_chunk"] >= 1.0  # the BPE splits the student's words, not the other way
    assert 0 < last["align/truncated_fraction"] < 1  # max_new_tokens=8 cuts completions: their tails are dropped
    start = load_file(Path(tiny_config["student"]["path"]) / "model.safetensors")
    final = final_weights(output)
    assert max(float((final[name] - start[name]).abs().max()) for name in final) > 1e-3


@pytest.mark.e2e
def test_a_remote_teacher_with_another_tokenizer_receives_its_own_tokens(tiny_config, tmp_path, bpe_teacher):
    """The same run against `opd serve-teacher`, told the teacher's tokenizer: the same weights."""
    local = with_teacher(tiny_config, tmp_path / "local", path=str(bpe_teacher))
    train(validate(local), log=lambda *_: None)
    with served(bpe_teacher) as url:
        remote = {
            **local,
            "run": {**local["run"], "output_dir": str(tmp_path / "remote")},
            "teacher": {"url": url, "tokenizer": str(bpe_teacher), "timeout_s": 5, "retry_deadline_s": 60},
        }
        train(validate(remote), log=lambda *_: None)
    assert_same_learning(
        final_weights(tmp_path / "local"), final_weights(tmp_path / "remote"), tiny_config["student"]["path"]
    )


def test_self_distillation_sees_the_context_only_on_the_teachers_side(tiny_config, tmp_path):
    rows = [json.loads(line) for line in Path(tiny_config["data"]["train"]).read_text().splitlines()]
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({**row, "teacher_context": row["answer"].split("\n")[-1].strip()}) + "\n" for row in rows)
    )
    raw = with_teacher(tiny_config, tmp_path / "self", path="student")
    raw["data"] = {**raw["data"], "train": str(data), "eval": None, "teacher_context_format": "{context} \n {prompt}"}
    config = validate(raw)
    assert config.teacher.path == "student" and config.teacher_path("teacher") == tiny_config["student"]["path"]
    train(config, log=lambda *_: None)
    control = {
        **raw,
        "run": {**raw["run"], "output_dir": str(tmp_path / "control")},
        "data": {**raw["data"], "train": tiny_config["data"]["train"]},
    }
    train(validate(control), log=lambda *_: None)
    # The teacher is the initial student: without context the two agree at step 1 up to rounding.
    with_context, without = (abs(metrics(tmp_path / name)[0]["distill/reverse_kl"]) for name in ("self", "control"))
    assert without < 1e-5 and with_context > 10 * without, (with_context, without)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"teacher": {"alignment": "chunks"}, "loss": {"kind": "forward_kl"}}, "across tokenizers"),
        ({"teacher": {"alignment": "chunks"}, "loss": {"kind": "topk_forward_kl"}}, "topk_forward_kl"),
        (
            {"teacher": {"chat_template": "own"}, "rollout": {"source": "teacher"}, "loss": {"kind": "sft"}},
            "teacher: rollout.source=teacher needs the teacher's own samples, and it reads rows its own way .* it "
            "can score "
            "rollouts, not write them",
        ),
        ({"data": {"teacher_context_format": "{prompt} only"}}, "must contain {context}"),
    ],
)
def test_settings_a_view_cannot_serve_are_config_errors(tiny_config, change, message):
    raw = {**tiny_config, **{section: {**tiny_config.get(section, {}), **values} for section, values in change.items()}}
    with pytest.raises(ConfigError, match=message):
        validate(raw)


def test_a_different_tokenizer_with_alignment_tokens_is_refused_before_weights_load(tiny_config, tmp_path, bpe_teacher):
    raw = with_teacher(tiny_config, tmp_path / "refused", path=str(bpe_teacher), alignment="tokens")
    with pytest.raises(ConfigError, match="teacher.alignment: .*tokenizer differs"):
        train(validate(raw), log=lambda *_: None)
    assert not (tmp_path / "refused").exists()


@pytest.mark.e2e
def test_opd_eval_reports_the_sequence_level_kl_of_a_teacher_with_another_tokenizer(tiny_config, bpe_teacher, tmp_path):
    out = tmp_path / "eval.json"
    process = run_cli(
        "eval",
        "--model",
        tiny_config["student"]["path"],
        "--teacher",
        str(bpe_teacher),
        "--data",
        tiny_config["data"]["eval"],
        "--max-new-tokens",
        "8",
        "--precision",
        "fp32",
        "--json",
        str(out),
    )
    assert process.returncode == 0, process.stderr
    figures = json.loads(out.read_text())
    assert figures["eval/distill/seq_reverse_kl"] > 0 and "eval/distill/reverse_kl" not in figures
    assert "eval/align/truncated_fraction" in figures and "distill/seq_reverse_kl" in process.stdout


@pytest.mark.e2e
def test_a_row_the_teachers_template_cannot_render_fails_before_training_with_its_file_and_line(tiny_config, tmp_path):
    teacher = make_tiny_model(tmp_path / "chat-teacher", hidden=32, layers=1, seed=5, tokenizer=byte_level_bpe())
    (teacher / "chat_template.jinja").write_text(  # a template that refuses some content, as real ones raise
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('cannot render') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "Mia has 3 apples ?"}\n{"question": "forbidden ?"}\n')
    raw = with_teacher(tiny_config, tmp_path / "run", path=str(teacher), chat_template="own")
    raw["data"] = {**raw["data"], "train": str(data), "eval": None}
    process_config = tmp_path / "config.yaml"
    import yaml

    process_config.write_text(yaml.safe_dump(raw))
    process = run_cli("train", str(process_config))
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{data}:2" in lines[0] and "teacher's prompt" in lines[0], process.stderr
    assert not (tmp_path / "run").exists()


def test_a_teacher_with_another_tokenizer_cannot_write_rollouts(tiny_config, tmp_path, bpe_teacher):
    raw = {
        **with_teacher(tiny_config, tmp_path / "refused", path=str(bpe_teacher)),
        "rollout": {**tiny_config["rollout"], "source": "teacher"},
        "loss": {"kind": "sft"},
    }
    with pytest.raises(ConfigError, match="score rollouts, not write them"):
        train(validate(raw), log=lambda *_: None)
    assert not (tmp_path / "refused").exists()


def test_a_run_derived_from_a_runs_config_re_resolves_what_it_did_not_set(tiny_config, tmp_path, bpe_teacher):
    """config.yaml records what was asked, so a run derived from it resolves the forward-KL default anew:
    with loss.kind forward_kl and a teacher of another tokenizer, the error names the tokenizer, not a
    forward_kl_coef the user never set (which the first run resolved to 1.0)."""
    train(validate(tiny_config), log=lambda *_: None)
    derived = load_config(
        tmp_path / "run" / "config.yaml",
        ["loss.kind=forward_kl", f"teacher.path={bpe_teacher}", f"run.output_dir={tmp_path / 'derived'}"],
    )
    with pytest.raises(ConfigError) as error:
        train(derived, log=lambda *_: None)
    message = str(error.value)
    assert message.startswith("teacher: loss.kind=forward_kl needs the teacher's full distribution"), message
    assert "tokenizer differs" in message and "forward_kl_coef" not in message
    assert not (tmp_path / "derived").exists()
