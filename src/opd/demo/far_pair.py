"""The demo's far-apart pair ("prune, then distill"): the demo teacher as the teacher, and as the
student the same model with most decoder layers dropped. It starts about 12 nats/token of reverse KL
from its teacher (the demo's own student: 0.6), far enough to collapse under a sampled-token reward
alone. benchmarks/far_apart.py measures the objectives on it; a test holds the defaults to it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.demo.run import ASSETS


def pruned_teacher(out: Path, keep: list[int]) -> Path:
    """The demo teacher with only the decoder layers in `keep`, saved to `out` with its tokenizer."""
    return pruned_model(ASSETS / "teacher", out, keep)


def pruned_model(source: Path, out: Path, keep: list[int]) -> Path:
    """The model at `source` (a Llama- or Qwen-like decoder) with only the decoder layers in `keep`, saved
    to `out` with its tokenizer: a far-apart student of it ("prune, then distill")."""
    model = AutoModelForCausalLM.from_pretrained(source)
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index  # the KV cache is indexed by position in the new stack
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out
