"""A model's shapes from its config.json alone, for planning memory before any weight loads: the model
is built on the meta device (no weights, no network)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from opd.config.sections import LoraSettings


@dataclass(frozen=True)
class ModelShape:
    parameters: int  # every parameter once (a tied LM head is the embeddings)
    lora_parameters: int | None  # the adapters' parameters, with LoRA
    largest_layer: int
    root: int  # parameters outside the decoder layers (embeddings, final norm, LM head)
    layers: int
    hidden: int
    mlp: int
    query_width: int  # attention heads x head size
    kv_width: int  # key/value heads x head size
    vocab: int


def model_shape(path: str, trust_remote_code: bool = False, lora: LoraSettings | None = None) -> ModelShape | str:
    """The shapes of the model at `path` from its config.json, or why there are none."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = path if (Path(path) / "config.json").is_file() else _cached_config(path)
    if source is None:
        return f"{path} has no local config.json and none in the Hugging Face cache (a dry run fetches nothing)"
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in classes]
    layer_sizes = [sum(parameter.numel() for parameter in layer.parameters()) for layer in layers]
    root = parameters - sum(layer_sizes)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    return ModelShape(
        parameters,
        _lora_parameters(model, lora) if lora else None,
        max(layer_sizes, default=0),
        root,
        len(layers) or config.num_hidden_layers,
        hidden,
        mlp,
        heads * head_dim,
        kv_heads * head_dim,
        model.get_output_embeddings().weight.shape[0],
    )


def _cached_config(repo_id: str) -> str | None:
    """The folder of a hub model's config.json in the local Hugging Face cache, if it is there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id
        return None
    return str(Path(cached).parent) if isinstance(cached, str) else None


def _lora_parameters(model: torch.nn.Module, lora: LoraSettings) -> int:
    """r x (inputs + outputs) for each targeted linear layer (all-linear: every one but the LM head)."""
    head = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        targeted = (
            module is not head
            if lora.target_modules == "all-linear"
            else name.rsplit(".", 1)[-1] in lora.target_modules
        )
        if targeted:
            total += lora.r * (module.in_features + module.out_features)
    return total
