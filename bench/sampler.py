"""Sampler throughput: psyche's KV-cache sampler vs transformers `generate`, same weights, same prompts.

Greedy, the same number of new tokens for every row (no stop tokens), all in this process. Prints, as it goes,
transformers' tok/s, then for each psyche path (--paths: eager, static, graph, compiled) the first call's time
(the graph path captures, the compiled one compiles, each shape once), a call 40 tokens longer (a new cache
bucket: a new shape), the steady tok/s, the ratio to transformers, and the decode step time against the
memory-bandwidth bound (the bytes of all weights read once per step, over a copy bandwidth measured in this run
and the device's HBM peak).

    python bench/sampler.py                 # both configurations, CPU (or CUDA when present)
    python bench/sampler.py --config tiny --dtype bfloat16
    python bench/sampler.py --config 0.5b --batch 64 --new-tokens 256 --repeats 1   # a GPU's figures
    python bench/sampler.py --config 7b --batch 1 --new-tokens 128 --no-hf --paths graph

The decode step time is a whole call's time less a 1-token call's (prefill and setup), per new token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from psyche.model_config import PRESETS, ModelConfig
from psyche.model import build_model
from psyche.sampler import generate

CONFIGS = {
    # overhead-bound: every kernel is tiny, Python and launch costs dominate
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
    # bandwidth-bound: Qwen2.5-0.5B shapes with 4 layers; the 151,936-row tied embedding dominates
    "0.5b-4l": {**PRESETS["qwen2.5-0.5b"], "num_hidden_layers": 4},
    # Qwen2.5-0.5B's shapes whole (24 layers): the GPU figures (bash bench/gpu_check.sh)
    "0.5b": PRESETS["qwen2.5-0.5b"],
    # Qwen2.5-7B's shapes (15 GB in bf16): batch 1 against the HBM bound, on a GPU
    "7b": PRESETS["qwen2.5-7b"],
}
DEFAULT = ("tiny", "0.5b-4l")  # what `--config all` runs
# HBM peak bandwidth (bytes/s) by a substring of torch.cuda.get_device_name()
PEAK_BW = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12, "A100": 1.555e12}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, dtype, nbytes=256 << 20) -> float:
    """Bytes per second moved by a large tensor copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def peak_bandwidth(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BW.items() if key in name), None)


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hf_twin(model, cfg, dtype, device):
    import transformers

    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "torch_dtype"})
    hf = transformers.Qwen2ForCausalLM(hf_cfg).to(device=device).eval()
    hf.load_state_dict(model.state_dict(), strict=False)  # tied lm_head comes from the embedding
    hf.tie_weights()
    for prm in hf.parameters():  # parameters only: the rotary inv_freq buffer stays fp32, as in psyche
        prm.data = prm.data.to(dtype)
    return hf


def run(name, device, dtype, batch, prompt_len, new_tokens, repeats, paths=("eager", "graph"), with_hf=True):
    """One configuration: each psyche path's first call (capture or compile, and a new cache bucket 40 tokens
    longer), its steady throughput and decode step against the bandwidth bound, and transformers'."""
    cfg = ModelConfig(**CONFIGS[name], max_position_embeddings=4096, torch_dtype=str(dtype).removeprefix("torch."))
    model = build_model(cfg, device=device, dtype=dtype, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (prompt_len - 3 * (i % 8),), generator=g).tolist()
               for i in range(batch)]
    n_tok = batch * new_tokens
    print(f"[{name}] {cfg.num_params() / 1e6:.1f}M params, {dtype}, {device.type}, batch {batch}, "
          f"prompt ~{prompt_len}, {new_tokens} new tokens", flush=True)

    def ours(path, k=new_tokens):
        return generate(model, prompts, max_new_tokens=k, temperature=0, path=path)

    ref, t_hf = None, None
    if with_hf:
        hf = hf_twin(model, cfg, dtype, device)
        T = max(len(p) for p in prompts)  # transformers wants left padding for a ragged batch
        ids = torch.zeros(batch, T, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, T - len(p):], att[i, T - len(p):] = torch.tensor(p), 1
        ids, att = ids.to(device), att.to(device)

        def theirs(k=new_tokens):
            with torch.no_grad():
                return hf.generate(ids, attention_mask=att, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)

        ref = theirs()[:, T:].cpu()  # (also warms it up)
        t_hf = timed(theirs, device, repeats)
        print(f"  transformers     {n_tok / t_hf:10.1f} tok/s  ({t_hf * 1e3:.1f} ms)", flush=True)
        del hf
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied head counted once
    bw, peak = copy_bandwidth(device, dtype), peak_bandwidth(device)
    out = {}
    for path in paths:
        sync(device)
        t0 = time.perf_counter()
        first = ours(path)  # capture / compile of this shape
        sync(device)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours(path, new_tokens + 40)  # a longer call: on the static paths, a new cache bucket
        sync(device)
        t_longer = time.perf_counter() - t0
        t = timed(lambda: ours(path), device, repeats)
        step = (t - timed(lambda: ours(path, 1), device, repeats)) / (new_tokens - 1)
        same = "" if ref is None else f"; greedy tokens equal transformers': {torch.equal(first.tokens.cpu(), ref)}"
        line = (f"  psyche {path:<9} {n_tok / t:10.1f} tok/s  ({t * 1e3:.1f} ms; first call {t_first:.2f} s, "
                f"a call 40 tokens longer {t_longer:.2f} s{same})")
        if t_hf:
            line += f"; {t_hf / t:.2f}x transformers"
        print(line, flush=True)
        line = (f"    decode step {step * 1e3:.3f} ms; weights {weight_bytes / 1e6:.0f} MB: at the copy bandwidth "
                f"measured here ({bw / 1e9:.0f} GB/s) {weight_bytes / bw * 1e3:.3f} ms -> "
                f"{weight_bytes / bw / step:.0%} of that bound")
        if peak:
            line += f"; at the HBM peak ({peak / 1e12:.2f} TB/s) {weight_bytes / peak / step:.0%}"
        print(line, flush=True)
        out[path] = {"ratio": (t_hf / t) if t_hf else None, "bound_frac": weight_bytes / (peak or bw) / step,
                     "first_s": t_first, "longer_s": t_longer}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paths", default="eager,graph", help="psyche paths to time: eager, static, graph, compiled")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. at 7B, for time and memory)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    for name in DEFAULT if args.config == "all" else [args.config]:
        run(name, device, dtype, args.batch, args.prompt_len, args.new_tokens, args.repeats,
            tuple(args.paths.split(",")), not args.no_hf)


if __name__ == "__main__":
    main()
