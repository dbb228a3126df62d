"""RMSNorm: y = w * x / sqrt(mean(x^2) + eps), statistics in fp32 (as Qwen2 does), output in x's dtype."""

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)
