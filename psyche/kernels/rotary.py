"""Rotary position embedding on half-split head dims (the GPT-NeoX / Qwen2 convention).

`rotary_ref` is the definition. `rotary_triton` rotates q and k in one launch: one program per (b, t)
position loads that position's cos/sin once and rotates all q heads, then all k heads, with any strides
(the model passes q, k as transposed views). Backward is the inverse rotation (the transpose), the same
kernel with the sign of sin flipped. cos/sin get no gradient: they are a function of the positions.
"""

import torch

from psyche.kernels._triton import tl, triton


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, H, T, D), k (B, K, T, D), cos/sin (B, T, D) -> rotated q, k."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): broadcast over heads
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


if triton is not None:

    @triton.jit
    def _rotate_heads(X, Y, b, t, n_heads, sx_b, sx_h, sx_t, sx_d, sy_b, sy_h, sy_t, sy_d, c1, c2, s1, s2,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INVERSE: tl.constexpr):
        h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
        d = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D): index into one half
        mask = (h < n_heads) & (d < HALF)
        x_row = X + b * sx_b + t * sx_t + h * sx_h
        x1 = tl.load(x_row + d * sx_d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + (d + HALF) * sx_d, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:  # R^T: the gradient of x*cos + rotate_half(x)*sin
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        y_row = Y + b * sy_b + t * sy_t + h * sy_h
        tl.store(y_row + d * sy_d, y1, mask=mask)
        tl.store(y_row + (d + HALF) * sy_d, y2, mask=mask)

    @triton.jit
    def _rotary_kernel(Q, K, COS, SIN, QO, KO, T, n_q, n_k,
                       sq_b, sq_h, sq_t, sq_d, sqo_b, sqo_h, sqo_t, sqo_d,
                       sk_b, sk_h, sk_t, sk_d, sko_b, sko_h, sko_t, sko_d, sc_b, sc_t, sc_d,
                       HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                       BLOCK_D: tl.constexpr, INVERSE: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # one (b, t) position
        b = pid // T
        t = pid % T
        d = tl.arange(0, BLOCK_D)[None, :]
        dmask = d < HALF
        cs = b * sc_b + t * sc_t
        # cos/sin are (B, T, D); read both halves as the reference does (they are equal for standard RoPE)
        c1 = tl.load(COS + cs + d * sc_d, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + cs + (d + HALF) * sc_d, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + cs + d * sc_d, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + cs + (d + HALF) * sc_d, mask=dmask, other=0.0).to(tl.float32)
        _rotate_heads(Q, QO, b, t, n_q, sq_b, sq_h, sq_t, sq_d, sqo_b, sqo_h, sqo_t, sqo_d, c1, c2, s1, s2,
                      HALF, BLOCK_HQ, BLOCK_D, INVERSE)
        _rotate_heads(K, KO, b, t, n_k, sk_b, sk_h, sk_t, sk_d, sko_b, sko_h, sko_t, sko_d, c1, c2, s1, s2,
                      HALF, BLOCK_HK, BLOCK_D, INVERSE)

    def _rotary_launch(q, k, cos, sin, inverse: bool):
        B, H, T, D = q.shape
        Kh = k.shape[1]
        assert D % 2 == 0 and k.shape[0] == B and k.shape[2:] == (T, D)
        cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)  # (B or 1, T, D) -> (B, T, D), stride 0 if broadcast
        assert cos.stride() == sin.stride(), "cos and sin must share a layout"
        dtype = torch.promote_types(q.dtype, cos.dtype)
        qo = torch.empty_like(q, dtype=dtype)  # keeps q's layout (e.g. the transposed view the model passes)
        ko = torch.empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype))
        half = D // 2
        _rotary_kernel[(B * T,)](q, k, cos, sin, qo, ko, T, H, Kh, *q.stride(), *qo.stride(), *k.stride(),
                                 *ko.stride(), *cos.stride(), HALF=half, BLOCK_HQ=triton.next_power_of_2(H),
                                 BLOCK_HK=triton.next_power_of_2(Kh), BLOCK_D=triton.next_power_of_2(half),
                                 INVERSE=inverse, num_warps=4)
        return qo, ko

    class _RotaryTriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, cos, sin):
            ctx.save_for_backward(cos, sin)
            ctx.dtypes = (q.dtype, k.dtype)
            return _rotary_launch(q, k, cos, sin, inverse=False)

        @staticmethod
        def backward(ctx, dq, dk):
            cos, sin = ctx.saved_tensors
            dq, dk = _rotary_launch(dq, dk, cos, sin, inverse=True)
            return dq.to(ctx.dtypes[0]), dk.to(ctx.dtypes[1]), None, None

    def rotary_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Same signature and result as `rotary_ref`; forward and backward in Triton (no grad for cos/sin)."""
        return _RotaryTriton.apply(q, k, cos, sin)
