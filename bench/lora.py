"""LoRA's memory and decode cost against full fine-tuning, at Qwen2.5-0.5B's shapes on the CPU (random weights).

    python bench/lora.py                  # rank 8 vs full: optimizer state, a training step's peak, GRPO's reference,
                                          # and the decode with the adapters unmerged vs a plain (merged) model
    python bench/lora.py --layers 4       # a quicker look (fewer layers)

Each training figure comes from a fresh process (peak resident memory is per process): the model is built, then
one SFT-like step (forward + backward + AdamW) runs on a batch of B x T tokens; printed are the AdamW state's
bytes, the peak resident memory above the built model, and their ratios LoRA / full. GRPO's reference: full
fine-tuning keeps a second copy of the model for it (its bytes are printed), a LoRA run none (the base with the
adapters off). The decode: generate(path="eager") of the same prompts on the adapted model (unmerged) and on a
plain model of the same shapes (what a merged model costs), best of --repeats, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from psyche.model_config import ModelConfig
from psyche.lora import add_lora
from psyche.model import build_model
cfg = ModelConfig(**json.loads({shape!r}), max_position_embeddings=4096, torch_dtype="float32")
model = build_model(cfg, seed=0).train()
rank = {rank}
if rank:
    add_lora(model, rank, 2.0 * rank)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = torch.randint(0, cfg.vocab_size, ({B}, {T}), generator=torch.Generator().manual_seed(0))
lp, _ = model(x, targets=torch.roll(x, -1, 1))
(-lp.mean()).backward()
opt.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
print(json.dumps(dict(trainable=sum(p.numel() for p in params), state_bytes=state, step_peak_kib=peak - base,
                      model_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))))
"""


def train_figures(shape: dict, rank: int, B: int, T: int) -> dict:
    code = CHILD.format(root=str(ROOT), shape=json.dumps(shape), rank=rank, B=B, T=T)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def decode_ratio(shape: dict, rank: int, batch: int, new: int, repeats: int) -> tuple[float, float]:
    import torch

    sys.path.insert(0, str(ROOT))
    from psyche.model_config import ModelConfig
    from psyche.lora import add_lora
    from psyche.model import build_model
    from psyche.sampler import generate

    cfg = ModelConfig(**shape, max_position_embeddings=4096, torch_dtype="float32")
    plain = build_model(cfg, seed=0).eval()
    adapted = build_model(cfg, seed=0).eval()
    add_lora(adapted, rank, 2.0 * rank)
    prompts = [[(7 * i + j) % cfg.vocab_size for j in range(32)] for i in range(batch)]

    def best(m):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.no_grad():
                generate(m, prompts, max_new_tokens=new, temperature=0.0, path="eager")
            times.append(time.perf_counter() - t)
        return min(times)

    t_plain, t_lora = best(plain), best(adapted)
    return t_plain, t_lora


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from psyche.model_config import PRESETS

    shape = {**PRESETS["qwen2.5-0.5b"], "num_hidden_layers": a.layers}
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"Qwen2.5-0.5B's shapes ({a.layers} layers), CPU, fp32, torch threads {threads}", flush=True)
    full = train_figures(shape, 0, a.batch, a.seq)
    lora = train_figures(shape, a.rank, a.batch, a.seq)
    print(f"trainable parameters: full {full['trainable']:,}, LoRA rank {a.rank} {lora['trainable']:,} "
          f"({lora['trainable'] / full['trainable']:.2%})")
    print(f"AdamW state: full {full['state_bytes'] / 2**20:.1f} MiB, LoRA {lora['state_bytes'] / 2**20:.2f} MiB "
          f"(ratio {lora['state_bytes'] / full['state_bytes']:.4f})")
    peak_full, peak_lora = full["step_peak_kib"] / 2**10, lora["step_peak_kib"] / 2**10
    print(f"training step peak above the built model (B {a.batch} x T {a.seq}): full {peak_full:.0f} MiB, LoRA "
          f"{peak_lora:.0f} MiB (ratio {peak_lora / peak_full:.3f})", flush=True)
    print(f"GRPO's reference: full fine-tuning keeps a copy of {full['model_bytes'] / 2**20:.0f} MiB (fp32; half in "
          f"bf16); LoRA none (the base with its adapters off)", flush=True)
    t_plain, t_lora = decode_ratio(shape, a.rank, a.decode_batch, a.new_tokens, a.repeats)
    print(f"decode, batch {a.decode_batch} x {a.new_tokens} new tokens (eager, greedy): plain/merged {t_plain:.2f} s, "
          f"LoRA unmerged {t_lora:.2f} s (ratio {t_lora / t_plain:.3f})")


if __name__ == "__main__":
    main()
