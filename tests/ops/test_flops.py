"""FLOP accounting: parameter counts by hand, and per-step totals from token counts."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd.ops.flops import forward_flops, matmul_parameters, step_flops

from conftest import make_batch


@pytest.mark.parametrize("tied", [True, False])
def test_matmul_parameters_count_everything_but_the_embedding_lookup(tied):
    config = Qwen3Config(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=tied,
    )
    model = Qwen3ForCausalLM(config)
    per_layer = 16 * 16 + 2 * 16 * 8 + 16 * 16 + 3 * 16 * 32 + 2 * 16 + 2 * 8  # q, k+v, o, mlp, 2 norms, q/k norms
    expected = per_layer + 16 + 100 * 16  # final norm + LM head
    assert matmul_parameters(model) == expected


def test_step_flops_follow_2n_2nt_6n_per_token():
    rollouts = make_batch(
        torch.zeros(2, 3, dtype=torch.long),
        torch.tensor([[0, 1, 1], [1, 1, 1]]),
        torch.zeros(2, 4, dtype=torch.long),
        torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),
    )
    tokens = 5 + 6
    assert forward_flops(10, rollouts) == 2 * 10 * tokens
    on_policy = step_flops(rollouts, forward_flops(10, rollouts), forward_flops(100, rollouts), student_params=10)
    assert on_policy == {
        "compute/rollout_flops": 2 * 10 * tokens,
        "compute/teacher_flops": 2 * 100 * tokens,
        "compute/update_flops": 6 * 10 * tokens,
    }


def test_a_local_teachers_scores_carry_the_flops_of_its_forward(tiny_models):
    from opd.teachers.local import load_teacher

    from conftest import CPU

    teacher = load_teacher(str(tiny_models["teacher"]), "teacher", CPU)
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    batch = make_batch(
        torch.tensor([[0, 5, 6], [7, 8, 9]]), prompt_mask, torch.tensor([[3, 4, 0, 0], [5, 6, 7, 8]]), completion_mask
    )
    scores = teacher.score(batch)
    assert scores.flops == forward_flops(matmul_parameters(teacher.model), batch) > 0
    assert scores.flops == 2 * matmul_parameters(teacher.model) * (prompt_mask.sum() + completion_mask.sum())
