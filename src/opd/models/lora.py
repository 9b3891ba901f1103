"""LoRA students through peft: adapters on the student's linear layers; the base weights stay frozen.

Checked before any weight loads: that peft is installed, and that the target modules exist in the
student (its module names come from config.json, the model built on the meta device, no weights).
The adapters are injected into the Hugging Face model itself, so every forward of opd (sampling,
the loss's hidden states, the LM head called as a module) runs through them; the lean decoding step,
which reads weights directly, refuses a model with adapters.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from opd.config.sections import LoraSettings
from opd.errors import ConfigError
from opd.models.loading import LoadedModel


def check_lora(settings: LoraSettings, student_path: str, trust_remote_code: bool = False) -> None:
    """One-line errors, before weights load: peft missing, or target modules the student doesn't have."""
    try:
        importlib.import_module("peft")
    except ImportError:
        raise ConfigError("student.lora: needs the `peft` package: pip install 'opd[lora]'") from None
    if settings.target_modules == "all-linear" or not (Path(student_path) / "config.json").is_file():
        return  # a hub id without a local config.json is checked when peft wraps the model
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(student_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    refuse_tied_targets(skeleton, settings, student_path)
    names = {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules()}
    missing = [target for target in settings.target_modules if target not in names]
    if missing:
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in skeleton.named_modules()
                if isinstance(module, torch.nn.Linear)
            }
        )
        raise ConfigError(
            f"student.lora.target_modules: {missing} not in {student_path} (its linear layers: {', '.join(linear)})"
        )


def refuse_tied_targets(model: torch.nn.Module, settings: LoraSettings, student_path: str) -> None:
    """An adapter on an LM head tied to the input embeddings (or on those embeddings) makes the two
    differ in training, but they are one tensor: merging it (final/, export, the vLLM engine's sync)
    would put the head's delta on the embeddings too, or drop it. So it is refused, naming the key."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if settings.target_modules == "all-linear" or head is None or head.weight is not embeddings.weight:
        return  # peft's all-linear leaves the output layer out
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    pair = [names.get(head), names.get(embeddings)]
    tied = [name for name in pair if name in settings.target_modules]
    if tied:
        raise ConfigError(
            f"student.lora.target_modules: {' and '.join(tied)}: {pair[0]} and {pair[1]} are one "
            f"tensor in {student_path} (tie_word_embeddings), which a merged adapter (final/, export, "
            f"the vLLM engine) can't keep apart; leave {'them' if len(tied) > 1 else 'it'} out"
        )


def add_adapters(student: LoadedModel, settings: LoraSettings) -> LoadedModel:
    """The student with new, trainable LoRA adapters (a checkpoint's are loaded into them after)."""
    from peft import LoraConfig, get_peft_model

    refuse_tied_targets(student.model, settings, student.path)

    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=settings.target_modules, bias="none"
    )
    wrapper = get_peft_model(student.model, config)
    return LoadedModel(model=wrapper.get_base_model(), tokenizer=student.tokenizer, path=student.path, adapter=wrapper)
