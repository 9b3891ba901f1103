"""A real pretrained model through opd: SmolLM2-135M-Instruct (a Llama, a 49,152-token BPE tokenizer,
ChatML with <|im_end|> ending a turn), built from the package registry by ../shared/models/smollm2.py
and cached across sessions (tests/conftest.py's `real_model`). Loading, its chat template and stop
token, a few training steps of a far pair cut from it, and vLLM's engine on its architecture."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opd.data.prompts import load_prompts
from opd.demo.far_pair import pruned_model
from opd.io.sinks import read_metrics
from opd.models.loading import load_model
from opd.rollout.sampler import ModelSampler, SamplingSettings

from conftest import CPU, run_cli
from processes import needs_vllm
from weights import final_weights

pytestmark = [pytest.mark.real_model, pytest.mark.e2e]  # minutes on 2 cores: out of the quick subset


def test_it_loads_renders_its_chat_template_and_stops_on_im_end(real_model, tmp_path):
    loaded = load_model(str(real_model), "student.path", CPU.device)
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in loaded.stop_token_ids
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "What is the capital of France? Answer in one word."}) + "\n")
    prompts = load_prompts(str(rows), "data.train", loaded.tokenizer, 128)
    text = loaded.tokenizer.decode(prompts.batch([0]).token_ids[0])
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    batch = ModelSampler(loaded, SamplingSettings(24, temperature=0.7), CPU).sample(prompts.batch([0]), 4, seed=0)
    lengths = batch.completion_mask.sum(1).tolist()
    stopped = [row for row, length in enumerate(lengths) if batch.completion_ids[row, length - 1] == im_end]
    assert stopped, batch.completion_texts(loaded.tokenizer)  # a one-word answer ends its turn within 24 tokens
    for row in stopped:  # nothing sampled past the turn's end
        assert int((batch.completion_ids[row, : lengths[row]] == im_end).sum()) == 1
    assert "paris" in " ".join(batch.completion_texts(loaded.tokenizer)).lower()


def far_pair_config(real_model, tmp_path, gsm8k_dir, **rollout) -> dict:
    student = pruned_model(real_model, tmp_path / "student", list(range(0, 30, 2)))  # every other layer
    rows = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()[:16]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": row["question"]}) + "\n" for row in rows))
    return {
        "run": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "precision": "fp32", "progress": False},
        "student": {"path": str(student)},
        "teacher": {"path": str(real_model)},
        "data": {"train": str(data), "max_prompt_tokens": 256},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 16, **rollout},
        "batch": {"prompts_per_step": 2, "micro_batch_size": 4},
        "optim": {"lr": 1e-5},
    }


@pytest.mark.vllm
def test_a_far_pair_cut_from_it_trains_under_the_defaults_with_vllms_engine(real_model, tmp_path, gsm8k_dir):
    """The student (every other layer) sampled by vLLM's engine on its Llama architecture, the teacher in
    this process, the defaults, 2 steps through `opd train`: step 0 measures the student far, so step 1
    trains on the teacher's samples and step 2 on half the teacher's, half the engine's."""
    needs_vllm()
    raw = far_pair_config(real_model, tmp_path, gsm8k_dir, engine="vllm", vllm={"gpu_memory_utilization": 0.1})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    # In a process of its own: vLLM's CPU budget counts the process's resident memory, which the test
    # session's earlier models would take.
    result = run_cli("train", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starts far from the teacher" in result.stdout + result.stderr
    resolved = yaml.safe_load((tmp_path / "run" / "resolved.yaml").read_text())
    assert resolved["rollout"]["student_fraction"] == 0.5 and resolved["loss"]["forward_kl_coef"] == 0.0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert [row["from_teacher/rows_fraction"] for row in rows] == [1.0, 0.5]
    row = rows[1]  # the engine's rows
    assert 0 < row["entropy/student"] < 11 and 0 < row["distill/reverse_kl"] < 20, row  # ln 49152 = 10.8
    assert row["ratio/max_abs_log"] < 1e-2, row  # fp32 both sides: the synced engine samples the update's policy
    start, end = load_file(tmp_path / "student" / "model.safetensors"), final_weights(tmp_path / "run")
    assert all(torch.isfinite(tensor).all() for tensor in end.values())
    assert max(float((end[name] - start[name]).abs().max()) for name in end) > 0  # it learned
