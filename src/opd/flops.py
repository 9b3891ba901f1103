"""FLOP accounting, as Thinking Machines count it for on-policy distillation vs SFT.

Per processed token a forward pass costs about 2N FLOPs and a forward plus backward pass 6N, where N
counts the parameters that take part in matrix products: everything but the input embedding table
(a lookup), with the LM head counted even when it shares the embedding's weights. Attention's
sequence-length term is left out, as usual at these lengths.
"""

from __future__ import annotations

import torch

from opd.rollout import Rollouts


def matmul_parameters(model: torch.nn.Module) -> int:
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(parameter.numel() for parameter in model.parameters())
    tied = head.data_ptr() == embedding.data_ptr()
    return total - embedding.numel() + (head.numel() if tied else 0)


def step_flops(rollouts: Rollouts, sampler_params: int, scorer_params: int, student_params: int) -> dict[str, float]:
    """FLOPs of one step: sampling, teacher scoring and the student update.

    sampler_params: N of whoever sampled (0 for the data set's answers); scorer_params: N_T when a
    teacher scoring pass ran, else 0. Every stage processes each real prompt token once and each
    completion token once (sampling with a KV cache, scoring and the update each run over the whole
    sequence).
    """
    tokens = float(rollouts.prompt_mask.sum() + rollouts.completion_mask.sum())
    return {
        "compute/rollout_flops": 2 * sampler_params * tokens,
        "compute/teacher_flops": 2 * scorer_params * tokens,
        "compute/update_flops": 6 * student_params * tokens,
    }
