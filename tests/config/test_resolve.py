"""The config resolved once (opd.config.resolve): a pure function of the request and setup's facts, no
config changed after validation, and the run folder recording both the request and its resolution."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from opd.config.capabilities import TeacherFacts
from opd.config.files import validate
from opd.config.resolve import RESOLVED_FILE, resolve
from opd.errors import ConfigError
from opd.train.trainer import train

FACTS = [
    None,
    {"teacher": TeacherFacts()},
    {"teacher": TeacherFacts(chunked=True, own_view=True)},
    {"teacher": TeacherFacts(ends_turns_differently=True, own_view=True)},
]


@pytest.mark.parametrize("facts", FACTS)
def test_resolving_twice_gives_equal_objects(tiny_config, facts):
    request = validate(tiny_config)
    once, twice = resolve(request, facts), resolve(request, facts)
    assert once == twice and once is not request
    assert resolve(once, facts) == once  # a resolved config resolves to itself
    assert request.loss.forward_kl_coef is None  # the request is left as asked


@pytest.mark.parametrize(
    "facts, expected",
    [
        (None, 1.0),
        ({"teacher": TeacherFacts(chunked=True)}, 0.0),
        ({"teacher": TeacherFacts(ends_turns_differently=True)}, 0.0),
    ],
)
def test_the_forward_kl_default_follows_the_facts(tiny_config, facts, expected):
    assert resolve(validate(tiny_config), facts).loss.forward_kl_coef == expected


@pytest.mark.parametrize(
    "recorded, expected",
    [
        ({"loss": {"forward_kl_coef": 0.0}}, 0.0),  # a run from before the default keeps running without it
        ({"loss": {"forward_kl_coef": 1.0}}, 1.0),
        ({}, 1.0),
    ],
)
def test_a_resumed_run_keeps_what_it_recorded_where_it_still_applies(tiny_config, recorded, expected):
    request = validate(tiny_config)
    assert resolve(request, None, recorded).loss.forward_kl_coef == expected
    # Where the term can't run any more (here: the teacher now reads another vocabulary), it is off.
    assert resolve(request, {"teacher": TeacherFacts(chunked=True)}, recorded).loss.forward_kl_coef == 0.0


def test_a_need_the_facts_rule_out_names_the_reason_and_the_fix(tiny_config):
    request = validate({**tiny_config, "loss": {"kind": "jsd"}})
    # Only the kind whose need the teacher gives is offered: a top-k is ruled out across tokenizers too.
    with pytest.raises(
        ConfigError,
        match=r"^teacher: loss.kind=jsd needs the teacher's full distribution at every "
        r"token, and its tokenizer differs .*; give a teacher with the student's "
        r"tokenizer, or use loss.kind reverse_kl_pg$",
    ):
        resolve(request, {"teacher": TeacherFacts(chunked=True)})


def sections(model: BaseModel):
    """The model and every config section inside it."""
    yield model
    for name in type(model).model_fields:
        value = getattr(model, name)
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, BaseModel):
                yield from sections(item)


def test_no_config_can_be_changed_after_validation(tiny_config):
    raw = {**tiny_config, "teachers": None}
    config = resolve(validate(raw))
    checked = 0
    for section in sections(config):
        name = next(iter(type(section).model_fields))
        with pytest.raises(ValidationError, match="frozen"):
            setattr(section, name, getattr(section, name))
        checked += 1
    assert checked >= 8  # run, student, teacher, data, rollout (and vllm), loss, batch, optim


def test_a_run_leaves_its_request_as_it_was_and_records_both(tiny_config, tmp_path):
    """No setup step changes the config it was given; config.yaml holds what was asked (the forward-KL
    weight left null, GKD's lambda auto), resolved.yaml what the run computed with (1.0 both here: the
    tiny pair is near, so step 0 kept it on-policy)."""
    request = validate(tiny_config)
    asked = request.model_dump()
    train(request, log=lambda *_: None)
    assert request.model_dump() == asked
    output_dir = tmp_path / "run"
    assert yaml.safe_load((output_dir / "config.yaml").read_text())["loss"]["forward_kl_coef"] is None
    resolved = yaml.safe_load((output_dir / RESOLVED_FILE).read_text())
    assert resolved["loss"]["forward_kl_coef"] == 1.0
    assert yaml.safe_load((output_dir / "config.yaml").read_text())["rollout"]["student_fraction"] == "auto"
    assert resolved["rollout"]["student_fraction"] == 1.0
    settled = resolve(request)
    assert validate(resolved) == settled.model_copy(
        update={"rollout": settled.rollout.model_copy(update={"student_fraction": 1.0})}
    )
