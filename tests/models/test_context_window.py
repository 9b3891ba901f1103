"""One context-window check for every model: the configured lengths against the student's and each local
teacher's window at setup, and a viewed teacher's own (longer) rows at scoring; one line naming both."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from opd.config.files import validate
from opd.errors import ConfigError, ModelError
from opd.models.loading import check_context
from opd.train.setup import prepare


class WithWindow(torch.nn.Module):
    def __init__(self, window):
        super().__init__()
        self.config = type("Config", (), {"max_position_embeddings": window})()


def test_the_check_names_the_length_the_window_and_the_model():
    check_context(WithWindow(256), 256, "a row", "student.path")  # exactly the window fits
    with pytest.raises(
        ConfigError,
        match=r"^a row is 257 tokens, past student.path's context of 256 tokens; lower "
        r"data.max_prompt_tokens or rollout.max_new_tokens$",
    ):
        check_context(WithWindow(256), 257, "a row", "student.path")
    with pytest.raises(ModelError):
        check_context(WithWindow(8), 9, "a row", "teacher t", ModelError)
    check_context(WithWindow(None), 10**9, "a row", "a model without a window")  # nothing to check against


def test_setup_checks_the_student_and_the_teacher(tiny_config, tmp_path):
    too_long = {**tiny_config, "data": {**tiny_config["data"], "max_prompt_tokens": 250}}
    with pytest.raises(ConfigError, match="rollout.max_new_tokens is 258 tokens, past student.path's context of 256"):
        prepare(validate(too_long), resume=False, log=lambda *_: None)
    short_teacher = tmp_path / "short-teacher"
    shutil.copytree(tiny_config["teacher"]["path"], short_teacher)
    config = json.loads((short_teacher / "config.json").read_text())
    (short_teacher / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    raw = {**tiny_config, "teacher": {"path": str(short_teacher)}}
    with pytest.raises(ConfigError, match="is 72 tokens, past teacher.path's context of 64 tokens"):
        prepare(validate(raw), resume=False, log=lambda *_: None)
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written that looks like a run
