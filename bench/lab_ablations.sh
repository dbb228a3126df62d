#!/usr/bin/env bash
# Every ablation BENCHMARKS.md reports on the GRPO lab bench (psyche/lab.py, configs/lab-grpo.toml), in the order
# they were run: the negative controls first (if they do not separate from the default, the bench has no power).
# Cells shared by several ablations (the default's) run once; a rerun skips every finished cell. Each run of
# ~2-4 minutes on 2 CPU cores; all of it about 2.5 hours.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/lab}
L() { python -m psyche.cli lab --out "$OUT" "$@"; }
L grpo.optim.lr+grpo.shuffle_rewards=1e-4+false,0+false,1e-4+true --seeds 0-4 --name negative-controls
L grpo.clip_high=0.2,0.28 --seeds 0-4 --name clip-higher
L grpo.advantage+grpo.loss_agg=grpo+seq-mean-token-mean,dr_grpo+seq-mean-token-sum-norm --seeds 0-4 --name dr-grpo
L grpo.dynamic_sampling=false,true --seeds 0-4 --name dynamic-sampling
L grpo.group_size=8,4,16 --seeds 0-4 --name group-size
L grpo.temperature=1.0,0.7 --seeds 0-2 --name temperature
L grpo.kl_coef=0,1.0 --seeds 0-2 --name kl
L grpo.rollout_correction=none,tis --with grpo.sampler_dtype=bfloat16 --seeds 0-2 --name bf16-sampler-tis
L lora.rank+grpo.optim.lr=0+1e-4,1+1e-3,8+1e-3 --seeds 0-2 --name lora
L grpo.kl_coef=0,0.1,1.0 --seeds 0-2 --name kl  # 0.1 added after 0 vs 1.0 ran (1.0 held the policy still)
