"""The KL penalty toward the reference (`grpo.kl_kind`): per-token estimators of KL(π || π_ref) from samples
of π, one registered function each (KL_KINDS), and the exact full-vocabulary KL from logits, their yardstick.

Adding an estimator is one decorated function of d = lp_ref − lp:

    @kl_kind("k_abs")
    def _k_abs(d):
        '''|d|: biased, ≥ 0'''
        return d.abs()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class KLKind:
    fn: Callable  # d = lp_ref − lp (per token) -> estimate
    summary: str


KL_KINDS: dict[str, KLKind] = {}


def kl_kind(name: str):
    """Register a KL estimator: `fn(d)` with d = lp_ref − lp per token; its docstring's first line is its
    summary (the README's table)."""
    def deco(fn):
        KL_KINDS[name] = KLKind(fn, (fn.__doc__ or name).strip().splitlines()[0])
        return fn
    return deco


@kl_kind("k1")
def _k1(d):
    """k1 = −d = lp − lp_ref: unbiased, high variance, can be negative"""
    return -d


@kl_kind("k2")
def _k2(d):
    """k2 = ½ d²: biased, low variance, ≥ 0"""
    return 0.5 * d * d


@kl_kind("k3")
def _k3(d):
    """k3 = exp(d) − d − 1: unbiased, low variance, ≥ 0 (Schulman's estimator, used by GRPO)"""
    return torch.exp(d) - d - 1


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimates of KL(π || π_ref) from samples of π, with d = lp_ref − lp, by the registered kind
    (KL_KINDS: k1, k2, k3). No clamping: values are returned as computed."""
    if kind not in KL_KINDS:
        raise ValueError(f"kl kind must be one of {tuple(KL_KINDS)}, got {kind!r}")
    return KL_KINDS[kind].fn(ref_logp - logp)


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary KL(π || π_ref) per position from logits (..., V) -> (...). The yardstick for k1-k3."""
    lp = torch.log_softmax(logits.float() / temperature, -1)
    lq = torch.log_softmax(ref_logits.float() / temperature, -1)
    return (lp.exp() * (lp - lq)).sum(-1)
