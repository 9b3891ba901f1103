"""`opd` through subprocesses, bad inputs included (DESIGN.md §5).

Every bad input must exit non-zero with one `error: ...` line on stderr that names the problem, no
traceback, and nothing in the run directory that looks complete (no final/, no checkpoints/step-N/).
Errors caught before training must not create the run directory at all.

Each subprocess spends most of its time importing torch and transformers, so the scenarios the
selected tests need are prepared up front and run two at a time; each test then checks its own.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from opd.cli import main
from opd.config.files import load_config
from opd.demo.tokenizer import EOS, UNK, build_tokenizer

from conftest import make_tiny_model, run_cli, tiny_raw_config

pytestmark = pytest.mark.e2e  # every test here runs opd in processes of its own


@dataclass
class Scenario:
    args: list[str]
    output_dir: Path
    before: dict[str, bytes | None] | None = None  # the run directory's contents before the command, if any


@dataclass
class Outcome:
    scenario: Scenario
    process: subprocess.CompletedProcess

    @property
    def output_dir(self) -> Path:
        return self.scenario.output_dir


SCENARIOS: dict[str, Callable[[Path, dict, dict], Scenario]] = {}


def scenario(function):
    SCENARIOS[function.__name__] = function
    return function


def uses(*names: str):
    """Mark which scenarios a test reads, so that running one test runs only what it needs."""

    def mark(test):
        test.scenarios = names
        return test

    return mark


def base_config(root: Path, tiny_models: dict, tiny_data: dict) -> dict:
    """conftest's tiny config, with the run directory under `root`."""
    return tiny_raw_config(root / "run", tiny_models, tiny_data)


def train_args(root: Path, config: dict, *overrides: str) -> Scenario:
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["train", str(path)] + (["--set", *overrides] if overrides else [])
    return Scenario(args=args, output_dir=Path(config["run"]["output_dir"]))


def good_rows(tiny_data: dict, count: int) -> list[str]:
    return tiny_data["train"].read_text().splitlines()[:count]


def long_prompt(repeats: int = 12) -> str:
    return "Question : " + "Mia has 12 apples . " * repeats + "How many apples does Mia have ? \n Answer :"


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder with its content (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# --- scenarios ---------------------------------------------------------------------------------------


@scenario
def config_errors(root, tiny_models, tiny_data):
    """Two bad keys in the file and two more via --set: all four must be reported at once."""
    config = base_config(root, tiny_models, tiny_data)
    config["optim"]["lrr"] = 1e-4
    config["rollout"]["samples_per_prompt"] = "many"
    return train_args(root, config, "rollout.temprature=0.5", "batch.prompts_per_step=lots")


@scenario
def missing_student(root, tiny_models, tiny_data):
    config = base_config(root, tiny_models, tiny_data)
    config["student"]["path"] = str(root / "no-such-student")
    return train_args(root, config)


@scenario
def missing_teacher(root, tiny_models, tiny_data):
    config = base_config(root, tiny_models, tiny_data)
    config["teacher"]["path"] = str(root / "no-such-teacher")
    return train_args(root, config)


@scenario
def missing_data(root, tiny_models, tiny_data):
    config = base_config(root, tiny_models, tiny_data)
    config["data"]["train"] = str(root / "absent.jsonl")
    return train_args(root, config)


@scenario
def malformed_jsonl(root, tiny_models, tiny_data):
    path = root / "train.jsonl"
    path.write_text(
        "\n".join(good_rows(tiny_data, 2) + ['{"prompt": "Question : unterminated'] + good_rows(tiny_data, 2)) + "\n"
    )
    config = base_config(root, tiny_models, tiny_data)
    config["data"]["train"] = str(path)
    return train_args(root, config)


@scenario
def row_without_prompt(root, tiny_models, tiny_data):
    path = root / "rows.jsonl"
    rows = good_rows(tiny_data, 3) + [json.dumps({"text": "What is 2 + 2 ?", "answer": "4"})]
    path.write_text("\n".join(rows) + "\n")
    config = base_config(root, tiny_models, tiny_data)
    config["data"]["train"] = str(path)
    return train_args(root, config)


@scenario
def empty_data(root, tiny_models, tiny_data):
    path = root / "empty.jsonl"
    path.write_text("\n  \n")
    config = base_config(root, tiny_models, tiny_data)
    config["data"]["train"] = str(path)
    return train_args(root, config)


@scenario
def all_prompts_too_long(root, tiny_models, tiny_data):
    config = base_config(root, tiny_models, tiny_data)
    config["data"]["max_prompt_tokens"] = 8  # the demo prompts are 27 to 31 tokens
    return train_args(root, config)


@scenario
def existing_run(root, tiny_models, tiny_data):
    config = base_config(root, tiny_models, tiny_data)
    output_dir = Path(config["run"]["output_dir"])
    output_dir.mkdir()
    (output_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (output_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    return train_args(root, config)


def other_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the demo's size and EOS id but entirely different words."""
    words = [EOS, UNK] + [f"piece{i}" for i in range(size - 2)]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS, unk_token=UNK)


@scenario
def different_tokenizer(root, tiny_models, tiny_data):
    tokenizer = other_tokenizer(len(build_tokenizer()))
    teacher = make_tiny_model(root / "foreign-teacher", hidden=32, layers=1, seed=3, tokenizer=tokenizer)
    config = base_config(root, tiny_models, tiny_data)
    config["teacher"]["path"] = str(teacher)
    config["loss"] = {**config.get("loss", {}), "kind": "forward_kl"}
    return train_args(root, config)


@scenario
def padding_rows_and_long_prompts(root, tiny_models, tiny_data):
    """The conftest teacher has 7 extra embedding rows; 3 of the prompts exceed max_prompt_tokens."""
    path = root / "train.jsonl"
    rows = good_rows(tiny_data, 16) + [json.dumps({"prompt": long_prompt()}) for _ in range(3)]
    path.write_text("\n".join(rows) + "\n")
    config = base_config(root, tiny_models, tiny_data)
    config["data"]["train"] = str(path)
    config["data"]["max_prompt_tokens"] = 40
    return train_args(root, config)


@scenario
def nan_teacher(root, tiny_models, tiny_data):
    teacher = root / "nan-teacher"
    shutil.copytree(tiny_models["teacher"], teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(teacher)
    config = base_config(root, tiny_models, tiny_data)
    config["teacher"]["path"] = str(teacher)
    config["run"]["save_every"] = 1
    return train_args(root, config)


@scenario
def diverges_after_checkpoint(root, tiny_models, tiny_data):
    """Step 1 is finite and checkpointed; its absurd update makes the student overflow at step 2."""
    config = base_config(root, tiny_models, tiny_data)
    config["data"]["eval"] = None
    config["run"].update(max_steps=3, save_every=1)
    config["optim"].update(lr=1e30, max_grad_norm=None, schedule="constant")
    return train_args(root, config)


@pytest.fixture(scope="module")
def cli_runs(request, tiny_models, tiny_data, tmp_path_factory) -> dict[str, Outcome]:
    wanted = set()
    for item in request.session.items:
        wanted.update(getattr(getattr(item, "function", None), "scenarios", ()))
    prepared = {name: SCENARIOS[name](tmp_path_factory.mktemp(name), tiny_models, tiny_data) for name in sorted(wanted)}
    for prepared_scenario in prepared.values():
        if prepared_scenario.output_dir.exists():
            prepared_scenario.before = tree(prepared_scenario.output_dir)
    # Two runs at a time on two cores; one torch thread each, as the tiny models gain nothing from more.
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(max_workers=2) as pool:
        patch.setenv("OMP_NUM_THREADS", "1")
        futures = {name: pool.submit(run_cli, *s.args) for name, s in prepared.items()}
        return {name: Outcome(prepared[name], future.result()) for name, future in futures.items()}


# --- checks -------------------------------------------------------------------------------------------


def error_line(outcome: Outcome) -> str:
    """Assert a clean user error and return its one line."""
    process = outcome.process
    report = f"exit {process.returncode}\nstdout:\n{process.stdout}\nstderr:\n{process.stderr}"
    assert process.returncode != 0, report
    assert "Traceback" not in process.stderr, report
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, report
    assert lines[-1] == errors[0], report
    assert "done:" not in process.stdout, report
    return errors[0]


def assert_nothing_complete(output_dir: Path) -> None:
    assert not (output_dir / "final").exists()
    assert not list(output_dir.glob("checkpoints/step-*"))


def assert_error_before_training(outcome: Outcome, *needles: str) -> str:
    line = error_line(outcome)
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert not outcome.output_dir.exists(), f"{outcome.output_dir} was created: {sorted(outcome.output_dir.rglob('*'))}"
    return line


# --- tests ---------------------------------------------------------------------------------------------


def test_help_exits_zero():
    for command in ("train", "demo"):
        process = run_cli(command, "--help", timeout=60)
        assert process.returncode == 0, process.stderr
        assert "usage: opd " + command in process.stdout


@uses("config_errors")
def test_unknown_and_ill_typed_keys_in_the_file(cli_runs):
    outcome = cli_runs["config_errors"]
    config_path = outcome.scenario.args[1]
    assert_error_before_training(
        outcome,
        config_path,
        "optim.lrr: unknown key",
        "did you mean 'optim.lr'",
        "rollout.samples_per_prompt",
        "'many'",
    )


@uses("config_errors")
def test_unknown_and_ill_typed_keys_via_set(cli_runs):
    assert_error_before_training(
        cli_runs["config_errors"],
        "--set rollout.temprature=0.5: rollout.temprature: unknown key",  # the override, not the file, is blamed
        "--set batch.prompts_per_step=lots: batch.prompts_per_step",
        "did you mean 'rollout.temperature'",
        "batch.prompts_per_step",
        "'lots'",
    )


@uses("missing_student")
def test_missing_student_path(cli_runs):
    assert_error_before_training(cli_runs["missing_student"], "student.path", "no-such-student")


@uses("missing_teacher")
def test_missing_teacher_path(cli_runs):
    assert_error_before_training(cli_runs["missing_teacher"], "teacher.path", "no-such-teacher")


@uses("missing_data")
def test_missing_data_file(cli_runs):
    assert_error_before_training(cli_runs["missing_data"], "data.train", "absent.jsonl")


@uses("malformed_jsonl")
def test_malformed_jsonl_names_file_and_line(cli_runs):
    line = assert_error_before_training(cli_runs["malformed_jsonl"], "train.jsonl:3")
    assert "JSON" in line


@uses("row_without_prompt")
def test_row_without_prompt_names_its_line(cli_runs):
    assert_error_before_training(cli_runs["row_without_prompt"], "rows.jsonl:4", "prompt", "messages", "question")


@uses("empty_data")
def test_empty_data_file(cli_runs):
    assert_error_before_training(cli_runs["empty_data"], "data.train", "empty.jsonl")


def test_data_file_that_is_not_utf8_is_a_clean_error(tiny_config, tiny_data, tmp_path, capsys):
    """In-process through opd.cli.main: the error comes before any weights load, so no subprocess is needed."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((good_rows(tiny_data, 1)[0] + "\n" + '{"prompt": "caf\xe9"}\n').encode("latin-1"))
    tiny_config["data"]["train"] = str(path)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config))
    status = main(["train", str(config_path)])
    stderr = capsys.readouterr().err
    assert status != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "latin1.jsonl" in lines[0], stderr
    assert not Path(tiny_config["run"]["output_dir"]).exists()


def one_error_line(argv: list[str], capsys) -> str:
    """`opd ARGV` in process (for errors before any weights load): its one error line."""
    status = main(argv)
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status != 0 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_errors_name_what_is_wrong(tiny_config, tiny_models, tmp_path, capsys):
    """A JSON array for JSONL, a model folder without its tokenizer, a verifier's form: each names itself."""
    import shutil

    config_path = tmp_path / "config.yaml"
    array = tmp_path / "train.json"
    array.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=1))
    config_path.write_text(yaml.safe_dump({**tiny_config, "data": {**tiny_config["data"], "train": str(array)}}))
    line = one_error_line(["train", str(config_path)], capsys)
    assert "train.json:1: malformed JSON" in line and "opd reads JSONL, one JSON object per line" in line

    weights_only = tmp_path / "weights-only"
    shutil.copytree(tiny_models["student"], weights_only)
    for name in weights_only.iterdir():
        if name.name.startswith(("tokenizer", "vocab", "special_tokens")):
            name.unlink()
    config_path.write_text(yaml.safe_dump({**tiny_config, "student": {"path": str(weights_only)}}))
    line = one_error_line(["train", str(config_path)], capsys)
    assert f"student.path: '{weights_only}' holds no tokenizer (none of tokenizer.json" in line

    config_path.write_text(yaml.safe_dump(tiny_config))
    line = one_error_line(["train", str(config_path), "--set", "reward.verifier=gsm8"], capsys)
    assert line == (
        "error: --set reward.verifier=gsm8: reward.verifier: expected a built-in verifier (gsm8k) or a function as "
        "package.module:function (got 'gsm8')"
    )
    assert not Path(tiny_config["run"]["output_dir"]).exists()


@uses("all_prompts_too_long")
def test_all_prompts_too_long_is_an_error(cli_runs):
    assert_error_before_training(cli_runs["all_prompts_too_long"], "data.train", "data.max_prompt_tokens=8")


@uses("existing_run")
def test_existing_run_without_resume_is_refused_and_left_alone(cli_runs):
    outcome = cli_runs["existing_run"]
    line = error_line(outcome)
    assert "run.output_dir" in line and str(outcome.output_dir) in line and "--resume" in line
    assert tree(outcome.output_dir) == outcome.scenario.before


@uses("different_tokenizer")
def test_teacher_with_a_different_tokenizer_and_a_full_vocabulary_loss_is_refused(cli_runs):
    line = assert_error_before_training(cli_runs["different_tokenizer"], "tokenizer differs")
    assert "teacher" in line and "loss.kind=forward_kl" in line and "reverse_kl_pg" in line


@uses("padding_rows_and_long_prompts")
def test_teacher_with_extra_embedding_rows_trains(cli_runs, tiny_models):
    outcome = cli_runs["padding_rows_and_long_prompts"]
    process, output_dir = outcome.process, outcome.output_dir
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr
    teacher_rows = json.loads((tiny_models["teacher"] / "config.json").read_text())["vocab_size"]
    assert teacher_rows == len(build_tokenizer()) + 7  # the premise: the teacher really is padded

    final = output_dir / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert json.loads((final / "config.json").read_text())["vocab_size"] == len(build_tokenizer())
    assert load_config(output_dir / "config.yaml").run.max_steps == 2

    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    assert lines
    steps = [json.loads(line)["step"] for line in lines]
    assert all(isinstance(step, int) for step in steps)
    assert steps == sorted(set(steps)) and 1 in steps and steps[-1] == 2


@uses("padding_rows_and_long_prompts")
def test_some_prompts_too_long_are_skipped_and_counted(cli_runs):
    process = cli_runs["padding_rows_and_long_prompts"].process
    assert process.returncode == 0, process.stderr
    report = process.stdout + process.stderr
    assert re.search(r"skipped 3 prompts\b", report), report
    assert "data.max_prompt_tokens=40" in report


@uses("nan_teacher")
def test_nan_teacher_stops_at_step_one_without_output(cli_runs):
    outcome = cli_runs["nan_teacher"]
    line = error_line(outcome)
    assert "step 1" in line and "not finite" in line
    assert_nothing_complete(outcome.output_dir)


@uses("diverges_after_checkpoint")
def test_divergence_after_a_checkpoint_keeps_it(cli_runs):
    outcome = cli_runs["diverges_after_checkpoint"]
    line = error_line(outcome)
    assert re.search(r"not finite|non-finite", line) and "step 2" in line
    kept = outcome.output_dir / "checkpoints" / "step-1"
    assert (kept / "trainer_state.pt").is_file() and (kept / "state" / ".metadata").is_file()
    assert "step-1" in line  # the error points at the checkpoint to resume from
    assert not (outcome.output_dir / "final").exists()
    assert not [p for p in (outcome.output_dir / "checkpoints").iterdir() if p.name != "step-1"]


def test_every_set_flag_applies_not_only_the_last():
    from opd.cli import _parser

    args = _parser().parse_args(["train", "c.yaml", "--set", "a=1", "b=2", "--set", "c=3", "--set", "d=4"])
    assert args.overrides == ["a=1", "b=2", "c=3", "d=4"]  # argparse's plain nargs="+" kept only d=4
