"""Rotary position embedding on half-split head dims (the GPT-NeoX / Qwen2 convention)."""

import torch


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, H, T, D), k (B, K, T, D), cos/sin (B, T, D) -> rotated q, k."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): broadcast over heads
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
