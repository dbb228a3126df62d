"""Attention: SDPA (any device) and flash-attn (CUDA, when installed), one signature.

q (B, H, T, D); k, v (B, K, S, D) with H a multiple of K (grouped-query attention).
"""

import torch
import torch.nn.functional as F

_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa came in 2.5


def attention_ref(q, k, v, mask=None, is_causal=False, cu_seqlens=None, max_seqlen=None):
    """SDPA. `mask` is bool (B, 1, T, S), True where a query may attend; `cu_seqlens` is ignored (the mask
    already encodes packed samples)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and not _SDPA_HAS_GQA:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    kw = {"enable_gqa": n_rep > 1} if _SDPA_HAS_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, **kw)


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor):
    """Packed rows (B, T) of document ids -> (cu_seqlens int32 (n_docs + 1,), max_seqlen) over the flattened
    batch, as flash-attn's varlen kernels take them. A new document starts wherever the id changes or a
    row starts."""
    B, T = doc_ids.shape
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = start.flatten().nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def attention_flash(q, k, v, mask=None, is_causal=False, cu_seqlens=None, max_seqlen=None):
    """flash-attn 2: causal, or varlen over packed samples. Falls back to SDPA for explicit masks
    (cached decode with ragged rows, padded batches)."""
    import flash_attn

    B, H, T, D = q.shape
    if cu_seqlens is not None:
        out = flash_attn.flash_attn_varlen_func(
            q.transpose(1, 2).reshape(B * T, H, D), k.transpose(1, 2).reshape(B * T, -1, D),
            v.transpose(1, 2).reshape(B * T, -1, D), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        return out.view(B, T, H, D).transpose(1, 2)
    if mask is None:
        out = flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         causal=is_causal)
        return out.transpose(1, 2)
    return attention_ref(q, k, v, mask=mask, is_causal=is_causal)
