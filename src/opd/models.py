"""Loading Hugging Face causal LMs and the forward passes opd needs from them.

Forwards return hidden states of only the positions that predict completion tokens; logits are made
from them chunk by chunk (`logits_from_hidden`), so [B x T x V] logits of two models never coexist.
"""

from __future__ import annotations

import inspect
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from opd.errors import ModelError

if TYPE_CHECKING:
    from opd.rollout import Rollouts

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

    @property
    def stop_token_ids(self) -> list[int]:
        """The tokenizer's EOS and every EOS of the generation config (e.g. Llama 3's <|eot_id|>)."""
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured]
        return sorted({self.tokenizer.eos_token_id, *(i for i in configured if i is not None)})


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
    loaded = LoadedModel(model=model, tokenizer=tokenizer, source=path)
    check_logits_from_hidden(loaded, key)
    return loaded


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
    # The body without the LM head (in transformers 4.x GPT-2's get_decoder() is the whole model).
    decoder = model.base_model
    outputs = decoder(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=position_ids_from_mask(attention_mask)[:, :-1],
        use_cache=False,
    )
    return outputs.last_hidden_state[:, -num_completion:]


def shared_prompt_hidden_states(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_index: torch.Tensor,
) -> torch.Tensor:
    """`completion_hidden_states` of rows (prompt, completion), with each distinct prompt encoded once.

    prompt_ids, prompt_mask: (B, P) left-padded; completion_ids, completion_mask: (B, T);
    prompt_index: (B,), equal for rows that hold the same prompt (a prompt's samples). Returns
    (B, T, H): row t predicts completion_ids[:, t]. The U distinct prompts run as a batch of U; their
    keys and values are then indexed out to the B rows, and the completions run against them, so the
    model sees U x P + B x T positions instead of B x (P + T). Gradients flow back through the
    indexing into the shared prompt pass. Use through `completion_hidden_states_of`, which checks
    once per model that the result matches the plain forward.
    """
    rows = torch.arange(len(prompt_index), device=prompt_index.device)
    groups, row_group = torch.unique(prompt_index, return_inverse=True)  # (U,), (B,)
    first_row = torch.full_like(groups, len(rows)).scatter_reduce(0, row_group, rows, "amin")  # (U,)
    decoder = model.base_model  # the body without the LM head
    cache = DynamicCache(config=model.config)
    unique_mask = prompt_mask[first_row]
    encoded = decoder(input_ids=prompt_ids[first_row], attention_mask=unique_mask,
                      position_ids=position_ids_from_mask(unique_mask), use_cache=True,
                      **{cache_keyword(decoder): cache})
    first_hidden = encoded.last_hidden_state[row_group, -1:]  # (B, 1, H): predicts completion token 0
    if completion_ids.shape[1] == 1:
        return first_hidden
    cache.batch_select_indices(row_group)  # each row gets its prompt's keys and values
    mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)  # (B, P + T - 1)
    rest = decoder(input_ids=completion_ids[:, :-1], attention_mask=mask,
                   position_ids=position_ids_from_mask(mask)[:, prompt_ids.shape[1]:], use_cache=True,
                   **{cache_keyword(decoder): cache})
    return torch.cat([first_hidden, rest.last_hidden_state], dim=1)


_SHARES_PROMPTS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def shares_prompts(model: PreTrainedModel) -> bool:
    """Whether `shared_prompt_hidden_states` reproduces the plain forward for this model (probed once:
    two prompts of different lengths, two samples each, one stopping early). A model whose cache
    can't be shared this way (an unknown cache layout, a failing forward) uses the plain forward."""
    if model not in _SHARES_PROMPTS:
        _SHARES_PROMPTS[model] = _probe_prompt_sharing(model)
    return _SHARES_PROMPTS[model]


def _probe_prompt_sharing(model: PreTrainedModel) -> bool:
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(0)
    prompts = torch.randint(0, vocab, (2, 6), generator=generator).repeat_interleave(2, 0).to(device)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[2:, :2] = 0
    completions = torch.randint(0, vocab, (4, 4), generator=generator).to(device)
    completion_mask = torch.ones_like(completions)
    completion_mask[1, 2:] = 0
    index = torch.tensor([0, 0, 1, 1], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            shared = shared_prompt_hidden_states(model, prompts, prompt_mask, completions, completion_mask, index)
            plain = completion_hidden_states(model, torch.cat([prompts, completions], 1),
                                             torch.cat([prompt_mask, completion_mask], 1), 4)
    except Exception:  # e.g. a cache type without batch_select_indices
        return False
    finally:
        model.train(was_training)
    used = completion_mask.bool()
    difference = (shared.float() - plain.float())[used].abs()
    scale = plain.float()[used].abs().mean()
    tolerance = 1e-4 if plain.dtype == torch.float32 else 2e-2  # bf16: rounding of differently shaped products
    return bool(shared.shape == plain.shape and difference.mean() <= tolerance * scale)


def completion_hidden_states_of(model: PreTrainedModel, rollouts: "Rollouts") -> torch.Tensor:
    """(B, T, H) hidden states predicting each completion token of the rollouts: with prompts shared
    among their samples when the model allows it (the same values, fewer positions), else plain."""
    if len(torch.unique(rollouts.prompt_index)) < len(rollouts) and shares_prompts(model):
        return shared_prompt_hidden_states(model, rollouts.prompt_ids, rollouts.prompt_mask,
                                           rollouts.completion_ids, rollouts.completion_mask, rollouts.prompt_index)
    return completion_hidden_states(model, rollouts.input_ids, rollouts.attention_mask, rollouts.completion_ids.shape[1])


def logits_from_hidden(model: PreTrainedModel, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """LM-head logits restricted to the tokenizer's vocabulary. (..., H) -> (..., vocab_size).

    Embedding rows past the tokenizer's length (e.g. Qwen's 151,936 rows for 151,669 tokens) are
    padding that no tokenizer emits; dropping them makes student and teacher distributions comparable.
    """
    logits = model.get_output_embeddings()(hidden)[..., :vocab_size]
    config = model.config
    if getattr(config, "logit_scale", None):  # Cohere
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):  # Granite
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2
        logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    return logits


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
