"""Hand-written kernels for the hot paths, each beside its pure-PyTorch reference.

psyche calls the functions below, one per op. Each picks:
- the Triton kernel when the tensor is on CUDA and triton imports;
- flash-attn for attention on CUDA (fp16/bf16) when it imports (varlen for packed batches);
- the PyTorch reference otherwise.
`PSYCHE_KERNELS=reference` forces the references everywhere; `PSYCHE_KERNELS=triton` forces the Triton
kernels even on CPU (useful only under `TRITON_INTERPRET=1`, for tests). Nothing here fails to import
when triton or flash-attn is missing.

Every Triton op has its backward in Triton too (token_logprobs: for both the log-prob and the entropy), so
the dispatch never has to fall back for training; the one exception is rotary with cos/sin that need grad.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from psyche.kernels._triton import triton as _triton_or_none
from psyche.kernels.attention import attention_flash, attention_ref, cu_seqlens_from_doc_ids
from psyche.kernels.logprobs import token_logprobs_naive, token_logprobs_ref
from psyche.kernels.rmsnorm import rms_norm_ref
from psyche.kernels.rotary import rotary_ref
from psyche.kernels.swiglu import swiglu_ref

# The op modules under private names (`kernels.rotary` and `kernels.swiglu` are the dispatching functions).
_rmsnorm, _rotary, _swiglu, _logprobs = (importlib.import_module(f"psyche.kernels.{m}")
                                         for m in ("rmsnorm", "rotary", "swiglu", "logprobs"))

HAS_TRITON = _triton_or_none is not None
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def mode() -> str:
    """'auto' (default), 'reference' or 'triton'."""
    m = os.environ.get("PSYCHE_KERNELS", "auto")
    if m not in ("auto", "reference", "triton"):
        raise ValueError(f"PSYCHE_KERNELS must be auto, reference or triton, got {m!r}")
    return m


def use_triton(x) -> bool:
    m = mode()
    if m == "reference" or not HAS_TRITON:
        return False
    return m == "triton" or x.is_cuda


def use_flash(q) -> bool:
    import torch

    return (mode() != "reference" and HAS_FLASH_ATTN and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16))


def rms_norm(x, weight, eps):
    """x (..., C), weight (C,) -> (..., C)."""
    if use_triton(x):
        return _rmsnorm.rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def rotary(q, k, cos, sin):
    """q (B, H, T, D), k (B, K, T, D), cos/sin (B, T, D) -> rotated q, k."""
    if use_triton(q) and not (cos.requires_grad or sin.requires_grad):  # the kernel gives cos/sin no grad
        return _rotary.rotary_triton(q, k, cos, sin)
    return rotary_ref(q, k, cos, sin)


def swiglu(gate, up):
    """silu(gate) * up, same shapes."""
    if use_triton(gate):
        return _swiglu.swiglu_triton(gate, up)
    return swiglu_ref(gate, up)


UNIFORM_GRAD_MIN_VOCAB = 32768  # from here SFT takes the uniform-gradient path (bench/logprobs.py --sft on CPU:
#   1.07-1.13x the streaming path's speed at V = 32,768 and 151,936, where the lm_head is most of a step). Below,
#   the lm_head is a small part of a step and the two paths' times differ within noise (0.97-1.2x at V = 1,600),
#   so the streaming path stays, and with it the embedded default's recorded runs (V = 1,600) bit for bit.


def token_logprobs(hidden, weight, targets, temperature: float = 1.0, uniform_grad: bool = False):
    """hidden (..., C) @ weight (V, C).T -> (log-prob of targets (...), entropy (...)), fp32, never holding
    (N, V) logits; differentiable through both outputs w.r.t. hidden and weight. Targets must be in [0, V).

    uniform_grad: the caller's loss gives every token's log-prob the same gradient and the entropy none (SFT's
    mean negative log-likelihood). Where the Triton kernels do not run and V >= UNIFORM_GRAD_MIN_VOCAB, the
    gradients are then made in the forward (three lm_head matmuls instead of four); any other loss is still
    differentiated exactly, only slower."""
    lead = hidden.shape[:-1]
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if use_triton(h) and h.shape[0] > 0:
        logp, ent = _logprobs.token_logprobs_triton(h, weight, y, temperature)
    elif uniform_grad and weight.shape[0] >= UNIFORM_GRAD_MIN_VOCAB and h.shape[0] > 0:
        logp, ent = _logprobs.token_logprobs_uniform_grad(h, weight, y, temperature)
    else:
        logp, ent = token_logprobs_ref(h, weight, y, temperature)
    return logp.view(lead), ent.view(lead)


def attention(q, k, v, mask=None, is_causal=False, cu_seqlens=None, max_seqlen=None):
    """q (B, H, T, D), k/v (B, K, S, D) -> (B, H, T, D); see kernels/attention.py for the mask forms."""
    if use_flash(q):
        return attention_flash(q, k, v, mask, is_causal, cu_seqlens, max_seqlen)
    return attention_ref(q, k, v, mask, is_causal)


__all__ = ["attention", "token_logprobs", "rms_norm", "rotary", "swiglu", "cu_seqlens_from_doc_ids", "use_triton",
           "use_flash", "mode", "HAS_TRITON", "HAS_FLASH_ATTN", "token_logprobs_naive"]
