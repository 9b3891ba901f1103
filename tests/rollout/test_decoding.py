"""The lean decoding step: chosen only where it reproduces the model's own forward."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from opd.rollout.decoding import HFDecoder, LeanDecoder, make_decoder

SHAPE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA_STYLE = {
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=8)),
    "qwen2 (q/k/v biases)": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),
    "llama (rope scaling)": lambda: LlamaForCausalLM(
        LlamaConfig(
            **SHAPE,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    ),
}


def prompts():
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :8] = 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(LLAMA_STYLE))
def test_lean_decoder_matches_the_models_own_forward(name):
    torch.manual_seed(0)
    model = LLAMA_STYLE[name]().eval()
    decoder = make_decoder(model)
    assert isinstance(decoder, LeanDecoder)
    ids, mask = prompts()
    steps = torch.randint(0, 97, (6, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lean = [decoder.start(ids, mask, 2, 5)] + [decoder.step(steps[:, t : t + 1]) for t in range(5)]
        reference = HFDecoder(model)
        hf = [reference.start(ids, mask, 2, 5)] + [reference.step(steps[:, t : t + 1]) for t in range(5)]
    for mine, theirs in zip(lean, hf):
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4)


def test_other_architectures_use_the_models_own_forward():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    assert isinstance(make_decoder(model), HFDecoder)


def test_a_model_whose_forward_does_something_else_fails_the_probe():
    torch.manual_seed(0)
    model = LLAMA_STYLE["qwen3"]().eval()
    model.model.layers[1].mlp.register_forward_hook(lambda module, inputs, output: output * 2)  # HF's path only
    assert isinstance(make_decoder(model), HFDecoder)


@pytest.mark.parametrize("window,lean", [(16, False), (None, True)])
def test_a_sliding_window_the_lean_step_does_not_apply_keeps_the_models_forward(window, lean):
    """Mistral v0.1 attends to the last 4,096 tokens only; a probe of 10 positions can't see that."""
    model = MistralForCausalLM(MistralConfig(**SHAPE, head_dim=8, sliding_window=window)).eval()
    assert isinstance(make_decoder(model), LeanDecoder) is lean


def test_bf16_models_pass_the_probe(tiny_models):
    from opd.models.loading import load_model

    teacher = load_model(str(tiny_models["teacher"]), "teacher", torch.device("cpu"), dtype=torch.bfloat16)
    assert isinstance(make_decoder(teacher.model), LeanDecoder)
