"""A preallocated key/value cache for sampling.

Layout: k, v of shape (layers, B, kv_heads, max_len, head_dim) in the model's dtype, and per-row lengths.
Row b holds `lengths[b]` real tokens in slots [0, lengths[b]): there is never padding *inside* the cache,
so a row's next token goes to slot lengths[b] and its position id is lengths[b]. Ragged prompts are
prefilled right-padded; the pad slots are simply overwritten by the row's first generated tokens, and the
attention mask (built from `lengths`, see model.build_attention) never lets a query see them.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self._max = self._min = 0  # max/min(lengths) mirrored on the host: no device sync per layer

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        c = model.config
        p = model.lm_head.weight
        return cls(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim, p.dtype, p.device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def uniform(self) -> bool:
        """All rows hold the same number of tokens."""
        return self._min == self._max

    @property
    def empty(self) -> bool:
        return self._max == 0

    def visible_len(self, T: int) -> int:
        """Key length S a forward of T new tokens attends over: slots [0, max(lengths) + T)."""
        S = self._max + T
        if S > self.max_len:
            raise ValueError(f"KV cache overflow: {S} slots needed, cache holds {self.max_len}")
        return S

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write new k, v (B, K, T, D) at each row's slots lengths[b] + t; return the visible (B, K, S, D)."""
        B, K, T, D = k.shape
        S = self.visible_len(T)
        slots = self.lengths[:, None] + torch.arange(T, device=k.device)  # (B, T)
        idx = slots[:, None, :, None].expand(B, K, T, D)
        self.k[layer].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v.dtype))
        return self.k[layer, :, :, :S], self.v[layer, :, :, :S]

    def advance(self, n):
        """Mark n more tokens per row as written (n: int or (B,) tensor). Call once after each forward."""
        self.lengths += n
        self._sync()

    def set_lengths(self, lengths: torch.Tensor):
        self.lengths = lengths.to(self.lengths.device, torch.long).clone()
        self._sync()

    def _sync(self):
        self._max = int(self.lengths.max()) if self.batch else 0
        self._min = int(self.lengths.min()) if self.batch else 0

    def fork_from(self, src: "KVCache", n: int):
        """Fill this cache (B = src.B * n rows) with each of src's rows repeated n times, consecutively:
        one prompt's prefill becomes its n group rows without recomputing it."""
        if self.batch != src.batch * n:
            raise ValueError(f"fork: {src.batch} rows x {n} != {self.batch} rows")
        L = src._max
        self.k[:, :, :, :L] = src.k[:, :, :, :L].repeat_interleave(n, dim=1)
        self.v[:, :, :, :L] = src.v[:, :, :, :L].repeat_interleave(n, dim=1)
        self.set_lengths(src.lengths.repeat_interleave(n))

    def keep(self, rows: torch.Tensor):
        """Drop every row not in `rows` (finished completions stop costing compute). Copies the kept rows."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        self.set_lengths(self.lengths[rows])


class StaticKVCache(KVCache):
    """The same buffers, seen whole: every forward attends over all max_len slots (slots past a row's length
    are masked off), and the lengths live only on the device. Shapes never change during a decode and
    nothing syncs with the host, so one decode step can be compiled and replayed (psyche/static_decode.py). Costs attention over max_len slots per step instead of the slots written so far."""

    def visible_len(self, T: int) -> int:
        return self.max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """As KVCache.update, written as one index_put_ into the whole (layers, B, K, S, D) buffer: torch.compile
        then updates the cache in place. (A scatter_ into the layer's view is traced as a new copy of that layer's
        cache plus a copy back, every step: more memory traffic than the weights at long caches.)"""
        B, K, T, D = k.shape
        dev = k.device
        idx = (torch.full((1, 1, 1), layer, device=dev), torch.arange(B, device=dev)[:, None, None],
               torch.arange(K, device=dev)[None, :, None], self.lengths[:, None, None] + torch.arange(T, device=dev))
        self.k.index_put_(idx, k.to(self.k.dtype))  # (B, K, T) positions, D values each
        self.v.index_put_(idx, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    @property
    def uniform(self) -> bool:
        return False

    @property
    def empty(self) -> bool:
        return False

    def _sync(self):
        pass  # no host mirror of the lengths

    def keep(self, rows):
        raise NotImplementedError("a static cache keeps its batch: finished rows are masked, not dropped")
