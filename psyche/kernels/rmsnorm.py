"""RMSNorm: y = w * x / sqrt(mean(x^2) + eps), statistics in fp32 (as Qwen2 does), output in x's dtype.

`rms_norm_ref` is the definition. `rms_norm_triton` computes the same in one pass per row (forward) and
one pass per row plus a tiny column sum (backward), keeping only rstd (one fp32 per row) for backward.
"""

import torch

from psyche.kernels._triton import num_programs, row_warps, rows_2d, tl, triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one program per row
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        # The reference rounds the normalised x to x's dtype before the weight multiplies it: so do we.
        xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, w * xn, mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, M, N, rows_per_program,
                             BLOCK: tl.constexpr):
        # A persistent program walks a contiguous range of rows and sums its share of dw in registers,
        # so dw needs no atomics: the (programs, N) partial sums are added up afterwards.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, M)
        r0 = row_start.to(tl.int64)  # int64 offsets: M * N may pass 2**31
        X += r0 * stride_x
        DY += r0 * stride_dy
        DX += r0 * stride_dx
        RSTD += r0
        for _ in range(row_start, row_end):
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD)
            xn = x * rstd
            g = dy * w  # d loss / d xn (the rounding to x's dtype passes gradients straight through)
            # d xn / d x = rstd * (I - xn xn^T / N)
            dx = rstd * (g - xn * (tl.sum(g * xn, axis=0) / N))
            tl.store(DX + cols, dx, mask=mask)
            dw += dy * xn.to(X.dtype.element_ty).to(tl.float32)
            X += stride_x
            DY += stride_dy
            DX += stride_dx
            RSTD += 1
        tl.store(DW_PART + pid * N + cols, dw, mask=mask)

    class _RMSNormTriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            shape, N = x.shape, x.shape[-1]
            x2 = rows_2d(x)  # (M, N)
            M = x2.shape[0]
            y = torch.empty((M, N), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
            rstd = torch.empty(M, dtype=torch.float32, device=x.device)
            BLOCK = triton.next_power_of_2(N)
            _rms_norm_fwd_kernel[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), N, eps, BLOCK=BLOCK,
                                       num_warps=row_warps(BLOCK))
            ctx.save_for_backward(x2, weight, rstd)
            ctx.shape = shape
            return y.view(shape)

        @staticmethod
        def backward(ctx, dy):
            x2, weight, rstd = ctx.saved_tensors
            M, N = x2.shape
            dy2 = rows_2d(dy)
            dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
            programs = max(1, min(M, num_programs(x2.device)))
            rows_per_program = triton.cdiv(M, programs)
            programs = triton.cdiv(M, rows_per_program)
            dw_part = torch.empty((programs, N), dtype=torch.float32, device=x2.device)
            BLOCK = triton.next_power_of_2(N)
            _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0),
                                              dx.stride(0), M, N, rows_per_program, BLOCK=BLOCK,
                                              num_warps=row_warps(BLOCK))
            dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
            return dx.view(ctx.shape), dw, None

    def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Same signature and result as `rms_norm_ref`; forward and backward in Triton."""
        return _RMSNormTriton.apply(x, weight, eps)
