"""TensorBoard and W&B logging, with stand-in packages: same rows as metrics.jsonl, resume, missing package."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml

from opd.config.files import validate
from opd.config.resolve import resolve
from opd.errors import ConfigError
from opd.io.sinks import read_metrics
from opd.train.setup import prepare
from opd.train.trainer import train

from conftest import run_cli


class FakeSummaryWriter:
    instances: list["FakeSummaryWriter"] = []

    def __init__(self, log_dir: str, purge_step: int | None = None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, key: str, value: float, step: int) -> None:
        self.scalars.append((step, key, value))

    def close(self) -> None:
        self.closed = True


class FakeWandbConfig(dict):
    def update(self, values: dict, allow_val_change: bool = False) -> None:
        assert allow_val_change  # W&B refuses to change a key's value without it
        super().update(values)


class FakeWandbRun:
    def __init__(self, id: str | None, **kwargs):
        self.init_kwargs, self.rows, self.finished = {"id": id, **kwargs}, [], False
        self.id = id or "fresh-id"
        self.config = FakeWandbConfig(kwargs.get("config") or {})

    def log(self, metrics: dict, step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_trackers(monkeypatch):
    FakeSummaryWriter.instances = []
    runs: list[FakeWandbRun] = []
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = FakeSummaryWriter
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: runs.append(FakeWandbRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    return FakeSummaryWriter.instances, runs


def reported(tiny_config, **run) -> dict:
    return {
        **tiny_config,
        "run": {**tiny_config["run"], "report_to": ["tensorboard", "wandb"], **run},
        "optim": {**tiny_config["optim"], "schedule": "constant"},
    }  # so resuming may add steps


def test_both_trackers_get_every_metrics_row_and_are_closed(tiny_config, fake_trackers):
    writers, runs = fake_trackers
    result = train(validate(reported(tiny_config, max_steps=3)), log=lambda *_: None)
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    expected = [(row["step"], {key: value for key, value in row.items() if key != "step"}) for row in rows]
    assert len(expected) == 4  # step 0's evaluation and three steps
    (writer,), (run,) = writers, runs
    assert run.rows == expected
    assert sorted(writer.scalars) == sorted((step, key, value) for step, row in expected for key, value in row.items())
    assert writer.log_dir == str(result.output_dir / "tensorboard") and writer.purge_step is None
    assert writer.closed and run.finished
    assert run.init_kwargs["id"] is None and run.init_kwargs["resume"] == "allow"
    assert (result.output_dir / "wandb_run_id").read_text() == "fresh-id\n"
    assert run.init_kwargs["project"] == "opd" and run.init_kwargs["name"] == result.output_dir.name
    expected = resolve(validate(reported(tiny_config, max_steps=3)))  # the default as setup settles it
    assert run.init_kwargs["config"] == expected.model_dump(mode="json")
    # Then as step 0 settled lambda auto (on-policy here): what resolved.yaml records.
    assert run.config == yaml.safe_load((result.output_dir / "resolved.yaml").read_text())
    assert run.config["rollout"]["student_fraction"] == 1.0


def test_resume_continues_the_same_wandb_run_and_purges_tensorboard_past_the_checkpoint(tiny_config, fake_trackers):
    writers, runs = fake_trackers
    first = reported(tiny_config, max_steps=2, save_every=2)
    train(validate(first), log=lambda *_: None)
    train(validate(reported(tiny_config, max_steps=4, save_every=2)), resume=True, log=lambda *_: None)
    assert runs[0].init_kwargs["id"] is None and runs[1].init_kwargs["id"] == "fresh-id"
    assert writers[1].purge_step == 3  # events of steps after the step-2 checkpoint would be redone
    assert [step for step, _ in runs[1].rows] == [3, 4]


def test_a_missing_tracker_package_fails_before_any_weight_loads(tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    monkeypatch.setattr(
        "opd.train.setup.load_model", lambda *a, **k: pytest.fail("weights loaded before the tracker check")
    )
    with pytest.raises(ConfigError, match=r"run.report_to: 'wandb' needs its package .*pip install 'opd\[wandb\]'"):
        prepare(validate({**tiny_config, "run": {**tiny_config["run"], "report_to": ["wandb"]}}), resume=False)
    assert not Path(tiny_config["run"]["output_dir"]).exists()


@pytest.mark.e2e
def test_cli_names_the_missing_tracker_in_one_line(tiny_config, tmp_path):
    blocker = tmp_path / "site" / "wandb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = run_cli("train", str(config), "--set", "run.report_to=[wandb]", env={"PYTHONPATH": str(blocker.parent)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: run.report_to: 'wandb' needs its package (No module named wandb); install it with pip install "
        "'opd[wandb]'"
    ]


def test_unknown_tracker_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="run.report_to.0"):
        validate({**tiny_config, "run": {**tiny_config["run"], "report_to": ["mlflow"]}})


def test_a_tracker_that_fails_to_start_is_one_error_and_closes_the_others(tiny_config, fake_trackers, monkeypatch):
    writers, _ = fake_trackers

    def refuse(**_):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setattr(sys.modules["wandb"], "init", refuse)
    with pytest.raises(ConfigError, match="run.report_to: wandb failed to start: RuntimeError: api_key not configured"):
        train(validate(reported(tiny_config)), log=lambda *_: None)
    assert writers[0].closed
