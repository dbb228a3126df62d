"""SFT training step benchmarks, each against a reference measured in the same run.

1. step: psyche's fwd + bwd + AdamW step vs transformers.Qwen2ForCausalLM with the same config, batch and
   optimizer: tokens/s (both in one process, steps alternating, so a busy machine slows both alike) and peak
   memory (each side in its own fresh process, so one side's allocator cache cannot hide the other's peak;
   peak above what model, optimizer and a warm-up step hold: CPU peak RSS via /proc, CUDA
   max_memory_allocated). CPU fp32; CUDA bf16 autocast with fp32 master weights for both.
2. fsdp: per-rank bytes of parameters + optimizer state under 2-rank FSDP2 (torchrun, gloo/nccl) vs 1 rank.
3. packing: one epoch of the same synthetic SFT samples, packed (block-diagonal attention, doc_ids) vs
   length-grouped right padding: useful (non-pad) tokens/s on the tiny preset.

    python bench/sft.py                         # all three, CPU (CUDA when available)
    python bench/sft.py --parts step --batch 8 --seq 512 --hidden 512
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MiB = 1 << 20


def model_config(a):
    from psyche.model_config import ModelConfig

    return ModelConfig(hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4, num_hidden_layers=a.layers,
                       num_attention_heads=a.hidden // 64, num_key_value_heads=max(1, a.hidden // 256),
                       vocab_size=a.vocab, tie_word_embeddings=False, max_position_embeddings=4096,
                       torch_dtype="float32")


# ---- 1. one training step, psyche vs transformers (worker runs in its own process) ----

def _rss_kb(field="VmRSS") -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _make(impl, cfg, device):
    """A training step for one implementation, same config, fp32 master weights. psyche_ce: psyche's model with
    full (N, V) logits and cross-entropy instead of its streaming log-prob path (isolates the loss path)."""
    if impl in ("psyche", "psyche_ce"):
        from psyche.model import build_model

        model = build_model(cfg, device=device, dtype=torch.float32, seed=0).train()

        def loss_fn(x, targets):
            if impl == "psyche_ce":
                logits = model(x)  # (B, T, V)
                return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            logp, _ = model(x, targets=targets, uniform_grad=True)  # (B, T), as psyche/sft.py calls it
            return -logp.sum() / (targets >= 0).sum()
    else:
        import transformers

        hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "torch_dtype"})
        hf_cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(hf_cfg).to(device).train()

        def loss_fn(x, targets):
            return model(input_ids=x, labels=x).loss  # HF shifts the labels itself: the same T - 1 targets
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(x, targets):
        with amp:
            loss = loss_fn(x, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def _batch(a, cfg, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g).to(device)
    return x, torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], 1)  # (B, T) next token, last ignored


def time_worker(a) -> dict:
    """Both implementations in one process, steps alternating (psyche, hf, psyche, ...): a neighbour's load
    hits both alike. Median step time of each."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_config(a)
    x, targets = _batch(a, cfg, device)
    steps = {impl: _make(impl, cfg, device) for impl in ("psyche", "hf", "psyche_ce")}
    return alternating_medians(steps, x, targets, a.warmup, a.steps) | {"device": str(device)}


def alternating_medians(steps: dict, x, targets, warmup: int, n: int) -> dict:
    """{name: median seconds} of the training steps `steps` (name -> step(x, targets)), run in turn (a, b, a,
    b, ...) for warmup + n rounds, the first `warmup` not timed."""
    times = {impl: [] for impl in steps}
    for i in range(warmup + n):
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step(x, targets)
            if i >= warmup:
                times[impl].append(time.perf_counter() - t0)
    return {impl: statistics.median(t) for impl, t in times.items()}


def mem_worker(a) -> dict:
    """Peak memory of one step of one implementation, in a fresh process, above what is resident after the
    model, the optimizer and a warm-up step (CPU: peak RSS reset via /proc; CUDA: max_memory_allocated)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_config(a)
    x, targets = _batch(a, cfg, device)
    step = _make(a.impl, cfg, device)
    step(x, targets)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        base = _rss_kb() * 1024
    step(x, targets)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kb("VmHWM") * 1024
    return {"above_base_mib": (peak - base) / MiB, "peak_mib": peak / MiB}


def _worker(a, kind, impl=None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, *_shape_args(a)] + (["--impl", impl] if impl else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_step(a):
    print(f"== step: psyche vs transformers.Qwen2ForCausalLM (sdpa), fwd+bwd+AdamW, same config, batch and "
          f"optimizer; B={a.batch} T={a.seq} hidden={a.hidden} layers={a.layers} vocab={a.vocab}")
    t = _worker(a, "time")
    mem = {impl: _worker(a, "mem", impl) for impl in ("psyche", "hf")}
    print(f"time: median of {a.steps} alternating steps after {a.warmup}, one process; memory: one step in a "
          f"fresh process each, peak above the resident model + optimizer [{t['device']}]")
    for impl in ("psyche", "hf"):
        print(f"{impl:>7}: {a.batch * a.seq / t[impl]:9.0f} tok/s  {t[impl] * 1e3:8.1f} ms/step  "
              f"step peak {mem[impl]['above_base_mib']:8.1f} MiB  (process peak {mem[impl]['peak_mib']:.0f} MiB)")
    print(f"ratio psyche/hf: speed {t['hf'] / t['psyche']:.2f}x (goal >= 1.0), step peak memory "
          f"{mem['psyche']['above_base_mib'] / mem['hf']['above_base_mib']:.2f}x (goal <= 1.0)")
    print(f"(psyche's model with full logits + cross-entropy instead of the streaming log-prob path: "
          f"{a.batch * a.seq / t['psyche_ce']:.0f} tok/s, {t['hf'] / t['psyche_ce']:.2f}x hf)")


def _shape_args(a):
    return ["--batch", str(a.batch), "--seq", str(a.seq), "--hidden", str(a.hidden), "--layers", str(a.layers),
            "--vocab", str(a.vocab), "--steps", str(a.steps), "--warmup", str(a.warmup)]


# ---- 2. per-rank parameter + optimizer bytes, FSDP2 vs one rank ----

def _state_bytes(model, opt) -> int:
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    n = sum(local(p).numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(local(v).numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


def _one_step(model, opt, vocab, device):
    x = torch.randint(0, vocab, (2, 16), device=device)
    logp, _ = model(x[:, :-1], targets=x[:, 1:])
    (-logp.mean()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def fsdp_worker(a):
    from psyche import dist
    from psyche.config import OptimSection
    from psyche.run import build_model_for_training, build_optimizer

    rank, world, device = dist.init_distributed()
    model = build_model_for_training(Path(a.init), device)
    opt = build_optimizer(model, OptimSection())
    _one_step(model, opt, model.config.vocab_size, device)
    sizes = dist.gather_object(_state_bytes(model, opt))
    if dist.is_main():
        print(json.dumps({"world": world, "bytes": sizes, "sharded": dist.is_sharded(model)}))
    dist.cleanup()


def bench_fsdp(a):
    from psyche.config import OptimSection
    from psyche.run import build_model_for_training, build_optimizer
    from psyche.weights import init_checkpoint

    cfg = model_config(a)
    with tempfile.TemporaryDirectory() as tmp:
        init = init_checkpoint(Path(tmp) / "init", "tiny", seed=0, **{k: getattr(cfg, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "tie_word_embeddings")})
        model = build_model_for_training(init, torch.device("cpu"))
        opt = build_optimizer(model, OptimSection())
        _one_step(model, opt, cfg.vocab_size, torch.device("cpu"))
        one = _state_bytes(model, opt)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "fsdp", "--init", str(init)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        two = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"== fsdp: parameters + AdamW state per rank ({cfg.num_params():,} parameters, fp32)")
    print(f"1 rank: {one / MiB:.2f} MiB;  2-rank FSDP2: " + ", ".join(f"rank {i} {b / MiB:.2f} MiB"
                                                               for i, b in enumerate(two["bytes"])))
    print(f"ratio max per-rank / 1 rank: {max(two['bytes']) / one:.3f}x (goal <= 0.55)")


# ---- 3. packing vs length-grouped padding ----

def bench_packing(a):
    for max_len in map(int, str(a.max_length).split(",")):
        _bench_packing(a, max_len)


def _bench_packing(a, max_len):
    """fwd + bwd (gradients accumulate; the optimizer step is the same for both and left out) over every
    micro-batch of one epoch. Padded runs twice: with the same rows per micro-batch as packed, and with as
    many rows as give the same tokens per micro-batch."""
    import numpy as np

    from psyche.model_config import preset
    from psyche.data import SFTBatches, Samples
    from psyche.model import build_model

    rng = np.random.default_rng(0)
    n = a.samples
    lengths = np.clip(rng.lognormal(np.log(max_len / 5), 0.7, n).astype(int), 16, max_len)  # long-tailed
    cfg = preset("tiny")
    ids = [rng.integers(0, cfg.vocab_size, L).astype(np.int32) for L in lengths]
    mask = [np.r_[np.zeros(L // 2, bool), np.ones(L - L // 2, bool)] for L in lengths]
    samples = Samples(ids, mask, ["synthetic"] * n, n, 0, 0)
    same_tokens = max(a.micro, a.micro * max_len // int(lengths.mean()))
    print(f"== packing: fwd+bwd over one epoch (1 thread, CPU time, best of {a.repeat} interleaved rounds) of {n} samples (lengths {lengths.min()}-{lengths.max()}, "
          f"mean {lengths.mean():.0f}), max_length {max_len}, tiny preset, CPU fp32")
    model = build_model(cfg, seed=0).train()

    def fwd_bwd(m):
        logp, _ = model(m.input_ids, doc_ids=m.doc_ids, targets=m.labels)
        (-logp.sum()).backward()

    variants = {}
    for name, packing, micro in (("packed", True, a.micro), ("padded", False, a.micro),
                                 ("padded", False, same_tokens)):
        b = SFTBatches(samples, global_batch=micro, micro_batch=micro, world_size=1, packing=packing,
                       max_length=max_len, pad_id=0, seed=0)
        variants[(name, micro)] = [b.micro_batches(s, 0)[0] for s in range(b.steps_per_epoch)]
    # One thread and process CPU time: on a shared machine wall time mostly measures the neighbours.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = {k: float("inf") for k in variants}
    for _ in range(a.repeat):  # interleaved rounds, best of
        for k, mbs in variants.items():
            fwd_bwd(mbs[0])  # warm-up
            t0 = time.process_time()
            for m in mbs:
                fwd_bwd(m)
            best[k] = min(best[k], time.process_time() - t0)
    torch.set_num_threads(threads)
    res = {}
    for (name, micro), mbs in variants.items():
        dt = best[(name, micro)]
        useful, total = sum(m.n_tokens for m in mbs), sum(m.input_ids.numel() for m in mbs)
        res[(name, micro)] = useful / dt
        print(f"{name} x{micro:<3d} rows: {len(mbs):4d} micro-batches, {useful / dt:8.0f} useful tok/s, "
              f"{dt:6.2f} CPU s, pad {1 - useful / total:5.1%}")
    pk = res[("packed", a.micro)]
    print(f"ratio packed / padded useful tok/s: {pk / res[('padded', a.micro)]:.2f}x at {a.micro} rows per "
          f"micro-batch, {pk / res[('padded', same_tokens)]:.2f}x at equal tokens per micro-batch")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="step,fsdp,packing")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3, help="rounds per measurement (best kept)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--max-length", default="128,512", help="comma-separated: one packing run each")
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--worker", choices=["time", "mem", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=["psyche", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--init", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker in ("time", "mem"):
        print(json.dumps((time_worker if a.worker == "time" else mem_worker)(a)))
        return
    if a.worker == "fsdp":
        fsdp_worker(a)
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, CUDA: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    for part in a.parts.split(","):
        {"step": bench_step, "fsdp": bench_fsdp, "packing": bench_packing}[part](a)


if __name__ == "__main__":
    main()
