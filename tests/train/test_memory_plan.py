"""The memory plan of `opd train --dry-run`: its counts against the models themselves, and its peak
against the peak measured in real runs on this CPU (one process, and two ranks with the student
sharded), within 25 %.

The runs set MALLOC_MMAP_THRESHOLD_ so that malloc hands freed blocks back at once: resident memory then
follows the live tensors, which is what the plan counts (opd otherwise keeps freed host memory for
speed, see opd.train.host_memory, and resident memory stays at its high-water mark).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from opd.config.files import validate
from opd.config.sections import LoraSettings
from opd.demo.tokenizer import build_tokenizer
from opd.io.sinks import read_metrics
from opd.models.shapes import model_shape
from opd.train.memory import plan_memory

from conftest import run_cli, write_problems
from processes import launch


def make_model(folder: Path, layers: int, tied: bool = False) -> Path:
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memory")
    return {
        "student": make_model(root / "student", 8),
        "teacher": make_model(root / "teacher", 12),
        "data": write_problems(root / "train.jsonl", 32, seed=1),
    }


def raw_config(models, output_dir: Path, micro: int, shard: bool = False) -> dict:
    return {
        "run": {"output_dir": str(output_dir), "max_steps": 3, "precision": "fp32", "device": "cpu", "progress": False},
        "student": {"path": str(models["student"]), "shard": shard},
        "teacher": {"path": str(models["teacher"])},
        "data": {"train": str(models["data"]), "max_prompt_tokens": 32},  # its prompts have up to 31 tokens
        "rollout": {"samples_per_prompt": 4, "max_new_tokens": 48},
        "batch": {"prompts_per_step": 4, "micro_batch_size": micro},
        "optim": {"lr": 1e-4},
    }


def test_the_plan_counts_what_the_models_hold(models, tmp_path):
    for tied in (False, True):
        path = make_model(tmp_path / f"tied-{tied}", 2, tied=tied)
        model = AutoModelForCausalLM.from_pretrained(path)
        shape = model_shape(str(path))
        assert shape.parameters == sum(parameter.numel() for parameter in model.parameters())
        assert shape.layers == 2 and shape.vocab == model.config.vocab_size
    plan = plan_memory(validate(raw_config(models, tmp_path / "run", 16)), 1, "cpu")
    student = sum(
        parameter.numel() for parameter in AutoModelForCausalLM.from_pretrained(models["student"]).parameters()
    )
    assert plan.resident["student weights (fp32)"] == 4 * student
    assert plan.resident["AdamW state (2 x fp32)"] == 8 * student
    sharded = plan_memory(validate(raw_config(models, tmp_path / "run", 16, shard=True)), 2, "cpu")
    assert sharded.resident["student weights (fp32, sharded)"] == 2 * student


def test_batches_scored_ahead_add_their_hidden_states_and_scoring_beside_the_update(models, tmp_path):
    """rollout.max_staleness N: up to N + 1 batches keep the teacher's hidden states (the default's forward-KL
    term reads them), and the scoring thread's memory adds to the update's instead of coming after it."""
    raw = raw_config(models, tmp_path / "run", 16)
    serial = plan_memory(validate(raw), 1, "cpu")
    raw["rollout"]["max_staleness"] = 2
    ahead = plan_memory(validate(raw), 1, "cpu")
    hidden = serial.phases["updating"]["teacher hidden states kept for the loss (1 batch)"]
    assert ahead.phases["updating"]["teacher hidden states kept for the loss (3 batches)"] == 3 * hidden
    assert "scoring" in serial.phases and "scoring" not in ahead.phases
    scoring = sum(serial.phases["scoring"].values())
    assert sum(ahead.phases["updating"].values()) == sum(serial.phases["updating"].values()) + 2 * hidden + scoring
    assert ahead.peak > serial.peak


def test_a_served_teacher_with_its_head_here_counts_the_head_and_its_hidden_states(models, tmp_path):
    """teacher.lm_head: the head alone is resident (never the teacher's body), and the loss keeps the
    served hidden states as it does a local teacher's."""
    local = plan_memory(validate(raw_config(models, tmp_path / "run", 16)), 1, "cpu")
    raw = raw_config(models, tmp_path / "run", 16)
    raw["teacher"] = {"url": "http://127.0.0.1:9", "lm_head": str(models["teacher"])}
    plan = plan_memory(validate(raw), 1, "cpu")
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"])
    head = teacher.get_output_embeddings().weight.numel()
    assert plan.resident["teacher LM head (fp32; its body is on a server)"] == 4 * head
    assert not any(name.startswith("teacher weights") for name in plan.resident)
    kept = "teacher hidden states kept for the loss (1 batch)"
    assert plan.phases["updating"][kept] == local.phases["updating"][kept] > 0
    assert (
        plan.phases["scoring"]["teacher logit chunks (its head here)"]
        == local.phases["scoring"]["teacher logit chunks"]
    )


def test_a_teacher_that_may_write_rollouts_plans_its_kv_cache(models, tmp_path):
    """The teacher samples where the run may have it write rows (rollout.source teacher, a mixture with its
    samples, or lambda auto, which may start far): the KV cache and logits of the rank's whole share of a
    step, for the teacher's shape. On-policy (lambda 1) and data answers plan none."""
    teacher = model_shape(str(models["teacher"]))
    rows, sequence = 4 * 4, 32 + 48
    kv_cache = 2 * rows * sequence * teacher.layers * teacher.kv_width * 4  # fp32 on a CPU
    raw = raw_config(models, tmp_path / "run", 16)
    for rollout, loss, writes in (
        ({}, {}, True),  # the default: lambda auto
        ({"student_fraction": 0.5}, {}, True),
        ({"source": "teacher"}, {"kind": "sft"}, True),  # sequence-level KD (opd sft)
        ({"student_fraction": 1.0}, {}, False),
        ({"student_fraction": 0.5, "off_policy_source": "dataset"}, {"off_policy_kind": "sft"}, False),
    ):
        plan = plan_memory(validate({**raw, "rollout": {**raw["rollout"], **rollout}, "loss": loss}), 1, "cpu")
        phase = plan.phases.get("the teacher writing rollouts")
        assert (phase is not None) == writes, rollout
        if writes:
            assert phase[f"KV cache of {rows} rollouts x {sequence} tokens"] == kv_cache
            assert phase["logits of one decoding step"] == 3 * rows * teacher.vocab * 4
            assert any(note.startswith("the teacher writes rollouts") for note in plan.notes)
    sglang = {**raw, "teacher": {"url": "http://127.0.0.1:9", "api": "sglang", "tokenizer": str(models["teacher"])}}
    assert "the teacher writing rollouts" not in plan_memory(validate(sglang), 1, "cpu").phases  # it scores only
    # A sharded teacher samples gathered whole (its rows by NLL, as it gives no distribution in the loss).
    sharded = {**raw, "teacher": {**raw["teacher"], "shard": True}, "loss": {"off_policy_kind": "sft"}}
    phase = plan_memory(validate(sharded), 2, "cpu").phases["the teacher writing rollouts"]
    assert phase["teacher gathered for sampling"] == 4 * teacher.parameters


def test_lora_counts_the_adapters_that_peft_adds(models):
    peft = pytest.importorskip("peft")
    for targets in (["q_proj", "v_proj", "lm_head"], "all-linear"):
        settings = LoraSettings(r=4, alpha=8, target_modules=targets)
        model = AutoModelForCausalLM.from_pretrained(models["student"])
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        trainable = sum(parameter.numel() for parameter in wrapped.parameters() if parameter.requires_grad)
        assert model_shape(str(models["student"]), lora=settings).lora_parameters == trainable


@pytest.mark.e2e
def test_a_hub_id_without_a_local_config_is_named(models, tmp_path):
    raw = raw_config(models, tmp_path / "run", 16)
    raw["teacher"]["path"] = "someone/not-downloaded"
    result = run_cli(
        "train",
        "--dry-run",
        str(write_yaml(raw, tmp_path)),
        "--nproc-per-node",
        "2",
        env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")},
    )
    assert result.returncode == 0, result.stderr
    assert (
        "teacher.path: someone/not-downloaded has no local config.json and none in the Hugging Face cache"
        in result.stdout
    )
    assert "student weights (fp32)" in result.stdout  # the student is still planned


def write_yaml(raw: dict, folder: Path, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(raw))
    return path


def planned_peak(config_path: Path, ranks: int) -> float:
    fresh = config_path.parent / "planned"  # a dry run, like training, refuses a directory that holds a run
    result = run_cli(
        "train", "--dry-run", str(config_path), "--nproc-per-node", str(ranks), "--set", f"run.output_dir={fresh}"
    )
    assert result.returncode == 0, result.stderr
    return float(re.search(r"peak \(resident \+ the largest phase\):\s+([\d.]+) GiB", result.stdout).group(1))


@pytest.mark.e2e
@pytest.mark.parametrize("ranks, micro, shard", [(1, 16, False), (2, 8, True)])
def test_the_planned_peak_is_within_a_quarter_of_the_measured_one(models, tmp_path, ranks, micro, shard):
    raw = raw_config(models, tmp_path / "run", micro, shard)
    run = launch(raw, tmp_path, "config", ranks, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert run.returncode == 0, run.stderr[-2000:]
    measured = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["memory/peak_gib"]
    planned = planned_peak(tmp_path / "config.yaml", ranks)
    assert abs(planned - measured) <= 0.25 * measured, (planned, measured)


def test_a_child_of_a_large_process_measures_its_own_peak():
    """Linux carries ru_maxrss over from the parent through fork and exec; the measured peak must not."""
    held = torch.ones(2**28)  # 1 GiB, touched, in this (the parent) process
    child = (
        "import torch; from opd.train.memory import PeakMemory; peak = PeakMemory(torch.device('cpu')); "
        "peak.start(); x = torch.ones(2**25); print(peak.bytes() / 2**30)"
    )  # 0.125 GiB
    measured = float(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
    assert 0.1 < measured < 0.3, measured
    del held


def test_under_the_vllm_engine_the_plan_counts_its_reservation_not_opds_sampler(models, tmp_path, monkeypatch):
    """vLLM holds its own weights and KV cache in a fixed share of the device's memory: no KV cache or
    bf16 sampling copy of opd's own; with sleep mode on a GPU, the share is held only while sampling."""
    import opd.train.memory as memory

    raw = raw_config(models, tmp_path / "run", 16)
    raw["run"]["precision"] = "auto"  # bf16 on a GPU: opd's sampler would keep a bf16 copy
    own = plan_memory(validate(raw), 1, "cuda")
    assert any(name.startswith("KV cache") for name in own.phases["sampling"])
    assert "student bf16 copy for sampling" in own.resident
    monkeypatch.setattr(memory, "device_memory", lambda device: 80 * 2**30)
    raw["rollout"].update(engine="vllm", vllm={"gpu_memory_utilization": 0.25})
    engine = plan_memory(validate(raw), 1, "cuda")
    assert "sampling" not in engine.phases and "student bf16 copy for sampling" not in engine.resident
    assert engine.resident["vLLM engine (0.25 of 80.0 GiB: weights, KV cache)"] == 20 * 2**30
    raw["rollout"]["vllm"]["sleep_between_rollouts"] = True
    asleep = plan_memory(validate(raw), 1, "cuda")
    assert asleep.phases["sampling"] == {"vLLM engine (0.25 of 80.0 GiB: weights, KV cache)": 20 * 2**30}
    assert asleep.peak < engine.peak  # the engine's share and the update's memory are not held together
    monkeypatch.setattr(memory, "device_memory", lambda device: None)
    unknown = plan_memory(validate(raw), 1, "cuda")
    assert any("device memory is unknown" in note for note in unknown.notes)
