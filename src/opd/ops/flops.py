"""FLOP accounting, as Thinking Machines count it for on-policy distillation vs SFT.

Per processed token a forward pass costs about 2N FLOPs and a forward plus backward pass 6N, where N
counts the parameters that take part in matrix products: everything but the input embedding table
(a lookup), with the LM head counted even when it shares the embedding's weights. Attention's
sequence-length term is left out, as usual at these lengths. Every stage processes each real prompt
token once and each completion token once (sampling with a KV cache, scoring and the update each run
over the whole sequence).
"""

from __future__ import annotations

import torch

from opd.ops.batch import StepBatch


def matmul_parameters(model: torch.nn.Module) -> int:
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(parameter.numel() for parameter in model.parameters())
    # Sharded (DTensor) parameters have no storage of their own to compare: identity tells tying there.
    plain = not any(hasattr(weight, "device_mesh") for weight in (head, embedding))
    tied = head is embedding or (plain and head.data_ptr() == embedding.data_ptr())
    return total - embedding.numel() + (head.numel() if tied else 0)


def processed_tokens(batch: StepBatch) -> float:
    """Real prompt tokens plus completion tokens of every row."""
    return float(batch.prompt_mask.sum() + batch.completion_mask.sum())


def forward_flops(parameters: int, batch: StepBatch) -> float:
    return 2 * parameters * processed_tokens(batch)


def step_flops(batch: StepBatch, rollout_flops: float, teacher_flops: float, student_params: int) -> dict[str, float]:
    """FLOPs of one step: sampling and teacher scoring as their components report them, and the
    student's forward and backward (6N per token)."""
    return {
        "compute/rollout_flops": rollout_flops,
        "compute/teacher_flops": teacher_flops,
        "compute/update_flops": 3 * forward_flops(student_params, batch),
    }
