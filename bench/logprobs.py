"""Peak memory and time of per-token log-probs + entropy through the lm_head, forward + backward.

Compares `kernels.token_logprobs` (on CPU the streaming PyTorch reference, on CUDA the Triton kernels)
with the naive path that builds (N, V) fp32 logits, at Qwen2.5's V = 151,936. Both outputs get a random
upstream gradient, as in GRPO (policy term on the log-probs, bonus on the entropy); hidden and weight both
need grad (the policy's lm_head is trained). Every run is a fresh subprocess, so that its peak is
its own: on CPU the peak resident set size above what the inputs already hold (Linux: VmHWM after a reset),
on CUDA torch's peak allocated bytes above the inputs. Gradients are part of the peak (they are outputs);
"working" is the peak less the gradients.

    python bench/logprobs.py                              # N=2048, C=896 (Qwen2.5-0.5B); fp32 CPU, bf16 CUDA
    python bench/logprobs.py --tokens 8192 --hidden 3584  # 7B's hidden size
    python bench/logprobs.py --sft --vocab 32768          # SFT's loss; with the uniform-gradient path
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

MiB = 1 << 20


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(args) -> dict:
    """In the child: build inputs, run one path once, report its peak bytes above the inputs and its time."""
    from psyche import kernels
    from psyche.kernels.logprobs import token_logprobs_naive, token_logprobs_ref, token_logprobs_uniform_grad

    fn = {"naive": token_logprobs_naive, "kernels": kernels.token_logprobs, "reference": token_logprobs_ref,
          "uniform": token_logprobs_uniform_grad}[args.one]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    N, C, V = args.tokens, args.hidden, args.vocab
    hidden = (torch.randn(N, C, device=device, generator=gen) * 1.0).to(dtype).requires_grad_()
    weight = (torch.randn(V, C, device=device, generator=gen) * 0.02).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device, generator=gen)
    g_logp, g_ent = torch.randn(N, device=device, generator=gen), torch.randn(N, device=device, generator=gen)

    def step():
        hidden.grad = weight.grad = None
        logp, ent = fn(hidden, weight, targets, args.temperature)
        if args.sft:
            (-logp.sum() / N).backward()  # SFT's loss: the same gradient for every log-prob, none for the entropy
        else:
            (logp * g_logp + ent * g_ent).sum().backward()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        step()  # warm-up: Triton JIT and cuBLAS start-up stay out of the timed step
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _rss("VmRSS")
    sync()
    t = time.perf_counter()
    step()
    sync()
    elapsed = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss("VmHWM")) - base
    grads = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    return {"peak": peak, "grads": grads, "time": elapsed}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--repeat", type=int, default=2,
                    help="rounds; each round runs every path once, in turn (a shared machine's load hits all paths "
                         "alike); the best time and the largest peak are reported")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (torch.set_num_threads); on a shared machine 1 is the fairest: OpenMP "
                         "threads that wait for a descheduled sibling slow small ops down several times")
    ap.add_argument("--sft", action="store_true",
                    help="SFT's loss (-mean logp) instead of random gradients on both outputs; adds the uniform-"
                         "gradient path (kernels.logprobs.token_logprobs_uniform_grad), which SFT takes at large V")
    ap.add_argument("--one", choices=["naive", "kernels", "reference", "uniform"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args)))
        return
    if args.device == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        sys.exit("CPU peak memory is read from /proc (Linux only)")

    from psyche import kernels

    paths = ["naive", "kernels"] + (["reference"] if args.device == "cuda" else [])
    if args.sft:
        paths = ["naive", "reference", "uniform"] + (["kernels"] if args.device == "cuda" else [])
    what = {"naive": "naive (N, V) fp32 logits", "uniform": "token_logprobs_uniform_grad (grads in forward)",
            "kernels": "kernels.token_logprobs (" + ("Triton" if kernels.use_triton(torch.empty(0, device=args.device))
                                                     else "streaming reference") + ")",
            "reference": "token_logprobs_ref (streaming PyTorch)"}
    threads = torch.get_num_threads()
    print(f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else
                                     f" ({threads} threads)")
          + f", {args.dtype}, N={args.tokens} C={args.hidden} V={args.vocab}, forward + backward of "
          + ("SFT's loss -mean(logp)" if args.sft else "logp and entropy") + f", best of {args.repeat}")
    runs = {p: [] for p in paths}
    for _ in range(args.repeat):
        for p in paths:
            cmd = [sys.executable, __file__, "--one", p] + [f"--{k}={v}" for k, v in (
                ("tokens", args.tokens), ("hidden", args.hidden), ("vocab", args.vocab),
                ("temperature", args.temperature), ("device", args.device), ("dtype", args.dtype),
                ("threads", torch.get_num_threads()))] + (["--sft"] if args.sft else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[p].append(json.loads(out.strip().splitlines()[-1]))
    res = {p: {"peak": max(r["peak"] for r in rs), "grads": rs[0]["grads"], "time": min(r["time"] for r in rs),
               "median": statistics.median(r["time"] for r in rs),
               "times": " ".join(f"{r['time']:.2f}" for r in rs)} for p, rs in runs.items()}
    grads = res["naive"]["grads"]
    print(f"(one (N, V) fp32 logits tensor: {args.tokens * args.vocab * 4 / MiB:.0f} MiB; "
          f"the gradients: {grads / MiB:.0f} MiB)")
    print(f"{'path':<44} {'peak MiB':>9} {'working MiB':>12} {'time s':>8}   every run's time")
    for p in paths:
        r = res[p]
        print(f"{what[p]:<44} {r['peak'] / MiB:>9.0f} {(r['peak'] - grads) / MiB:>12.0f} {r['time']:>8.2f}   "
              f"{r['times']}")
    n = res["naive"]
    for p in paths[1:]:
        r = res[p]
        work = (r["peak"] - grads) / (n["peak"] - grads)
        print(f"{p} / naive: peak {r['peak'] / n['peak']:.3f}, working {work:.3f}, "
              f"time {r['time'] / n['time']:.2f} (best) {r['median'] / n['median']:.2f} (median)"
              f"  (goal: peak <= 0.125 at time <= 1.2)")

if __name__ == "__main__":
    main()
