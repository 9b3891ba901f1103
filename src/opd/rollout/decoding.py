"""Decoding steps for the sampler: a lean one for Llama-style decoders, and Hugging Face's own.

At the widths of on-policy sampling, a Hugging Face forward spends most of a decoding step on
Python, mask building and DynamicCache's re-copying of every key and value at every step, not on
matrix products. `LeanDecoder` runs the same modules' weights with a preallocated KV cache and one
boolean mask. It covers the Llama family's layer (Llama, Mistral, Qwen2, Qwen3: RMSNorm, rotary
attention with optional q/k norms and biases, gated MLP) and is checked against the model's own
forward before first use; a model that differs, or any other architecture, uses `HFDecoder`.

Both decoders: start(prompt_ids, prompt_mask, copies, max_new_tokens) encodes each prompt once,
shares its cache rows among `copies` samples and returns the next-token logits (B, V); step(tokens)
appends one token per row and returns the next logits (B, V); release() frees the cache. Logits
are fp32 and cover the model's full output rows (the caller cuts them to the tokenizer's vocabulary).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from opd.ops.forward import cache_keyword, position_ids_from_mask

LLAMA_STYLE = {"llama", "mistral", "qwen2", "qwen3"}


class HFDecoder:
    """Decoding through the model's own forward and a DynamicCache: works for any causal LM."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def _forward(self, input_ids, position_ids) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.attention,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{cache_keyword(self.model): self.cache},
        )
        return out.logits[:, -1].float()

    def start(self, prompt_ids, prompt_mask, copies: int, max_new_tokens: int) -> torch.Tensor:
        self.cache = DynamicCache(config=self.model.config)
        self.attention = prompt_mask
        logits = self._forward(prompt_ids, position_ids_from_mask(prompt_mask))
        self.cache.batch_repeat_interleave(copies)
        self.attention = prompt_mask.repeat_interleave(copies, 0)
        self.positions = position_ids_from_mask(self.attention)[:, -1:]
        return logits.repeat_interleave(copies, 0)

    def release(self) -> None:
        """Free the KV cache between sampling calls (it would otherwise sit through the update)."""
        self.cache = self.attention = self.positions = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.attention = torch.cat([self.attention, torch.ones_like(self.attention[:, :1])], dim=1)
        self.positions = self.positions + 1
        return self._forward(tokens, self.positions)


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Llama-family RMSNorm (weight * normalized x) as one fused kernel instead of seven ops."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), norm.weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LeanDecoder:
    """The Llama-family decoder layer, step by step, over a preallocated KV cache."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.body = model.get_decoder()
        attention = self.body.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        config = model.config
        self.kv_heads = config.num_key_value_heads
        self.heads = config.num_attention_heads

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        config = model.config
        layer_types = getattr(config, "layer_types", None) or ["full_attention"]
        return (
            config.model_type in LLAMA_STYLE
            and all(kind == "full_attention" for kind in layer_types)
            # A window applies unless the config turns it off (Qwen2/3: use_sliding_window=False);
            # Mistral v0.1 has a 4,096 window and no such switch.
            and (
                getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False
            )
            and getattr(config, "mlp_bias", False) is False
            and getattr(config, "hidden_act", "silu") == "silu"
            # LoRA adapters live in the modules' forwards, and FSDP2 gathers weights in them: this step
            # reads weights directly, so it refuses both.
            and not any(
                hasattr(module, "lora_A") or type(module).__name__.startswith("FSDP") for module in model.modules()
            )
        )

    def _fuse_weights(self) -> None:
        """Per layer, q/k/v and gate/up as one matrix each: fewer, larger matrix products per step.
        Rebuilt at every start(), so they follow weight updates (a copy of the layer weights)."""
        self.fused = []
        for layer in self.body.layers:
            attention, mlp = layer.self_attn, layer.mlp
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            qkv_bias = None
            if attention.q_proj.bias is not None:  # Qwen2
                qkv_bias = torch.cat([projection.bias for projection in projections])
            self.fused.append(
                (
                    torch.cat([projection.weight for projection in projections]),
                    qkv_bias,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                )
            )

    def _layers(self, hidden, position_ids, mask, start: int) -> torch.Tensor:
        """hidden (B, n, H) at positions start..start+n-1 of the cache; mask (B, 1, n, L) bool, True = attend.
        Returns the next-token logits after the last position, (B, V) fp32."""
        batch, length = hidden.shape[:2]
        end = start + length
        cos, sin = self.body.rotary_emb(hidden, position_ids)
        cos, sin = cos[:, None].to(hidden.dtype), sin[:, None].to(hidden.dtype)  # (B, 1, n, d)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for layer, (keys, values), (qkv_weight, qkv_bias, gate_up_weight) in zip(
            self.body.layers, self.cache, self.fused
        ):
            attention = layer.self_attn
            qkv = torch.nn.functional.linear(_rms_norm(layer.input_layernorm, hidden), qkv_weight, qkv_bias)
            query, key, value = qkv.split([q_size, kv_size, kv_size], dim=-1)
            query = query.view(batch, length, self.heads, self.head_dim)
            key = key.view(batch, length, self.kv_heads, self.head_dim)
            if hasattr(attention, "q_norm"):  # Qwen3
                query, key = _rms_norm(attention.q_norm, query), _rms_norm(attention.k_norm, key)
            query = _rotate(query.transpose(1, 2), cos, sin)  # (B, heads, n, d)
            keys[:, :, start:end] = _rotate(key.transpose(1, 2), cos, sin)
            values[:, :, start:end] = value.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            if length == 1:  # one query per row: plain matrix products beat the fused kernel's overhead
                grouped = query.view(batch, self.kv_heads, -1, self.head_dim)  # (B, kv, groups, d)
                scores = grouped @ keys[:, :, :end].transpose(-1, -2) * self.scaling  # (B, kv, groups, L)
                scores = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(query.dtype)
                mixed = (scores @ values[:, :, :end]).view(batch, self.heads, 1, self.head_dim)
            else:
                mixed = torch.nn.functional.scaled_dot_product_attention(
                    query,
                    keys[:, :, :end],
                    values[:, :, :end],
                    attn_mask=mask,
                    scale=self.scaling,
                    enable_gqa=self.heads != self.kv_heads,
                )  # (B, heads, n, d)
            hidden = hidden + attention.o_proj(mixed.transpose(1, 2).reshape(batch, length, -1))
            gate, up = torch.nn.functional.linear(
                _rms_norm(layer.post_attention_layernorm, hidden), gate_up_weight
            ).chunk(2, dim=-1)
            hidden = hidden + layer.mlp.down_proj(torch.nn.functional.silu(gate) * up)
        last = _rms_norm(self.body.norm, hidden[:, -1])
        return self.model.get_output_embeddings()(last).float()  # (B, V)

    def start(self, prompt_ids, prompt_mask, copies: int, max_new_tokens: int) -> torch.Tensor:
        prompts, width = prompt_ids.shape
        self._fuse_weights()
        parameter = next(self.model.parameters())
        shape = (prompts, self.kv_heads, width + max_new_tokens, self.head_dim)
        self.cache = [(parameter.new_zeros(shape), parameter.new_zeros(shape)) for _ in self.body.layers]
        real = prompt_mask.bool()
        causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
        # Left-padding rows attend to themselves only, so no row of the mask is empty (NaN in SDPA).
        mask = (causal & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=real.device)
        logits = self._layers(self.body.embed_tokens(prompt_ids), position_ids_from_mask(prompt_mask), mask[:, None], 0)
        self.cache = [
            (keys.repeat_interleave(copies, 0), values.repeat_interleave(copies, 0)) for keys, values in self.cache
        ]
        self.key_mask = torch.ones(prompts * copies, 1, 1, width + max_new_tokens, dtype=torch.bool, device=real.device)
        self.key_mask[:, 0, 0, :width] = real.repeat_interleave(copies, 0)
        self.length = width
        self.positions = position_ids_from_mask(prompt_mask)[:, -1:].repeat_interleave(copies, 0)
        return logits.repeat_interleave(copies, 0)

    def release(self) -> None:
        """Free the KV cache and fused weights between sampling calls."""
        self.cache = self.key_mask = self.positions = self.fused = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.positions = self.positions + 1
        logits = self._layers(
            self.body.embed_tokens(tokens), self.positions, self.key_mask[:, :, :, : self.length + 1], self.length
        )
        self.length += 1
        return logits


@torch.no_grad()
def make_decoder(model: torch.nn.Module) -> LeanDecoder | HFDecoder:
    """The lean decoder when the model is Llama-style and it reproduces the model's own logits on a
    probe (two left-padded prompts, three decoding steps); otherwise Hugging Face's forward."""
    hf = HFDecoder(model)
    if not LeanDecoder.supports(model):
        return hf
    lean = LeanDecoder(model)
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (2, 7), generator=generator).to(device)
    mask = torch.ones(2, 7, dtype=torch.long, device=device)
    mask[1, :3] = 0
    steps = torch.randint(0, vocab, (2 * 2, 3), generator=generator).to(device)
    # Compared as log-probs: fp32 to 1e-3; in bf16, where the two differ in rounding, by the mean
    # difference, which a real difference between the layers moves by far more than 0.02 nats.
    full_precision = next(model.parameters()).dtype == torch.float32
    try:
        pairs = [(lean.start(ids, mask, 2, 3), hf.start(ids, mask, 2, 3))]
        pairs += [(lean.step(steps[:, t : t + 1]), hf.step(steps[:, t : t + 1])) for t in range(3)]
    except Exception:  # a variant the lean layer doesn't know: use the model's own forward
        return hf
    finally:
        lean.release()
        hf.release()
    for mine, reference in pairs:
        difference = (mine.log_softmax(-1) - reference.log_softmax(-1)).abs()
        if not (float(difference.max()) <= 1e-3 if full_precision else float(difference.mean()) <= 0.02):
            return hf
    return lean
