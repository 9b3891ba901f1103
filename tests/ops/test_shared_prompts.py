"""Prompts encoded once for all their samples: the same hidden states and gradients as the plain forward."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from opd.ops.batch import StepBatch
from opd.ops.forward import completion_hidden_states, completion_hidden_states_of, shares_prompts

from conftest import make_batch

SHAPE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
MODELS = {
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=8)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}


def hidden_states_of(model, batch: StepBatch) -> torch.Tensor:
    return completion_hidden_states_of(
        model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, batch.prompt_index
    )


def grouped_rollouts() -> StepBatch:
    """Three prompts of different lengths with 3, 1 and 2 samples; some completions stop early."""
    generator = torch.Generator().manual_seed(0)
    unique = torch.randint(0, 97, (3, 7), generator=generator)
    unique_mask = torch.ones_like(unique)
    unique_mask[1, :3] = 0
    unique_mask[2, :5] = 0
    index = torch.tensor([0, 0, 0, 1, 2, 2])
    completion = torch.randint(0, 97, (6, 5), generator=generator)
    completion_mask = torch.ones_like(completion)
    completion_mask[1, 2:] = 0
    completion_mask[5, 4:] = 0
    return make_batch(unique[index], unique_mask[index], completion, completion_mask, prompt_index=index)


def values_and_gradients(model, hidden, mask):
    """The hidden states inside the mask and the gradients of a fixed random projection of them."""
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    (hidden * weights)[mask.bool()].sum().backward()
    return hidden.detach()[mask.bool()], [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("rows", [slice(0, 6), slice(1, 5)])  # a micro-batch may split a prompt's samples
def test_shared_prompts_give_the_plain_forwards_values_and_gradients(name, rows):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    rollouts = grouped_rollouts().select(rows)
    shared = values_and_gradients(model, hidden_states_of(model, rollouts), rollouts.completion_mask)
    plain_hidden = completion_hidden_states(
        model, rollouts.input_ids, rollouts.attention_mask, rollouts.completion_ids.shape[1]
    )
    plain = values_and_gradients(model, plain_hidden, rollouts.completion_mask)
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-4)
    assert len(shared[1]) == len(plain[1]) > 0
    for mine, reference in zip(shared[1], plain[1]):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-4)
    assert shares_prompts(model)  # so the comparison above covered the shared forward


def test_a_model_the_shared_forward_would_change_keeps_the_plain_one():
    """A final norm that scales by the batch size sees 2 prompts in one forward and 4 rows in the other:
    the probe must notice the difference and fall back."""
    torch.manual_seed(0)
    model = MODELS["qwen3"]().eval()
    model.model.norm.register_forward_hook(lambda module, inputs, output: output * output.shape[0])
    assert not shares_prompts(model)
    rollouts = grouped_rollouts()
    with torch.no_grad():
        mine = hidden_states_of(model, rollouts)
        plain = completion_hidden_states(
            model, rollouts.input_ids, rollouts.attention_mask, rollouts.completion_ids.shape[1]
        )
    torch.testing.assert_close(mine, plain)
