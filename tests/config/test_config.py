"""The run config: every documented key exists, bad input is reported precisely and all at once,
`--set` overrides parse as YAML, validation is pure, and dump -> load round-trips."""

from __future__ import annotations

import builtins
import copy
import os
import socket

import pytest
import yaml

from opd.config.files import dump_config, load_config, parse_override, validate
from opd.config.schema import Config
from opd.errors import ConfigError


def minimal_raw(root: str = "/nonexistent/opd-test") -> dict:
    """The required keys only, pointing at paths that do not exist."""
    return {
        "run": {"output_dir": f"{root}/run"},
        "student": {"path": f"{root}/student"},
        "teacher": {"path": f"{root}/teacher"},
        "data": {"train": f"{root}/train.jsonl"},
    }


def with_keys(raw: dict, values: dict) -> dict:
    """A copy of raw with dotted keys set, e.g. {"optim.lr": 0.1}."""
    raw = copy.deepcopy(raw)
    for dotted, value in values.items():
        *sections, key = dotted.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    return raw


def read_key(config: Config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return str(info.value)


def write_yaml(path, raw) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


# Non-default values for the keys DESIGN.md and the README promise.
DOCUMENTED_KEYS = {
    "run.output_dir": "/nonexistent/opd-test/another-run",
    "run.seed": 1234,
    "run.max_steps": 17,
    "run.save_every": 5,
    "run.eval_every": 3,
    "student.path": "Org/student-model",
    "teacher.path": "/nonexistent/opd-test/teacher-folder",
    "data.train": "/nonexistent/opd-test/other-train.jsonl",
    "data.eval": "/nonexistent/opd-test/eval.jsonl",
    "rollout.samples_per_prompt": 3,
    "rollout.max_new_tokens": 77,
    "rollout.temperature": 0.7,
    "loss.kind": "forward_kl",
    "batch.prompts_per_step": 5,
    "batch.micro_batch_size": 15,
    "optim.lr": 3e-4,
}


def test_documented_keys_exist_and_read_back():
    config = validate(with_keys(minimal_raw(), DOCUMENTED_KEYS))
    for dotted, value in DOCUMENTED_KEYS.items():
        assert read_key(config, dotted) == value, dotted


def test_defaults_fill_optional_sections():
    config = validate(minimal_raw())
    assert config.data.eval is None
    assert config.loss.kind == "reverse_kl_pg"
    assert config.rollout.samples_per_prompt * config.batch.prompts_per_step >= config.batch.micro_batch_size


@pytest.mark.parametrize(
    "dotted, hint",
    [
        ("optim.lrr", "optim.lr"),
        ("rollout.temprature", "rollout.temperature"),
        ("run.max_step", "run.max_steps"),
        ("batch.micro_batchsize", "batch.micro_batch_size"),
        ("rollut", "rollout"),
    ],
)
def test_misspelt_key_is_rejected_with_the_key_probably_meant(dotted, hint):
    message = config_error(with_keys(minimal_raw(), {dotted: 1}))
    assert f"{dotted}: unknown key" in message
    assert f"did you mean '{hint}'" in message


def test_unknown_key_without_a_close_match_has_no_hint():
    message = config_error(with_keys(minimal_raw(), {"run.zzqqxx": 1}))
    assert "run.zzqqxx: unknown key" in message
    assert "did you mean" not in message


def test_ill_typed_value_names_the_key_and_shows_the_value():
    message = config_error(with_keys(minimal_raw(), {"rollout.samples_per_prompt": "many"}))
    assert "rollout.samples_per_prompt" in message
    assert "'many'" in message


def test_out_of_range_value_names_the_key_and_shows_the_value():
    message = config_error(with_keys(minimal_raw(), {"optim.lr": -0.5}))
    assert "optim.lr" in message
    assert "-0.5" in message


def test_bad_loss_kind_lists_the_valid_options():
    message = config_error(with_keys(minimal_raw(), {"loss.kind": "kl"}))
    assert "loss.kind" in message and "'kl'" in message
    for option in ("reverse_kl_pg", "forward_kl", "reverse_kl", "jsd"):
        assert option in message


def test_missing_required_key_is_named():
    raw = minimal_raw()
    del raw["teacher"]["path"]
    assert "teacher.path" in config_error(raw)


def test_every_error_in_a_file_is_reported_at_once(tmp_path):
    raw = with_keys(
        minimal_raw(),
        {"optim.lrr": 1e-4, "rollout.samples_per_prompt": "many", "loss.kind": "kl", "run.max_steps": 0},
    )
    del raw["student"]["path"]
    path = write_yaml(tmp_path / "config.yaml", raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert path in message
    for needle in (
        "optim.lrr",
        "did you mean 'optim.lr'",
        "rollout.samples_per_prompt",
        "'many'",
        "loss.kind",
        "'kl'",
        "run.max_steps",
        "student.path",
    ):
        assert needle in message, needle
    assert "\n" not in message  # the CLI prints it as one line


def test_micro_batch_larger_than_the_steps_rollouts_is_rejected_with_the_numbers():
    raw = with_keys(
        minimal_raw(), {"batch.prompts_per_step": 2, "rollout.samples_per_prompt": 3, "batch.micro_batch_size": 7}
    )
    message = config_error(raw)
    assert "batch.micro_batch_size=7" in message
    assert "6 rollouts" in message
    assert "batch.prompts_per_step=2" in message and "rollout.samples_per_prompt=3" in message
    # Exactly one step's rollouts per micro-batch is fine.
    assert validate(with_keys(raw, {"batch.micro_batch_size": 6})).batch.micro_batch_size == 6


def test_validation_touches_no_disk_and_no_network(monkeypatch):
    """Paths are checked when the run starts, not when the config is validated."""
    raw = with_keys(minimal_raw(), {"data.eval": "/nonexistent/opd-test/eval.jsonl"})

    def forbidden(*args, **kwargs):
        raise AssertionError(f"validation touched the outside world: {args!r}")

    for module, name in [
        (os, "stat"),
        (os, "lstat"),
        (os, "listdir"),
        (os, "scandir"),
        (os, "mkdir"),
        (os, "makedirs"),
        (builtins, "open"),
        (socket, "create_connection"),
    ]:
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(socket.socket, "connect", forbidden)
    config = validate(raw)
    monkeypatch.undo()
    assert config.student.path == "/nonexistent/opd-test/student"
    assert not os.path.exists("/nonexistent/opd-test")


# --- load_config and --set overrides ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optim.lr=0.5", (["optim", "lr"], 0.5)),
        ("run.max_steps=12", (["run", "max_steps"], 12)),
        ("run.progress=false", (["run", "progress"], False)),
        ("data.shuffle=true", (["data", "shuffle"], True)),
        ("data.eval=null", (["data", "eval"], None)),
        ("data.eval=", (["data", "eval"], None)),
        ("student.path=Org/model", (["student", "path"], "Org/model")),
        ("optim.betas=[0.8, 0.9]", (["optim", "betas"], [0.8, 0.9])),
        ("run.output_dir=runs/a=b", (["run", "output_dir"], "runs/a=b")),
    ],
)
def test_override_values_are_parsed_as_yaml(text, expected):
    assert parse_override(text) == expected


def test_load_config_applies_overrides(tmp_path):
    raw = with_keys(minimal_raw(), {"optim.lr": 1e-3, "loss.ratio_clip": 2.0, "data.eval": "/nonexistent/eval.jsonl"})
    assert "rollout" not in raw and "loss" in raw
    path = write_yaml(tmp_path / "config.yaml", raw)
    config = load_config(
        path,
        [
            "optim.lr=0.25",  # nested key present in the file
            "run.max_steps=9",  # number, key absent from the file
            "run.progress=false",  # bool
            "data.eval=null",  # null replaces a value
            "loss.ratio_clip=null",
            "rollout.temperature=0.5",  # a section absent from the file
            "optim.betas=[0.8, 0.95]",
        ],
    )
    assert config.optim.lr == 0.25
    assert config.run.max_steps == 9
    assert config.run.progress is False
    assert config.data.eval is None
    assert config.loss.ratio_clip is None
    assert config.rollout.temperature == 0.5
    assert config.optim.betas == (0.8, 0.95)
    # The later of two overrides of one key wins.
    assert load_config(path, ["run.seed=1", "run.seed=2"]).run.seed == 2


def test_override_of_an_unknown_key_is_rejected_with_a_hint(tmp_path):
    path = write_yaml(tmp_path / "config.yaml", minimal_raw())
    with pytest.raises(
        ConfigError, match=r"rollout\.temprature: unknown key \(did you mean 'rollout\.temperature'\?\)"
    ):
        load_config(path, ["rollout.temprature=0.5"])


def test_ill_typed_override_names_the_key_and_value(tmp_path):
    path = write_yaml(tmp_path / "config.yaml", minimal_raw())
    with pytest.raises(ConfigError) as info:
        load_config(path, ["rollout.samples_per_prompt=many"])
    assert "rollout.samples_per_prompt" in str(info.value) and "'many'" in str(info.value)


@pytest.mark.parametrize("text", ["optim.lr", "=0.1", " =0.1"])
def test_malformed_override_is_a_config_error(tmp_path, text):
    path = write_yaml(tmp_path / "config.yaml", minimal_raw())
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, [text])


def test_override_below_a_scalar_is_a_config_error(tmp_path):
    path = write_yaml(tmp_path / "config.yaml", minimal_raw())
    with pytest.raises(ConfigError, match="'output_dir' is not a section"):
        load_config(path, ["run.output_dir.value=3"])


def test_override_fills_an_optional_section_left_null(tmp_path):
    """A run's config.yaml writes off sections as null (reward: null); --set may still switch one on."""
    path = write_yaml(tmp_path / "config.yaml", {**minimal_raw(), "reward": None})
    assert load_config(path, ["reward.verifier=gsm8k", "reward.coef=0.5"]).reward.coef == 0.5


def test_missing_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_is_reported_with_its_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  output_dir: somewhere\n seed: 1\nstudent:\n  path: x\n")  # line 3 is mis-indented
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "line 3" in message and "not valid YAML" in message


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- run\n- student\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_dump_then_load_round_trips(tmp_path):
    raw = with_keys(
        minimal_raw(str(tmp_path)),
        {
            **DOCUMENTED_KEYS,
            "loss.ratio_clip": 4.0,
            "loss.discount": 0.5,
            "optim.betas": [0.8, 0.95],
            "optim.max_grad_norm": None,
            "optim.schedule": "constant",
            "rollout.top_k": 20,
            "loss.kind": "reverse_kl_pg",  # truncated sampling needs the policy-gradient loss
            "run.precision": "fp32",
            "teacher.temperature": 0.9,
        },
    )
    config = validate(raw)
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    # The dump is plain YAML: it reads back without opd's help.
    assert validate(yaml.safe_load(path.read_text())) == config


def test_full_vocabulary_loss_with_truncated_sampling_is_rejected(tmp_path):
    """forward_kl/reverse_kl/jsd compare whole distributions; top-k/top-p sampling would make them NaN or wrong."""
    raw = with_keys(minimal_raw(str(tmp_path)), {"loss.kind": "jsd", "rollout.top_p": 0.9})
    with pytest.raises(ConfigError, match=r"loss.kind=jsd.*top_p=1.*0.9"):
        validate(raw)


@pytest.mark.parametrize(
    "changes",
    [
        {"loss.kind": "forward_kl"},
        {"rollout.student_fraction": 0.5, "rollout.off_policy_source": "dataset", "loss.off_policy_kind": "forward_kl"},
    ],
)
def test_a_sharded_teacher_with_a_full_vocabulary_loss_is_rejected_with_the_reason(tmp_path, changes):
    raw = with_keys(minimal_raw(str(tmp_path)), {"teacher.shard": True, **changes})
    with pytest.raises(
        ConfigError, match=r"teacher.shard: .*forward_kl.* full distribution .*teacher.shard: false, or use loss"
    ):
        validate(raw)
    validate(with_keys(minimal_raw(str(tmp_path)), {"teacher.shard": True}))  # reverse_kl_pg: fine


def remote_raw(root: str, **teacher) -> dict:
    raw = minimal_raw(root)
    raw["teacher"] = {"url": "http://127.0.0.1:8000", **teacher}
    return raw


@pytest.mark.parametrize(
    "teacher, changes, message",
    [
        ({"path": "/x"}, {}, r"teacher.path or teacher.url: give one .*not both or neither"),
        (
            {"api": "vllm", "temperature": 0.7},
            {},
            r"teacher.temperature=0.7: vllm returns prompt log-probs at temperature 1",
        ),
        ({"api": "sglang", "temperature": 2.0}, {}, r"sglang returns prompt log-probs at temperature 1"),
        (
            {},
            {"loss.kind": "jsd"},
            r"teacher.url: loss.kind=jsd needs the teacher's full distribution at every token, "
            r"which a server sends only as hidden states, .*; with api: opd set teacher.lm_head to the served "
            r"model's files, or use loss.kind reverse_kl_pg or topk_forward_kl",
        ),
        (
            {"api": "vllm"},
            {"loss.kind": "jsd"},
            r"teacher.url: loss.kind=jsd needs .*; serve the teacher with opd serve-teacher and set lm_head, or give "
            r"its path",
        ),
        ({"api": "vllm", "lm_head": "/x"}, {}, r"teacher.lm_head: only a teacher on opd's server .*; vllm does not"),
        ({"lm_head": "/x", "path": "/y", "url": None}, {}, r"teacher.lm_head: .*a teacher in this process has its own"),
        (  # without a top-k, the term needs the whole distribution
            {"top_k": 0},
            {"loss.forward_kl_coef": 0.1},
            r"teacher.url: loss.forward_kl_coef=0.1 needs .*set loss.forward_kl_coef: 0",
        ),
        (  # opd's and vLLM's servers sample; opd asks SGLang for scores only
            {"api": "sglang"},
            {"loss.kind": "sft", "rollout.source": "teacher"},
            r"teacher.api: rollout.source=teacher needs the teacher's own samples, and opd asks an SGLang teacher "
            r"for scores only; it does not write rollouts; serve the teacher with opd serve-teacher or vllm serve",
        ),
        (
            {"top_k": 0},
            {"loss.kind": "topk_forward_kl"},
            r"teacher.top_k: loss.kind=topk_forward_kl needs the teacher's top-k "
            r"log-probs at every token, and teacher.top_k is 0; set teacher.top_k",
        ),
        ({"shard": True}, {}, r"teacher.shard: a teacher on a server"),
    ],
)
def test_a_remote_teacher_is_refused_where_it_cannot_serve(tmp_path, teacher, changes, message):
    with pytest.raises(ConfigError, match=message):
        validate(with_keys(remote_raw(str(tmp_path), **teacher), changes))


def test_a_remote_teacher_validates_where_it_can_serve(tmp_path):
    validate(remote_raw(str(tmp_path), api="vllm"))  # reverse_kl_pg at temperature 1
    validate(remote_raw(str(tmp_path), temperature=0.7))  # opd's own server applies it
    validate(with_keys(remote_raw(str(tmp_path), api="sglang", top_k=20), {"loss.kind": "topk_forward_kl"}))


def test_a_teacher_on_opds_server_with_its_lm_head_gives_the_full_distribution(tmp_path):
    """Hidden states and the head here: every full-vocabulary loss, and the default's forward-KL term on."""
    from opd.config.capabilities import forward_kl_default

    for kind in ("forward_kl", "reverse_kl", "jsd"):
        validate(with_keys(remote_raw(str(tmp_path), lm_head="/x"), {"loss.kind": kind}))
    mixture = {
        "rollout.student_fraction": 0.5,
        "rollout.off_policy_source": "dataset",
        "loss.off_policy_kind": "forward_kl",
    }
    validate(with_keys(remote_raw(str(tmp_path), lm_head="/x"), mixture))
    # The server samples the teacher's rows too (opd.train.served_teacher); without the head, by NLL only.
    samples = {**mixture, "rollout.off_policy_source": "teacher"}
    validate(with_keys(remote_raw(str(tmp_path), lm_head="/x"), samples))
    with pytest.raises(
        ConfigError,
        match=r"off_policy_kind=forward_kl .* full distribution.*or use loss.off_policy_kind: sft",
    ):
        validate(with_keys(remote_raw(str(tmp_path)), samples))
    validate(with_keys(remote_raw(str(tmp_path)), {**samples, "loss.off_policy_kind": "sft"}))
    assert forward_kl_default(validate(remote_raw(str(tmp_path), lm_head="/x"))) == 1.0
    # Without the head: the term from the server's top-k (top_k null resolves to 20), unless top_k is 0.
    assert forward_kl_default(validate(remote_raw(str(tmp_path)))) == 1.0
    assert forward_kl_default(validate(remote_raw(str(tmp_path), top_k=0))) == 0.0


def test_a_gkd_mixture_shards_where_its_rows_allow(tmp_path):
    """A sharded student mixes (tests/distributed runs it); a sharded teacher's rows train by `sft` only
    (what a null off_policy_kind is there), as it gives no whole distribution inside the student's loss."""
    mixture = {"rollout.student_fraction": 0.5}
    assert validate(with_keys(minimal_raw(str(tmp_path)), {**mixture, "student.shard": True})).student.shard
    sharded_teacher = {**mixture, "teacher.shard": True, "loss.forward_kl_coef": 0.0}
    with pytest.raises(ConfigError, match=r"teacher.shard"):
        validate(with_keys(minimal_raw(str(tmp_path)), {**sharded_teacher, "loss.off_policy_kind": "forward_kl"}))
    # loss.off_policy_kind left null is sft there
    assert validate(with_keys(minimal_raw(str(tmp_path)), sharded_teacher)).off_policy_loss == "sft"
    assert validate(with_keys(minimal_raw(str(tmp_path)), mixture)).off_policy_loss == "forward_kl"


def test_a_servers_api_key_is_never_written_out(tmp_path):
    from opd.config.files import dump_config

    config = validate(remote_raw(str(tmp_path), api_key="sesame-secret"))
    assert config.teacher.api_key == "sesame-secret" and "sesame-secret" not in dump_config(config)
    with pytest.raises(ConfigError, match=r"teacher.url: 'localhost:8000' should start with http"):
        validate(remote_raw(str(tmp_path), url="localhost:8000"))
