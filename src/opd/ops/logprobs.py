"""Log-prob math shared by the sampler, the teachers and the losses: the distribution that draws a
token (temperature, top-k, top-p), a token's log-prob and a distribution's entropy, without keeping a
full-vocabulary log-softmax; and how many positions one chunk of full-vocabulary logits holds.

Shapes as everywhere in opd: B rollouts, T positions, V vocabulary entries, as `# (B, T)` comments.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2**24  # a [tokens x V] fp32 block of 64 MiB


def tokens_per_chunk(configured: int | None, vocab_size: int) -> int:
    """Tokens per chunk of full-vocabulary logits: the configured count, or as many as keep one
    [tokens x V] fp32 block near 64 MiB (2,048 tokens at an 8k vocabulary, 110 at Qwen's 151,936)."""
    return configured or max(1, CHUNK_ELEMENTS // vocab_size)


def process_logits(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The distribution that draws a token: temperature, then top-k and top-p truncation.

    logits: (..., V) -> (..., V), with truncated entries set to -inf. Used by the sampler and by
    the update, so ℓˢ and log pi_theta are taken under the same processing. keep: (...) token ids
    that stay in the support whatever the truncation says. The update passes the sampled tokens: each
    was inside the sampler's support, and where the update's logits differ from the sampler's by
    rounding (bf16 against fp32) a token at the truncation boundary could otherwise fall outside and
    get probability 0, so rho = 0 and no gradient, silently.
    """
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    scaled = logits
    if top_k and top_k < logits.shape[-1]:
        kth_value = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_value, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p; the first always stays.
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if keep is not None and logits is not scaled:
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, keep.unsqueeze(-1), True)
        logits = torch.where(kept, scaled, logits)
    return logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] without keeping a full-vocabulary log-softmax.

    logits: (..., V), tokens: (...) -> (...). A -inf logit at the token gives -inf, never NaN.
    """
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per row, -sum p log p with 0 log 0 = 0. (..., V) -> (...)."""
    logits = logits.float()
    return _entropy(logits, torch.logsumexp(logits, dim=-1, keepdim=True))


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs and entropy of the same logits, sharing one logsumexp pass. (..., V), (...) -> (...), (...)."""
    logits = logits.float()
    log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - log_normalizer.squeeze(-1), _entropy(logits, log_normalizer)


def _entropy(logits: torch.Tensor, log_normalizer: torch.Tensor) -> torch.Tensor:
    probs = (logits - log_normalizer).exp()
    finite = logits.clamp(min=torch.finfo(logits.dtype).min)  # -inf entries have p = 0: no NaN from 0 * inf
    return log_normalizer.squeeze(-1) - torch.linalg.vecdot(probs, finite)
