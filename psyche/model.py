"""Qwen2 / Qwen2.5 decoder, from scratch.

Module names equal Hugging Face's (`model.layers.0.self_attn.q_proj`, ...), so a checkpoint's state dict
loads with no renaming. The model knows nothing of distributed training or of how it is sampled from:
parallelism is applied from outside (psyche/dist.py), and inference state lives in a KV cache object that
is passed in (psyche/kv_cache.py).

Notation in shape comments: B batch, T query length, S key length, H query heads, K kv heads,
D head dim, C hidden size, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from psyche import kernels
from psyche.model_config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the half-split rotary embedding, computed in fp32 and looked up by position.

    The table is a plain attribute, not a buffer: it is not in checkpoints, model.to(bf16) cannot round it,
    FSDP does not shard it, and a meta-device build simply computes it on first use."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._table = None  # (max_pos, D) cos and sin, fp32

    def _tables(self, n: int, device):
        t = self._table
        if t is None or t[0].device != device or t[0].shape[0] < n:
            n = max(n, 2 * (t[0].shape[0] if t is not None else 0), 256)
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
            inv_freq = 1.0 / (self.theta ** exponent)  # (D/2,)
            freqs = torch.arange(n, dtype=torch.float32, device=device)[:, None] * inv_freq  # (n, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (n, D)
            self._table = t = (emb.cos(), emb.sin())
        return t

    def reserve(self, n: int, device):
        """Compute the tables for positions < n now (a compiled decode step must not see them grow)."""
        self._tables(n, device)

    def forward(self, position_ids, dtype, max_pos: int | None = None):
        """position_ids (B, T) -> cos, sin (B, T, D) in `dtype`. `max_pos` (an upper bound on the ids)
        avoids a device sync when the caller knows it."""
        n = max_pos if max_pos is not None else int(position_ids.max()) + 1
        cos, sin = self._tables(n, position_ids.device)
        return cos[position_ids].to(dtype), sin[position_ids].to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn: "AttnInfo", kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = kernels.rotary(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, K, S, D): everything cached so far
        y = kernels.attention(q, k, v, mask=attn.mask, is_causal=attn.is_causal, cu_seqlens=attn.cu_seqlens,
                              max_seqlen=attn.max_seqlen)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


class AttnInfo:
    """How attention is restricted in one forward: built once, shared by every layer.

    Exactly one of: `is_causal` (plain causal, the fast path), `mask` (bool (B, 1, T, S), True = may attend),
    or `cu_seqlens` (packed samples for varlen flash attention; `mask` is then also set for the SDPA path).
    """

    def __init__(self, mask=None, is_causal=False, cu_seqlens=None, max_seqlen=None):
        self.mask, self.is_causal, self.cu_seqlens, self.max_seqlen = mask, is_causal, cu_seqlens, max_seqlen


def build_attention(T: int, device, attention_mask=None, doc_ids=None, kv_cache=None) -> AttnInfo:
    """Masks for the three ways the model is called.

    - no cache, no padding, no packing: plain causal.
    - no cache with a padding mask (B, T) and/or packing doc ids (B, T): explicit causal mask where a query
      sees only real keys of its own document. Every query may see itself, so pad rows stay finite.
    - with a cache: the cache holds, per row b, `lengths[b]` real tokens in slots [0, lengths[b]); the new
      tokens go to slots lengths[b] + t. A query sees every slot up to and including its own. This is
      explicit on purpose: `is_causal=True` with T < S aligns the triangle to the wrong corner.
    """
    if kv_cache is not None:
        lengths = kv_cache.lengths  # (B,)
        S = kv_cache.visible_len(T)
        if kv_cache.empty:
            return AttnInfo(is_causal=True)  # prefill from slot 0: S == T, plain causal
        if T == 1 and kv_cache.uniform:
            return AttnInfo()  # one new token per row, same length everywhere: it may see all S keys
        q_slot = lengths[:, None] + torch.arange(T, device=device)  # (B, T)
        mask = torch.arange(S, device=device)[None, None, :] <= q_slot[:, :, None]  # (B, T, S)
        return AttnInfo(mask=mask[:, None])
    if attention_mask is None and doc_ids is None:
        return AttnInfo(is_causal=True)
    idx = torch.arange(T, device=device)
    mask = (idx[None, :] <= idx[:, None])[None]  # (1, T, T) causal
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]  # keys must be real tokens
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])  # stay inside one packed sample
    mask = mask | torch.eye(T, dtype=torch.bool, device=device)[None]  # (B, T, T)
    if doc_ids is not None and attention_mask is None:
        cu, max_len = kernels.cu_seqlens_from_doc_ids(doc_ids)
        return AttnInfo(mask=mask[:, None], cu_seqlens=cu, max_seqlen=max_len)
    return AttnInfo(mask=mask[:, None])


def default_position_ids(input_ids, attention_mask=None, doc_ids=None, kv_cache=None):
    B, T = input_ids.shape
    if kv_cache is not None:
        return kv_cache.lengths[:, None] + torch.arange(T, device=input_ids.device)  # (B, T)
    if doc_ids is not None:  # restart at 0 at every document boundary
        start = torch.ones_like(doc_ids, dtype=torch.bool)
        start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        idx = torch.arange(T, device=input_ids.device).expand(B, T)
        first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
        return idx - first
    if attention_mask is not None:  # left padding: the first real token is position 0
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return torch.arange(T, device=input_ids.device).expand(B, T)


class Qwen2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Random init as HF does it: N(0, initializer_range) for matrices, zero biases, unit norms."""
        gen = torch.Generator(device=self.lm_head.weight.device)
        if seed is not None:
            gen.manual_seed(seed)
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std, generator=gen)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        return self

    def forward(self, input_ids, position_ids=None, attention_mask=None, doc_ids=None, kv_cache=None,
                return_hidden=False, targets=None, temperature: float = 1.0, uniform_grad: bool = False):
        """input_ids (B, T) -> logits (B, T, V) in the parameter dtype, or final hidden (B, T, C), or per-token
        (log-prob, entropy) when `targets` is given.

        attention_mask: (B, T) 1 for real tokens, 0 for padding (left or right).
        doc_ids: (B, T) packed-sample index; attention and default positions restart per sample.
        kv_cache: a psyche.kv_cache.KVCache; new keys/values are written at each row's length. The caller
            advances the cache's lengths afterwards.
        return_hidden: skip lm_head.
        targets: (B, T) the token each position must predict (usually input_ids shifted left), < 0 to ignore.
            Returns (logp, entropy), both (B, T) fp32 and 0 at ignored positions, of softmax(logits / temperature):
            only the selected positions go through lm_head, in chunks, so (B, T, V) logits never exist.
        uniform_grad: with targets, the loss gives every target's log-prob the same gradient and the entropy
            none (SFT): see kernels.token_logprobs.
        """
        B, T = input_ids.shape
        if kv_cache is not None and attention_mask is not None:
            raise ValueError("with a KV cache, right-pad rows and pass no attention_mask: row b's tokens go to "
                             "slots lengths[b]..., and pad slots are overwritten by later tokens")
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask, doc_ids, kv_cache)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        max_pos = kv_cache.visible_len(T) if kv_cache is not None else None
        cos, sin = self.model.rotary_emb(position_ids, x.dtype, max_pos)  # (B, T, D)
        attn = build_attention(T, input_ids.device, attention_mask, doc_ids, kv_cache)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn, kv_cache)
        x = self.model.norm(x)
        if targets is not None:
            rows, cols = (targets >= 0).nonzero(as_tuple=True)  # (n,) the positions that carry a target
            h, w = x[rows, cols], self.lm_head.weight
            if torch.is_autocast_enabled(h.device.type):  # as autocast would run the lm_head Linear: in its dtype
                dt = torch.get_autocast_dtype(h.device.type)
                h, w = h.to(dt), w.to(dt)
            lp, ent = kernels.token_logprobs(h, w, targets[rows, cols], temperature, uniform_grad)
            zeros = torch.zeros(B, T, dtype=torch.float32, device=x.device)
            return zeros.index_put((rows, cols), lp), zeros.index_put((rows, cols), ent)
        if return_hidden:
            return x
        return self.lm_head(x)  # (B, T, V)


def build_model(cfg: ModelConfig, device="cpu", dtype=None, seed: int | None = 0) -> Qwen2:
    """A randomly initialised model, built on the meta device then materialised (no double allocation)."""
    with torch.device("meta"):
        model = Qwen2(cfg)
    model = model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model.to(dtype or cfg.dtype)
