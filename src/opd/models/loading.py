"""Loading Hugging Face causal LMs and their tokenizers, with the checks that fail early and clearly:
a path that is no model, a tokenizer without EOS, a forward whose logits opd can't rebuild."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from opd.errors import ConfigError, ModelError, OpdError
from opd.ops.forward import completion_hidden_states, logits_from_hidden

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class LoadedModel:
    """model: the Hugging Face model that every forward runs through (with LoRA, the base model with
    its adapter layers in place); adapter: the peft wrapper that saves and merges them, or None."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: str  # the folder or hub id it was loaded from
    adapter: Any = None

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce; embedding rows past this are padding."""
        return len(self.tokenizer)

    @property
    def hidden_size(self) -> int:
        """H of the final hidden states its LM head reads."""
        return self.model.get_output_embeddings().weight.shape[1]

    @property
    def stop_token_ids(self) -> list[int]:
        """The tokenizer's EOS and every EOS of the generation config (e.g. Llama 3's <|eot_id|>)."""
        return _stop_ids(self.tokenizer, getattr(self.model.generation_config, "eos_token_id", None))


def _stop_ids(tokenizer: PreTrainedTokenizerBase, configured) -> list[int]:
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({tokenizer.eos_token_id, *(i for i in configured if i is not None)})


def stop_token_ids(path: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """A model's stop tokens (as LoadedModel.stop_token_ids) from its generation config, before its weights load."""
    try:
        configured = GenerationConfig.from_pretrained(path).eos_token_id
    except Exception:  # no generation_config.json: what transformers derives from config.json, as at load
        try:
            configured = GenerationConfig.from_model_config(AutoConfig.from_pretrained(path)).eos_token_id
        except Exception:  # no readable config here (a hub id offline): the tokenizer's EOS
            configured = None
    return _stop_ids(tokenizer, configured)


def architectures(path: str, key: str, trust_remote_code: bool = False) -> list[str]:
    """The `architectures` of a model's config.json (e.g. ["Qwen3ForCausalLM"]), before its weights load."""
    try:
        return list(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).architectures or [])
    except Exception as exc:
        raise ModelError(f"{key}: could not read the model config of '{path}': {_first_line(exc)}") from None


def check_model_path(path: str, key: str) -> None:
    """Fail early, with the config key, when a model path is neither a folder nor a hub id."""
    if Path(path).exists():
        if not Path(path).is_dir():
            raise ModelError(f"{key}: '{path}' is a file; expected a model folder or a hub id")
        if not (Path(path) / "config.json").is_file():
            raise ModelError(f"{key}: '{path}' has no config.json; is it a Hugging Face model folder?")
        return
    if path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        raise ModelError(f"{key}: no such model folder '{path}'")


# The files from which transformers builds a tokenizer; a local folder without any holds weights only.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def load_tokenizer(path: str, key: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    check_model_path(path, key)
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"{key}: '{path}' holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the model's "
            "tokenizer files in beside its weights"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types; the user needs one line
        raise ModelError(f"{key}: could not load a tokenizer from '{path}': {_first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{key}: the tokenizer at '{path}' defines no EOS token, so sampling cannot stop")
    return tokenizer


def model_config(path: str, key: str, trust_remote_code: bool = False):
    """A model's transformers config (its config.json), without its weights; one line where it can't be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types; the user needs one line
        raise ModelError(f"{key}: could not read the model's config from '{path}': {_first_line(exc)}") from None


def load_model(
    path: str, key: str, device: torch.device, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load tokenizer and weights: fp32 for a student (master weights; bf16 comes from autocast),
    bf16 for a teacher under bf16, since it has no optimizer and memory is what it costs."""
    hf_logging.disable_progress_bar()  # opd draws its own progress; per-shard bars are noise here
    tokenizer = load_tokenizer(path, key, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"{key}: could not load a causal LM from '{path}': {_first_line(exc)}") from None
    model.to(device)
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, path=path)
    check_logits_from_hidden(loaded, key)
    return loaded


def check_context(model, tokens: int, what: str, whose: str, error: type[OpdError] = ConfigError) -> None:
    """`what`, `tokens` long, within the context window of `whose` model (a model, or its config); else one
    line naming both.
    Checked by setup for the configured lengths and by a viewed teacher for its own (longer) rows."""
    limit = getattr(getattr(model, "config", model), "max_position_embeddings", None)  # a model or its config
    if isinstance(limit, int) and tokens > limit:
        raise error(
            f"{what} is {tokens} tokens, past {whose}'s context of {limit} tokens; "
            "lower data.max_prompt_tokens or rollout.max_new_tokens"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@torch.no_grad()
def check_logits_from_hidden(loaded: LoadedModel, key: str) -> None:
    """opd builds logits from hidden states chunk by chunk; refuse a model whose forward does more."""
    model = loaded.model
    device = next(model.parameters()).device
    ids = torch.tensor([[loaded.tokenizer.eos_token_id] * 3], device=device)
    mask = torch.ones_like(ids)
    reference = model(input_ids=ids, attention_mask=mask).logits[:, :-1, : loaded.vocab_size].float()
    rebuilt = logits_from_hidden(model, completion_hidden_states(model, ids, mask, 2), loaded.vocab_size).float()
    if not torch.allclose(reference, rebuilt, atol=1e-3, rtol=1e-3, equal_nan=True):
        raise ModelError(
            f"{key}: this model's forward post-processes its logits in a way opd does not reproduce "
            f"({type(model).__name__}); please report it"
        )
