"""Shared fixtures: tiny Qwen3 models and data written to temporary folders; nothing downloaded."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from opd.distributed.threads import shorten_idle_spin

# Under pytest-xdist (2 workers, see the end of this file) each worker's torch, and the commands and
# servers it starts, take one thread: two workers then fill two cores, where two threads each would
# oversubscribe them (the tiny models gain little from a second thread anyway). Before torch loads.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# As `opd` does, before torch loads: this process's idle OpenMP workers don't hold cores spinning that
# other work (another test's subprocess, a busy machine) needs. No result changes.
shorten_idle_spin()

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd.data.prompts import PromptBatch
from opd.data.rows import Example
from opd.demo.task import make_problem
from opd.demo.tokenizer import build_tokenizer
from opd.models.precision import Precision
from opd.ops.batch import StepBatch
from opd.ops.logprobs import process_logits, token_logprobs
from opd.rollout.sampler import ModelSampler, SamplingSettings

CPU = Precision(torch.device("cpu"))

ROOT = Path(__file__).resolve().parent.parent
# The real GSM8K files live beside the project, in ../shared/data/gsm8k (never copied in here).
GSM8K = Path(os.environ.get("OPD_GSM8K_DIR", ROOT.parent / "shared" / "data" / "gsm8k"))


@pytest.fixture
def gsm8k_dir() -> Path:
    if not (GSM8K / "test.jsonl").is_file():
        message = f"GSM8K data not found at {GSM8K} (set OPD_GSM8K_DIR)"
        if os.environ.get("CI"):  # CI lays shared/ beside the clone: missing data there is a failure
            pytest.fail(message)
        pytest.skip(message)
    return GSM8K


# ../shared/models/smollm2.py builds SmolLM2-135M-Instruct from the package registry (no hub); the built
# folder is cached here across sessions (OPD_TEST_CACHE to move it).
SHARED_MODELS = ROOT.parent / "shared" / "models"
TEST_CACHE = Path(os.environ.get("OPD_TEST_CACHE", Path.home() / ".cache" / "opd-tests"))


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, built once (about 30 s and 540 MB) and cached."""
    import importlib.util
    import subprocess

    folder = TEST_CACHE / "SmolLM2-135M-Instruct"
    if not (folder / "model.safetensors").is_file():
        script = SHARED_MODELS / "smollm2.py"
        missing = [] if script.is_file() else [str(script)]
        missing += [] if importlib.util.find_spec("gguf") else ["the gguf package (pip install 'opd[test]')"]
        if missing:
            if os.environ.get("CI"):
                pytest.fail(f"the real model can't be built: {', '.join(missing)} missing")
            pytest.skip(f"the real model can't be built: {', '.join(missing)} missing")
        built = subprocess.run(
            [sys.executable, str(script), str(TEST_CACHE)], capture_output=True, text=True, timeout=900
        )
        assert built.returncode == 0, built.stderr[-2000:]
    return folder


def make_tiny_model(
    folder: Path,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    extra_vocab_rows: int = 0,
    tokenizer=None,
    tied: bool = False,
) -> Path:
    """A randomly initialised Qwen3 and the demo tokenizer (pad == eos), saved as an HF folder."""
    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer) + extra_vocab_rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_problems(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(make_problem(rng)) + "\n" for _ in range(count)))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "student": make_tiny_model(root / "student", hidden=32, layers=1, seed=1),
        "teacher": make_tiny_model(root / "teacher", hidden=48, layers=2, seed=2, extra_vocab_rows=7),
    }


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_problems(root / "train.jsonl", 64, seed=1),
        "eval": write_problems(root / "eval.jsonl", 8, seed=2),
    }


def tiny_raw_config(output_dir: Path, tiny_models: dict, tiny_data: dict) -> dict:
    """A complete raw config for a fast run on the tiny models; tests edit it before validating."""
    return {
        "run": {"output_dir": str(output_dir), "seed": 0, "max_steps": 2, "precision": "fp32", "progress": False},
        "student": {"path": str(tiny_models["student"])},
        "teacher": {"path": str(tiny_models["teacher"])},
        "data": {"train": str(tiny_data["train"]), "eval": str(tiny_data["eval"]), "max_prompt_tokens": 64},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 8},
        "batch": {"prompts_per_step": 2, "micro_batch_size": 4},
        "optim": {"lr": 1e-3},
    }


@pytest.fixture
def tiny_config(tiny_models, tiny_data, tmp_path) -> dict:
    return tiny_raw_config(tmp_path / "run", tiny_models, tiny_data)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """Run `python -m opd ARGS` as a process of its own (env: variables added to ours); returns the
    CompletedProcess. Forked from a warm parent where the environment allows (tests/processes.py)."""
    from processes import run_command

    return run_command([sys.executable, "-m", "opd", *args], {**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def prompt_batch(token_ids: list[list[int]], answers: list[str | None] | None = None) -> PromptBatch:
    """Prompts as a PromptBatch, each its own row (row_index 0..n-1)."""
    answers = answers or [None] * len(token_ids)
    rows = [Example(prompt="", messages=None, answer=answer, line=index + 1) for index, answer in enumerate(answers)]
    return PromptBatch(
        token_ids=token_ids, row_index=list(range(len(token_ids))), rows=rows, keys=list(range(len(token_ids)))
    )


def model_sampler(
    model,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    precision: Precision = CPU,
    **options,
) -> ModelSampler:
    return ModelSampler(model, SamplingSettings(max_new_tokens, temperature, top_k, top_p), precision, **options)


def make_batch(
    prompt_ids,
    prompt_mask,
    completion_ids,
    completion_mask,
    sampler_logprobs=None,
    finished=None,
    prompt_index=None,
    **fields,
) -> StepBatch:
    """A StepBatch from its tensors; row bookkeeping defaults to one prompt per row."""
    rows = completion_ids.shape[0]
    return StepBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        sampler_logprobs=torch.zeros(completion_ids.shape) if sampler_logprobs is None else sampler_logprobs,
        finished=torch.zeros(rows, dtype=torch.bool) if finished is None else finished,
        prompt_index=torch.arange(rows) if prompt_index is None else prompt_index,
        row_index=torch.arange(rows) if prompt_index is None else prompt_index,
        rows=[None] * rows,
        **fields,
    )


def recompute_logprobs(model, rollouts: StepBatch, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Reference: one full fp32 forward over each row alone, no cache, no padding."""
    rows = []
    for row in range(len(rollouts)):
        prompt = rollouts.prompt_ids[row][rollouts.prompt_mask[row].bool()]
        length = int(rollouts.completion_mask[row].sum())
        ids = torch.cat([prompt, rollouts.completion_ids[row, :length]])[None]
        with torch.no_grad():
            logits = model.model(input_ids=ids).logits[0, len(prompt) - 1 : -1, : model.vocab_size]
        processed = process_logits(logits, temperature, top_k, top_p)
        values = torch.zeros(rollouts.completion_ids.shape[1])
        values[:length] = token_logprobs(processed, ids[0, len(prompt) :])
        rows.append(values)
    return torch.stack(rows)


def checkpoint_state(folder: Path) -> dict:
    """A DCP checkpoint's state ({"model": …, "optimizer": …}) as one plain dict, read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    plain = Path(folder).parent / f".{Path(folder).name}.plain.pt"
    dcp_to_torch_save(Path(folder) / "state", plain)
    try:
        return torch.load(plain, weights_only=False)
    finally:
        plain.unlink()


def free_port() -> int:
    """A port free on 127.0.0.1 for a server or a torchrun rendezvous started by a test."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def rollout_server_url(tmp_path_factory):
    """One `opd serve-student` of the demo's student (fp32, one thread) for the whole session: starting
    one takes about half a minute. Every sampler pushes its own weights at its first sync, so no test
    depends on what another left on it."""
    from processes import served_student

    with served_student(tmp_path_factory.mktemp("rollout-server") / "server.log") as server:
        yield server.url


# The suite runs on 2 workers (pytest-xdist: `-n auto --dist loadfile` in pyproject's addopts, `auto`
# capped below). Each worker is its own process with its own module- and session-scoped fixtures, and
# each file runs on one worker, so a file's engine or server starts once, and the real model (one file)
# is never built by two workers into one folder. (xdist's `loadgroup` would group across files, but its
# group suffix is lost on pytest 9's node ids.)
MOST_WORKERS = 2  # the multi-process tests start 2 ranks or a server each: more workers only oversubscribe


def pytest_xdist_auto_num_workers(config) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(MOST_WORKERS, cores)
