"""SwiGLU activation of the Qwen2 MLP: silu(gate) * up."""

import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
