"""`opd train --dry-run` says "config OK" only where training starts: every error that training raises
before its first weight loads, the dry run raises too, with the same message (both run
opd.train.setup.read_inputs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from opd.cli import main
from opd.config.files import validate
from opd.errors import OpdError
from opd.train.setup import prepare


class WeightsLoaded(Exception):
    """Raised where a run would load its first weights: every error of these cases must come before."""


def stop_at_weights(*_args, **_kwargs):
    raise WeightsLoaded


def bad_configs(raw: dict, root: Path, tiny_models: dict) -> dict[str, tuple[dict, str | bool]]:
    """name -> (raw config, resume) of a run that training refuses before its weights load."""
    weights_only = root / "weights-only"
    shutil.copytree(tiny_models["student"], weights_only)
    for path in weights_only.glob("*"):
        if path.name.startswith(("tokenizer", "vocab", "special_tokens")):
            path.unlink()
    short_teacher = root / "short-teacher"
    shutil.copytree(tiny_models["teacher"], short_teacher)
    model_config = json.loads((short_teacher / "config.json").read_text())
    (short_teacher / "config.json").write_text(json.dumps({**model_config, "max_position_embeddings": 64}))
    array = root / "array.json"
    array.write_text(json.dumps([{"prompt": "a"}], indent=1))
    no_prompt = root / "no-prompt.jsonl"
    no_prompt.write_text('{"answer": "#### 3"}\n')
    unanswered = root / "unanswered.jsonl"
    unanswered.write_text('{"prompt": "Question : Mia has 3 apples . How many ? \\n Answer :"}\n')
    used = root / "used"
    (used / "checkpoints").mkdir(parents=True)

    def edit(section: str, **values) -> dict:
        return {**raw, section: {**(raw.get(section) or {}), **values}}

    return {
        "prompt and completion past the student's context": (edit("data", max_prompt_tokens=250), False),
        "max_new_tokens past the context": (edit("rollout", max_new_tokens=4096), False),
        "a teacher with a shorter context": (edit("teacher", path=str(short_teacher)), False),
        "a student folder without a tokenizer": (edit("student", path=str(weights_only)), False),
        "every prompt too long": (edit("data", max_prompt_tokens=8), False),
        "a JSON array for JSONL": (edit("data", train=str(array)), False),
        "a row without a prompt": (edit("data", train=str(no_prompt)), False),
        "rows without answers for the data's rollouts": (
            {
                **edit("rollout", source="dataset"),
                "loss": {"kind": "sft"},
                "data": {**raw["data"], "train": str(unanswered)},
            },
            False,
        ),
        "a verifier that does not import": ({**raw, "reward": {"verifier": "no_such_module:grade"}}, False),
        "a directory that holds a run": (edit("run", output_dir=str(used)), False),
        "--resume with nothing to resume": (raw, True),
    }


def test_the_dry_run_raises_every_error_that_training_raises_before_its_weights_load(
    tiny_config, tiny_models, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("opd.train.setup.load_model", stop_at_weights)
    monkeypatch.setattr("opd.teachers.build.load_teacher", stop_at_weights)
    tiny_config["data"]["eval"] = None  # a row without an answer is refused for the training rows too
    cases = bad_configs(tiny_config, tmp_path, tiny_models)
    for name, (raw, resume) in cases.items():
        with pytest.raises(OpdError) as refused:  # not WeightsLoaded: before any weights
            prepare(validate(raw), resume=resume, log=lambda *_: None)
        message = str(refused.value)
        path = tmp_path / f"{len(name)}.yaml"
        path.write_text(yaml.safe_dump(raw))
        status = main(["train", str(path), "--dry-run", *(["--resume"] if resume else [])])
        stderr = capsys.readouterr().err
        assert status == 2 and stderr.strip() == f"error: {message}", (name, message, stderr)
    assert not Path(tiny_config["run"]["output_dir"]).exists()


def test_the_dry_run_of_a_good_config_reads_what_training_reads(tiny_config, tmp_path, capsys):
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "config OK: 2 steps of 2 prompts x 2 samples" in out and "data.train: 64 prompts; data.eval: 8 prompts" in out
    )
    assert not Path(tiny_config["run"]["output_dir"]).exists()
