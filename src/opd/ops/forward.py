"""The forward passes opd needs from a Hugging Face causal LM, as functions of tensors.

Forwards return hidden states of only the positions that predict completion tokens; logits are made
from them chunk by chunk (`logits_from_hidden`), so [B x T x V] logits of two models never coexist.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import DynamicCache, PreTrainedModel


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
    encoded = decoder(
        input_ids=prompt_ids[first_row],
        attention_mask=unique_mask,
        position_ids=position_ids_from_mask(unique_mask),
        use_cache=True,
        **{cache_keyword(decoder): cache},
    )
    first_hidden = encoded.last_hidden_state[row_group, -1:]  # (B, 1, H): predicts completion token 0
    if completion_ids.shape[1] == 1:
        return first_hidden
    cache.batch_select_indices(row_group)  # each row gets its prompt's keys and values
    mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)  # (B, P + T - 1)
    rest = decoder(
        input_ids=completion_ids[:, :-1],
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask)[:, prompt_ids.shape[1] :],
        use_cache=True,
        **{cache_keyword(decoder): cache},
    )
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
            plain = completion_hidden_states(
                model, torch.cat([prompts, completions], 1), torch.cat([prompt_mask, completion_mask], 1), 4
            )
    except Exception:  # e.g. a cache type without batch_select_indices
        return False
    finally:
        model.train(was_training)
    used = completion_mask.bool()
    difference = (shared.float() - plain.float())[used].abs()
    scale = plain.float()[used].abs().mean()
    tolerance = 1e-4 if plain.dtype == torch.float32 else 2e-2  # bf16: rounding of differently shaped products
    return bool(shared.shape == plain.shape and difference.mean() <= tolerance * scale)


def completion_hidden_states_of(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_index: torch.Tensor,
) -> torch.Tensor:
    """(B, T, H) hidden states predicting each completion token: with prompts shared among their
    samples when the model allows it (the same values, fewer positions), else the plain forward (always
    for a model sharded with FSDP2).
    Arguments as in `shared_prompt_hidden_states`."""
    # A sharded model takes the plain path always: one body call whatever the batch holds (and no probe),
    # so every rank makes the same collectives.
    if (
        not isinstance(model, FSDPModule)
        and len(torch.unique(prompt_index)) < len(prompt_index)
        and shares_prompts(model)
    ):
        return shared_prompt_hidden_states(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, prompt_index
        )
    return completion_hidden_states(
        model,
        torch.cat([prompt_ids, completion_ids], 1),
        torch.cat([prompt_mask, completion_mask], 1),
        completion_ids.shape[1],
    )


def logits_from_hidden(model: PreTrainedModel, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """LM-head logits restricted to the tokenizer's vocabulary. (..., H) -> (..., vocab_size).

    Embedding rows past the tokenizer's length (e.g. Qwen's 151,936 rows for 151,669 tokens) are
    padding that no tokenizer emits; dropping them makes student and teacher distributions comparable.
    """
    return head_logits(model.get_output_embeddings(), model.config, hidden, vocab_size)


def head_logits(head: torch.nn.Module, config, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`logits_from_hidden` with the LM head and the model's config given apart: a model's own head, or
    one loaded alone (opd.models.lm_head) for a teacher whose body runs on a server. (..., H) -> (..., vocab_size)."""
    logits = head(hidden)[..., :vocab_size]
    if getattr(config, "logit_scale", None):  # Cohere
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):  # Granite
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2
        logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    return logits
