"""SwiGLU activation of the Qwen2 MLP: silu(gate) * up.

`swiglu_ref` is the definition. `swiglu_triton` is one elementwise pass forward (eager PyTorch makes two,
with a (.., I) temporary between them) and one pass backward producing both gradients.
"""

import torch
import torch.nn.functional as F

from psyche.kernels._triton import tl, triton


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, g / (1.0 + tl.exp(-g)) * u, mask=mask)  # silu(g) * u

    @triton.jit
    def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        silu = g * sig
        tl.store(DU + offs, dy * silu, mask=mask)
        tl.store(DG + offs, dy * u * (sig + silu * (1.0 - sig)), mask=mask)  # silu' = s + g s (1 - s)

    _BLOCK = 1024

    class _SwiGLUTriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate, up):
            assert gate.shape == up.shape, "gate and up must have the same shape"
            g, u = gate.contiguous(), up.contiguous()
            y = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
            n = g.numel()
            _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](g, u, y, n, BLOCK=_BLOCK, num_warps=4)
            ctx.save_for_backward(g, u)
            return y

        @staticmethod
        def backward(ctx, dy):
            g, u = ctx.saved_tensors
            dy = dy.contiguous()
            dg, du = torch.empty_like(g), torch.empty_like(u)
            n = g.numel()
            _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dy, g, u, dg, du, n, BLOCK=_BLOCK, num_warps=4)
            return dg, du

    def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Same signature and result as `swiglu_ref`; forward and backward in Triton."""
        return _SwiGLUTriton.apply(gate, up)
