"""Loading Hugging Face causal LMs and the forward passes opd needs from them.

Forwards return hidden states of only the positions that predict completion tokens; logits are made
from them chunk by chunk (`logits_from_hidden`), so [B x T x V] logits of two models never coexist.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from opd.errors import ModelError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce; embedding rows past this are padding."""
        return len(self.tokenizer)


def check_source(path: str, key: str) -> None:
    """Fail early, with the config key, when a model path is neither a folder nor a hub id."""
    if Path(path).exists():
        if not Path(path).is_dir():
            raise ModelError(f"{key}: '{path}' is a file; expected a model folder or a hub id")
        if not (Path(path) / "config.json").is_file():
            raise ModelError(f"{key}: '{path}' has no config.json; is it a Hugging Face model folder?")
        return
    if path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        raise ModelError(f"{key}: no such model folder '{path}'")


def load_tokenizer(path: str, key: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    check_source(path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types; the user needs one line
        raise ModelError(f"{key}: could not load a tokenizer from '{path}': {_first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{key}: the tokenizer at '{path}' defines no EOS token, so sampling cannot stop")
    return tokenizer


def load_model(path: str, key: str, device: torch.device, trust_remote_code: bool = False) -> LoadedModel:
    """Load tokenizer and fp32 weights (master weights; bf16 comes from autocast)."""
    hf_logging.disable_progress_bar()  # opd draws its own progress; per-shard bars are noise here
    tokenizer = load_tokenizer(path, key, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"{key}: could not load a causal LM from '{path}': {_first_line(exc)}") from None
    model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, source=path)


def check_same_vocabulary(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Per-token teacher scoring needs one vocabulary. Padding rows of an embedding don't matter."""
    if student.get_vocab() != teacher.get_vocab():
        student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda kv: kv[1])[:3]
        raise ModelError(
            "student and teacher tokenizers differ "
            f"({len(student_vocab)} vs {len(teacher_vocab)} tokens; e.g. {differing}); "
            "opd needs a teacher with the student's tokenizer (cross-tokenizer alignment is not supported yet)"
        )
    if student.eos_token_id != teacher.eos_token_id:
        raise ModelError(f"student EOS id {student.eos_token_id} differs from teacher EOS id {teacher.eos_token_id}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def cache_keyword(model: PreTrainedModel) -> str:
    """Newer transformers name the KV-cache argument `cache`, older ones `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count only real tokens, so left padding doesn't shift them. (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_completion: int,
) -> torch.Tensor:
    """Final hidden states at the positions that predict the last `num_completion` tokens.

    input_ids, attention_mask: (B, L) with the completion in the last `num_completion` columns.
    Returns (B, num_completion, H): row t predicts input_ids[:, L - num_completion + t].
    """
    decoder = model.get_decoder()
    outputs = decoder(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=position_ids_from_mask(attention_mask)[:, :-1],
        use_cache=False,
    )
    return outputs.last_hidden_state[:, -num_completion:]


def logits_from_hidden(model: PreTrainedModel, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """LM-head logits restricted to the tokenizer's vocabulary. (..., H) -> (..., vocab_size).

    Embedding rows past the tokenizer's length (e.g. Qwen's 151,936 rows for 151,669 tokens) are
    padding that no tokenizer emits; dropping them makes student and teacher distributions comparable.
    """
    logits = model.get_output_embeddings()(hidden)[..., :vocab_size]
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
