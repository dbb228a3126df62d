"""The arithmetic the benchmarks report, checked against an independent count."""

import sys
from pathlib import Path

import torch

from helpers import tiny_config
from psyche.model import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_sft_mfu_flop_count_equals_torchs_flop_counter():
    """bench/sft_mfu.py's model FLOPs per token against torch.utils.flop_counter on a forward of the model:
    the counter sees every matmul (lm_head included); CPU attention kernels it may not count, or count over all
    T x T scores, where the bench counts causal attention (half of them). The training step is 3x the
    forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from sft_mfu import QWEN25_1_5B, flops_per_token

    cfg = tiny_config(vocab=96)
    B, T = 2, 16
    m = build_model(cfg, seed=0).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(torch.randint(0, 96, (B, T)))
    causal = cfg.num_hidden_layers * 2 * 2 * (T / 2) * cfg.hidden_size  # per token, forward: QK^T and PV
    matmuls = flops_per_token(cfg, T) / 3 - causal
    assert fc.get_total_flops() / (B * T) in (matmuls, matmuls + 2 * causal)

    from psyche.model_config import ModelConfig

    big = ModelConfig(**QWEN25_1_5B)  # 1.54B parameters: ~6 N per token at short sequences
    assert abs(flops_per_token(big, 1) / 6 / 1.54e9 - 1) < 0.01
