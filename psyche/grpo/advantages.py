"""Advantage estimators: rewards (N,) in groups of G -> one advantage per completion (its tokens share it).

Each estimator is one function registered with `@estimator(name, ...)`; the registry entry says what the
rest of psyche needs to know about it (the smallest group it works with, whether it needs the completion
lengths). Config choices (`grpo.advantage`), validation, dispatch and the README's table all read ESTIMATORS,
so adding an estimator is writing one decorated function:

    @estimator("my_baseline", min_group=2)
    def my_baseline(r, ctx):              # r (P, G) float64 rewards; ctx: group_size, std_ddof, eps, lengths, reduce
        return r - r.median(dim=1, keepdim=True).values

A group whose rewards are all equal gets A = 0 under every group estimator (also with eps = 0); the
token-whitened ones give such a group −μ/σ, as in verl: with no group baseline, every completion is compared
with the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

WHITEN_EPS = 1e-8  # verl's masked_whiten: (x − mean) / sqrt(var + 1e-8)


@dataclass(frozen=True)
class AdvContext:
    """What an estimator may use besides the rewards."""

    group_size: int
    std_ddof: int = 1  # the std's degrees of freedom (1: verl, TRL, OpenRLHF; 0: several minimal implementations)
    eps: float = 1e-6
    lengths: torch.Tensor | None = None  # (P, G) completion lengths, float64 (estimators with needs_lengths)
    reduce: Callable | None = None  # sums a list of numbers over ranks (psyche.dist.sum_over_ranks)


@dataclass(frozen=True)
class Estimator:
    fn: Callable  # (r (P, G) float64, AdvContext) -> (P, G)
    min_group: Callable[[int], int]  # std_ddof -> the smallest group it works with
    needs_lengths: bool
    summary: str  # the formula, one line (the README's table)


ESTIMATORS: dict[str, Estimator] = {}


def estimator(name: str, *, min_group: int | Callable[[int], int] = 2, needs_lengths: bool = False):
    """Register an advantage estimator under `name`. min_group: the smallest group size it works with (or a
    function of std_ddof); needs_lengths: it weights completions by their token counts. The docstring's first
    line is its one-line summary."""
    def deco(fn):
        need = min_group if callable(min_group) else (lambda ddof, n=min_group: n)
        summary = (fn.__doc__ or name).strip().splitlines()[0]
        ESTIMATORS[name] = Estimator(fn, need, needs_lengths, summary)
        return fn
    return deco


def _one_process(xs: list) -> list:
    return [float(x) for x in xs]


def token_whiten(x: torch.Tensor, lengths: torch.Tensor, reduce=None) -> torch.Tensor:
    """Whiten per-row values x (N,) as if each were repeated over its row's L_i completion tokens (the
    token-level whitening of REINFORCE++ with an outcome reward):

        n = Σ_i L_i,   μ = Σ_i L_i x_i / n,   σ² = Σ_i L_i (x_i − μ)² / (n − 1),   x̂_i = (x_i − μ) / sqrt(σ² + 1e-8)

    over the whole batch: `reduce` sums a list of numbers over ranks (psyche.dist.sum_over_ranks), so the
    statistics are those of the global batch."""
    reduce = reduce or _one_process
    L = lengths.to(torch.float64)
    n, s = reduce([L.sum(), (L * x).sum()])
    mu = s / n
    (ss,) = reduce([(L * (x - mu) ** 2).sum()])
    if n < 2:
        raise ValueError(f"token whitening needs at least 2 completion tokens in the batch, got {n:g}")
    return (x - mu) / (ss / (n - 1) + WHITEN_EPS) ** 0.5


def _centred(r):
    return r - r.mean(dim=1, keepdim=True)


@estimator("grpo", min_group=lambda ddof: max(2, ddof + 1))
def grpo(r, ctx):
    """A_i = (r_i − mean_g r) / (std_g r + eps), the std over the group with std_ddof (GRPO)"""
    std = r.std(dim=1, correction=ctx.std_ddof, keepdim=True)
    return torch.where(std > 0, _centred(r) / (std + ctx.eps), 0.0)  # eps = 0 must not turn 0/0 into NaN


@estimator("dr_grpo")
def dr_grpo(r, ctx):
    """A_i = r_i − mean_g r: no division by the std, so no difficulty bias (Dr. GRPO)"""
    return _centred(r)


@estimator("rloo")
def rloo(r, ctx):
    """A_i = r_i − mean_{j≠i} r_j = G/(G−1)·(r_i − mean_g r): the leave-one-out baseline (RLOO)"""
    return _centred(r) * ctx.group_size / (ctx.group_size - 1)


@estimator("batch_std", min_group=lambda ddof: max(2, ddof + 1))
def batch_std(r, ctx):
    """A_i = (r_i − mean_g r) / (std_batch r + eps): the group mean, the std over the whole batch (all ranks)"""
    reduce = ctx.reduce or _one_process
    n, s = reduce([r.numel(), r.sum()])
    (ss,) = reduce([((r - s / n) ** 2).sum()])
    std = (ss / max(n - ctx.std_ddof, 1)) ** 0.5
    return _centred(r) / (std + ctx.eps) if std > 0 else torch.zeros_like(r)  # eps = 0: no 0/0


@estimator("reinforce_pp", min_group=1, needs_lengths=True)
def reinforce_pp(r, ctx):
    """A_i = token_whiten(r)_i: no group baseline, returns whitened over the batch's tokens (REINFORCE++)"""
    return token_whiten(r.flatten(), ctx.lengths.flatten(), ctx.reduce).view_as(r)


@estimator("reinforce_pp_baseline", needs_lengths=True)
def reinforce_pp_baseline(r, ctx):
    """A_i = token_whiten(r − mean_g r)_i: REINFORCE++ with the group mean as baseline"""
    return token_whiten(_centred(r).flatten(), ctx.lengths.flatten(), ctx.reduce).view_as(r)


@estimator("opo", needs_lengths=True)
def opo(r, ctx):
    """A_i = r_i − Σ_g L_j r_j / Σ_g L_j: the length-weighted group mean, the optimal baseline (OPO)"""
    L = ctx.lengths
    return r - (L * r).sum(1, keepdim=True) / L.sum(1, keepdim=True).clamp(min=1)


@estimator("grpo_passk")
def grpo_passk(r, ctx):
    """A_best = (r_max − r_second) / (std_g r + eps), every other A_i = 0: only the best learns (pass@k)"""
    top, idx = torch.topk(r, 2, dim=1)  # torch.topk's choice among ties
    std = r.std(dim=1)  # unbiased
    gap = torch.where(std > 0, (top[:, 0] - top[:, 1]) / (std + ctx.eps), 0.0)  # eps = 0: no 0/0
    return torch.zeros_like(r).scatter_(1, idx[:, :1], gap[:, None])


def compute_advantages(rewards: torch.Tensor, group_size: int, *, estimator: str = "grpo", std_ddof: int = 1,
                       eps: float = 1e-6, lengths: torch.Tensor | None = None, reduce=None) -> torch.Tensor:
    """rewards (N,) with N = prompts × group_size, a prompt's completions consecutive -> advantages (N,),
    by the registered estimator `estimator` (ESTIMATORS). lengths (N,): completion lengths, for the estimators
    that weight by tokens; reduce: sums over ranks, for the ones with batch statistics (see `token_whiten`)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {estimator!r}")
    est = ESTIMATORS[estimator]
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    if group_size < est.min_group(std_ddof):
        raise ValueError(f"group_size={group_size} is too small for estimator {estimator!r} (ddof={std_ddof}): "
                         f"it needs >= {est.min_group(std_ddof)}")
    if est.needs_lengths and (lengths is None or lengths.shape != rewards.shape):
        raise ValueError(f"estimator {estimator!r} needs the completion lengths, one per reward")
    r = rewards.double().view(-1, group_size)  # (P, G)
    ctx = AdvContext(group_size, std_ddof, eps, None if lengths is None else lengths.double().view_as(r), reduce)
    adv = est.fn(r, ctx)
    return adv.flatten().to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P,) bool: groups whose rewards are all equal (they carry no learning signal)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(dim=1)
