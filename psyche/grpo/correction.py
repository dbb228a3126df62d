"""Rollout correction (`grpo.rollout_correction`): importance weights against the gap between the sampler's
log-probs and the trainer's for the same weights (other kernels, batch shapes or precision), one registered
function each (ROLLOUT_CORRECTIONS). The loss multiplies them into its per-token terms (psyche.grpo.loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

LOG_RATIO_BOUND = 20.0  # log-ratios are clamped to ±20 before exp where verl does (PPO's token ratio, cispo,
#                         sapo, the IS weights)


def frac(x: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
    """Fraction of masked positions where x holds, a 0-d float64 tensor (no sync)."""
    return (x & mb).sum().double() / mb.sum().clamp(min=1).double()


@dataclass(frozen=True)
class RolloutCorrection:
    fn: Callable  # (raw weights (B, T), mask (B, T) bool, threshold, low) -> (w, truncated, dropped)
    level: str  # "token" or "sequence": the weight of each token, or of the whole row
    band: bool  # weights outside [low, threshold] are dropped (else: truncated at threshold)
    summary: str


ROLLOUT_CORRECTIONS: dict[str, RolloutCorrection] = {}  # beside them, "none": no correction


def correction(name: str, *, level: str, band: bool):
    """Register a rollout correction: `fn` turns raw importance weights into the weights the loss uses."""
    def deco(fn):
        ROLLOUT_CORRECTIONS[name] = RolloutCorrection(fn, level, band, f"{(fn.__doc__ or name).strip().splitlines()[0]}, per {level}")
        return fn
    return deco


@correction("seq_tis", level="sequence", band=False)
@correction("tis", level="token", band=False)
def truncated_is(raw, mb, threshold, low):
    """w ← min(w, threshold): truncated IS"""
    return raw.clamp(max=threshold), (raw > threshold) & mb, torch.zeros_like(mb)


@correction("seq_mis", level="sequence", band=True)
@correction("mis", level="token", band=True)
def masked_is(raw, mb, threshold, low):
    """w ← w · [low ≤ w ≤ threshold]: masked IS (IcePop), what leaves the band gets 0"""
    keep = (raw >= low) & (raw <= threshold)
    return torch.where(keep, raw, torch.zeros_like(raw)), torch.zeros_like(mb), ~keep & mb


def rollout_correction(trainer_logp, sampler_logp, mask, mode: str, *, threshold: float = 2.0, low: float = 0.5):
    """Importance weights against the sampler-trainer mismatch (the sampler's kernels, batch shapes or
    precision make its π_sampler differ from the π_old the trainer computes for the same weights):

        δ_{i,t} = lp_old − lp_sampler;   token: w = exp(clamp(δ, ±20));   sequence: w_i = exp(clamp(Σ_t m·δ, ±20))
        then the registered correction `mode` (ROLLOUT_CORRECTIONS): tis / seq_tis truncate at threshold,
        mis / seq_mis zero the tokens (or whole sequences) outside [low, threshold]
    -> (weights (B, T), detached, 0 off the mask; stats). As verl's compute_rollout_correction_weights with
    rollout_is = token | sequence and threshold "C" (TIS) or "low_C" (IcePop). With lp_old == lp_sampler
    every weight is exactly 1. stats: rc/weight_mean, rc/weight_max (over completion tokens),
    rc/truncated_frac (tokens whose weight was truncated: w > threshold), rc/masked_frac (tokens given 0),
    rc/seq_truncated_frac, rc/seq_masked_frac (the same for sequences: any of their tokens)."""
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout correction must be one of {tuple(ROLLOUT_CORRECTIONS)}, got {mode!r}")
    rc = ROLLOUT_CORRECTIONS[mode]
    with torch.no_grad():
        dt = torch.promote_types(trainer_logp.dtype, torch.float32)  # fp32 at least (bf16 log-probs are coarse)
        m = mask.to(dt)
        mb = mask.bool()
        delta = (trainer_logp.to(dt) - sampler_logp.to(dt)) * m
        if rc.level == "sequence":
            raw = torch.exp(delta.sum(-1, keepdim=True).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)).expand_as(m)
        else:
            raw = torch.exp(delta.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        w, truncated, dropped = rc.fn(raw * m, mb, threshold, low)
        wd = w.double()
        stats = {"rc/weight_mean": (wd * m).sum() / m.sum().clamp(min=1),
                 "rc/weight_max": torch.where(mb.any(), wd.masked_fill(~mb, -torch.inf).max(), 1.0),
                 "rc/truncated_frac": frac(truncated, mb), "rc/masked_frac": frac(dropped, mb),
                 "rc/seq_truncated_frac": truncated.any(-1).double().sum() / max(mask.shape[0], 1),
                 "rc/seq_masked_frac": dropped.any(-1).double().sum() / max(mask.shape[0], 1)}
    return w, stats
