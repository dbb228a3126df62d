"""The optional triton import shared by the kernel modules, and launch settings per device.

`triton` and `tl` are None when triton is missing; each module then defines only its reference.

On a CPU tensor a kernel can only run under `TRITON_INTERPRET=1`, which triton reads when `@triton.jit`
runs: for triton.language's own helpers (tl.sum, ...) when triton is first imported, for ours when this
package is. Set it before the first import of either.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # not installed, or installed without a usable backend: the references still work
    triton = tl = None


def dot_dtype(t: torch.Tensor):
    """The operand dtype for tl.dot: the tensor's own on a GPU (tensor cores), fp32 on CPU because the
    interpreter's bf16 dot is wrong (it goes through numpy, which has no bf16)."""
    if not t.is_cuda:
        return tl.float32
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[t.dtype]


def num_programs(device: torch.device) -> int:
    """How many persistent programs a reduction over rows should use: one per SM on a GPU, a few on CPU
    (the interpreter runs programs one after another, so more only costs time)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def row_warps(block: int) -> int:
    """num_warps for a one-row-per-program kernel of `block` elements."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit stride along N (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()
