"""SFT model-FLOPs utilisation at Qwen2.5-1.5B's shapes (random weights, the real vocabulary of 151,936), one
device: psyche's training step (fwd + bwd + AdamW, fp32 master weights; bf16 autocast on CUDA) against
transformers.Qwen2ForCausalLM doing the same step, and both against the device's peak and a plain GEMM
measured in this run.

    python bench/sft_mfu.py                       # CUDA: all 28 layers, 4 x 2048 tokens per step
    python bench/sft_mfu.py --layers 2 --seq 256  # CPU-sized: the 1.5B widths and vocabulary, 2 layers

Model FLOPs per token (the PaLM count, attention causal): forward 2 x (matmul weights, lm_head included) +
2 x 2 x T/2 x hidden per layer for QK^T and PV; a training step is 3x the forward. MFU = model FLOPs per
second / peak. The peak is the vendor's dense bf16 figure for a known GPU (--peak-tflops overrides it); the
"GEMM" column divides by the rate of one large bf16 (CPU: fp32) matmul measured here instead, which is what
the device delivers on the easiest work there is. Both steps run in this process, alternating step by step
(--one-at-a-time: each model built, timed and freed before the next, with its peak memory); times are
medians after the warm-up steps.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of torch.cuda.get_device_name()
PEAKS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0,
         "L4": 121.0}
QWEN25_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)


def flops_per_token(cfg, T: int) -> float:
    """Training FLOPs per token of a step over sequences of T tokens (see the module docstring)."""
    C, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = C * C + 2 * C * kv + C * C + 3 * C * I  # q, k, v, o, gate/up/down
    forward = 2 * (L * per_layer + V * C) + L * 2 * 2 * (T / 2) * C
    return 3 * forward


def device_peak(device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, f"{override:g} TFLOP/s (given)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in PEAKS.items():
            if key in name:
                return tf * 1e12, f"{tf:g} TFLOP/s dense bf16 ({name})"
        return None, f"unknown for {name}: pass --peak-tflops"
    return None, "none for a CPU: see the GEMM column"


def gemm_rate(device, dtype, M: int, K: int, N: int, repeat: int = 5) -> float:
    """FLOP/s of the best of `repeat` (M, K) @ (K, N) matmuls."""
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = torch.randn(K, N, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * M * K * N / best


def time_steps(impls: list[str], cfg, a, device) -> dict:
    """{impl: (median step seconds, peak GiB on CUDA or nan)}. Together (the default): every model built first,
    then steps alternating (psyche, hf, psyche, ...), so a neighbour's load slows both alike; the peak is not
    per implementation then. --one-at-a-time: each built, timed and freed before the next (less memory)."""
    from sft import _batch, _make, alternating_medians  # the same step as bench/sft.py's (fp32 master weights,
    #                                                       bf16 autocast on CUDA), the same batch

    x, targets = _batch(a, cfg, device)
    groups = [[i] for i in impls] if a.one_at_a_time else [impls]
    out = {}
    for group in groups:
        steps = {impl: _make(impl, cfg, device) for impl in group}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = alternating_medians(steps, x, targets, a.warmup, a.steps)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" and len(group) == 1 else \
            float("nan")
        out |= {impl: (t, peak) for impl, t in times.items()}
        del steps
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="default: 28 on CUDA, 2 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 on CUDA, 1 on CPU")
    ap.add_argument("--seq", type=int, default=None, help="default: 2048 on CUDA, 256 on CPU")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--impls", default="psyche,hf")
    ap.add_argument("--one-at-a-time", action="store_true", help="build and time one implementation at a time")
    a = ap.parse_args()
    from psyche.model_config import ModelConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    a.layers = a.layers or (28 if cuda else 2)
    a.batch = a.batch or (4 if cuda else 1)
    a.seq = a.seq or (2048 if cuda else 256)
    cfg = ModelConfig(**{**QWEN25_1_5B, "num_hidden_layers": a.layers}, max_position_embeddings=max(4096, a.seq),
                      torch_dtype="float32")
    fpt = flops_per_token(cfg, a.seq)
    peak, peak_note = device_peak(device, a.peak_tflops)
    gemm_dtype = torch.bfloat16 if cuda else torch.float32
    gemm = gemm_rate(device, gemm_dtype, a.batch * a.seq, cfg.hidden_size, cfg.intermediate_size)
    C, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    n_params = a.layers * (2 * C * C + 2 * C * kv + 3 * C * cfg.intermediate_size) + cfg.vocab_size * C
    print(f"== SFT step at Qwen2.5-1.5B shapes: {a.layers} layers ({n_params / 1e9:.2f}B matmul params), hidden "
          f"{cfg.hidden_size}, vocab {cfg.vocab_size}, B={a.batch} T={a.seq} [{device}"
          f"{', bf16 autocast' if cuda else ', fp32'}]")
    print(f"model FLOPs per token {fpt / 1e9:.2f} GFLOP; peak {peak_note}; plain GEMM "
          f"({a.batch * a.seq} x {cfg.hidden_size} @ {cfg.intermediate_size}, {gemm_dtype}) {gemm / 1e12:.2f} TFLOP/s")
    rows = {}
    for impl, (dt, mem) in time_steps(a.impls.split(","), cfg, a, device).items():
        rate = fpt * a.batch * a.seq / dt
        rows[impl] = dt
        mfu = f"MFU {rate / peak:6.1%}" if peak else "MFU    n/a"
        print(f"{impl:>7}: {a.batch * a.seq / dt:9.0f} tok/s  {dt * 1e3:8.1f} ms/step  {rate / 1e12:7.2f} TFLOP/s  "
              f"{mfu}  {rate / gemm:6.1%} of the GEMM" + (f"  peak {mem:.1f} GiB" if mem == mem else ""))
    if "psyche" in rows and "hf" in rows:
        print(f"ratio psyche/hf speed {rows['hf'] / rows['psyche']:.2f}x" +
              (" (MFU goal on a GPU: >= 40%)" if cuda else ""))


if __name__ == "__main__":
    main()
