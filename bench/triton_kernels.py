"""Each Triton kernel vs its PyTorch reference vs torch.compile of the reference, forward + backward.

Shapes are Qwen2.5-7B's for one micro-batch of B x T tokens (hidden 3584, MLP 18944, 28 query heads and 4 kv
heads of 128, vocab 152,064), bf16. Prints the median time of forward + backward and the peak memory above
the inputs for each, and the Triton kernel's ratios to the reference and to the compiled reference. All
runs in this process, on one GPU. For the log-prob op the compiled baseline is the naive (N, V) logits path
(compiling the streaming reference's Python loops would unroll them).

    python bench/triton_kernels.py                      # needs a CUDA GPU; on CPU it says so and exits 0
    python bench/triton_kernels.py --tokens 4096 --ops rms_norm,token_logprobs
    TRITON_INTERPRET=1 python bench/triton_kernels.py --device cpu --small   # smoke-tests this script only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

MiB = 1 << 20
SHAPES = {"full": dict(C=3584, I=18944, H=28, K=4, D=128, V=152064),
          "small": dict(C=96, I=200, H=6, K=2, D=16, V=1000)}


def cases(N, B, s, dtype, device):
    """name -> (make inputs, {variant: fn}); every fn maps the inputs to a tensor or a tuple of tensors."""
    import importlib

    # the modules, not kernels' dispatching functions of the same names
    logprobs, rmsnorm, rotary, swiglu = (importlib.import_module(f"psyche.kernels.{m}")
                                         for m in ("logprobs", "rmsnorm", "rotary", "swiglu"))

    T = N // B
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype).requires_grad_(grad)

    def rope_inputs():
        pos = torch.arange(T, device=device).expand(B, T)
        inv = 1.0 / 1e6 ** (torch.arange(0, s["D"], 2, device=device, dtype=torch.float32) / s["D"])
        emb = torch.cat([pos[..., None].float() * inv] * 2, dim=-1)
        q = rand(B, T, s["H"], s["D"]).detach().transpose(1, 2).requires_grad_()  # the model's layout
        k = rand(B, T, s["K"], s["D"]).detach().transpose(1, 2).requires_grad_()
        return q, k, emb.cos().to(dtype), emb.sin().to(dtype)

    return {
        "rms_norm": (lambda: (rand(B, T, s["C"]), (1 + rand(s["C"], scale=0.1, grad=False)).requires_grad_(), 1e-6),
                     {"reference": rmsnorm.rms_norm_ref, "triton": getattr(rmsnorm, "rms_norm_triton", None)}),
        "rotary": (rope_inputs, {"reference": rotary.rotary_ref, "triton": getattr(rotary, "rotary_triton", None)}),
        "swiglu": (lambda: (rand(B, T, s["I"]), rand(B, T, s["I"])),
                   {"reference": swiglu.swiglu_ref, "triton": getattr(swiglu, "swiglu_triton", None)}),
        "token_logprobs": (
            lambda: (rand(N, s["C"]), rand(s["V"], s["C"], scale=0.02),
                     torch.randint(0, s["V"], (N,), device=device, generator=g), 1.0),
            {"reference": logprobs.token_logprobs_ref, "naive": logprobs.token_logprobs_naive,
             "triton": getattr(logprobs, "token_logprobs_triton", None)}),
    }


def measure(fn, inputs, device, iters):
    """(median seconds of forward + backward, peak bytes above what was allocated before)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        for x in inputs:
            if isinstance(x, torch.Tensor):
                x.grad = None
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o for o in out], [torch.ones_like(o) for o in out])

    step()  # warm-up (compiles, autotunes, caches)
    peak = None
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch (B x T)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ops", default="rms_norm,rotary,swiglu,token_logprobs")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a smoke test of this script)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/triton_kernels.py needs a CUDA GPU (none found): nothing to measure.")
        return 0
    from psyche import kernels

    if not kernels.HAS_TRITON:
        print("triton is not installed: nothing to measure.")
        return 0
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES["small" if args.small else "full"]
    N = args.tokens if not args.small else 64
    B = args.batch if not args.small else 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.dtype}, {N} tokens (B={B}), shapes {shapes}; "
          f"forward + backward, median of {args.iters}")
    print(f"{'op':<16} {'variant':<18} {'time ms':>9} {'peak MiB':>9}")
    for op, (make, variants) in cases(N, B, shapes, dtype, device).items():
        if op not in args.ops.split(","):
            continue
        ref_name = "naive" if "naive" in variants else "reference"
        if not args.no_compile:
            variants[f"compiled {ref_name}"] = torch.compile(variants[ref_name])
        res = {}
        for v, fn in variants.items():
            if fn is None:
                continue
            try:
                res[v] = measure(fn, make(), device, args.iters)
            except Exception as e:  # e.g. compile or out of memory: report and go on
                print(f"{op:<16} {v:<18} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            t, peak = res[v]
            print(f"{op:<16} {v:<18} {t * 1e3:>9.3f} {peak / MiB if peak is not None else float('nan'):>9.1f}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "triton" in res:
            tt, tp = res["triton"]
            for base in [v for v in res if v != "triton"]:
                bt, bp = res[base]
                mem = f", peak {tp / bp:.3f}x" if tp is not None and bp else ""
                print(f"{'':<16} triton / {base}: time {tt / bt:.2f}x{mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
