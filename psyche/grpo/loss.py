"""GRPO's loss as plain tensor functions: the policy losses (the clipped surrogate and its variants), their
aggregation, and `objective`, the one place where these, the KL penalty (kl.py) and the rollout correction
(correction.py) are put together into the loss that trains. The advantages come from advantages.py.

Nothing here knows about models or sampling, so each function can be checked by hand and compared with
other implementations. Notation: G completions per prompt, reward r_i, per-token log-probs lp (current
policy), lp_old (the policy that sampled), lp_ref (reference); ratio ρ = exp(lp − lp_old); mask m over
completion tokens; A_i a completion's advantage, broadcast over its tokens. Statistics are returned as
0-d tensors, never Python floats, so the math forces no host-device sync; the caller converts them when
it logs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from psyche.grpo.advantages import ESTIMATORS, _one_process, compute_advantages, zero_std_groups  # noqa: F401
from psyche.grpo.correction import LOG_RATIO_BOUND, ROLLOUT_CORRECTIONS, frac, rollout_correction
from psyche.grpo.kl import KL_KINDS, kl_estimate


def _summary(fn) -> str:
    return (fn.__doc__ or fn.__name__).strip().splitlines()[0]


# ---- aggregations (grpo.loss_agg) ----

@dataclass(frozen=True)
class Aggregation:
    fn: Callable  # (v·m (B, T), m (B, T), Counts) -> scalar
    summary: str


@dataclass(frozen=True)
class Counts:
    """The normalisers of an aggregation: the mini-batch's completion tokens and sequences (all micro-batches,
    all ranks), and seq-mean-token-sum-norm's constant length."""

    n_tokens: float
    n_seqs: float
    norm_length: float


AGGS: dict[str, Aggregation] = {}


def aggregation(name: str):
    """Register an aggregation: `fn(values·mask, mask, Counts)` -> the 0-d loss."""
    def deco(fn):
        AGGS[name] = Aggregation(fn, _summary(fn))
        return fn
    return deco


@aggregation("token-mean")
def _token_mean(vm, m, c: Counts):
    """Σ_{i,t} m·v / n_tokens (DAPO)"""
    return vm.sum() / max(float(c.n_tokens), 1.0)


@aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(vm, m, c: Counts):
    """Σ_i (Σ_t m·v / Σ_t m) / n_seqs (the original GRPO)"""
    return (vm.sum(-1) / m.sum(-1).clamp(min=1)).sum() / max(float(c.n_seqs), 1.0)


@aggregation("seq-mean-token-sum")
def _seq_mean_token_sum(vm, m, c: Counts):
    """Σ_i Σ_t m·v / n_seqs"""
    return vm.sum() / max(float(c.n_seqs), 1.0)


@aggregation("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(vm, m, c: Counts):
    """Σ_i Σ_t m·v / (n_seqs · norm_length), norm_length a constant (Dr. GRPO)"""
    return vm.sum() / (max(float(c.n_seqs), 1.0) * float(c.norm_length))


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str, *, norm_length: float | None = None,
              n_tokens: float | None = None, n_seqs: float | None = None) -> torch.Tensor:
    """Reduce per-token values (B, T) to a scalar by the registered aggregation `agg` (AGGS).

    n_tokens / n_seqs default to this batch's counts, norm_length to the mask's width T. Pass the *global*
    counts (all micro-batches, all ranks) and sum the micro-batch results: the total is then independent of
    how the batch was split.
    """
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {tuple(AGGS)}, got {agg!r}")
    m = mask.to(values.dtype)
    counts = Counts(m.sum() if n_tokens is None else n_tokens, m.shape[0] if n_seqs is None else n_seqs,
                    norm_length if norm_length is not None else mask.shape[-1])
    return AGGS[agg].fn(values * m, m, counts)


# ---- policy losses (grpo.policy_loss) ----
# Each returns (loss, stats), takes the aggregation's arguments and the optional rollout-correction weights
# (multiplied into the per-token loss, as verl does), and follows verl 0.9.1's core_algos; where it differs,
# its docstring says so. The registry entry maps the function's own keyword arguments to LossConfig fields
# (`params`) and says whether it needs a token selection from `cov_select` (`selects`).

@dataclass(frozen=True)
class PolicyLoss:
    fn: Callable
    params: dict  # the function's keyword -> the LossConfig field that gives it
    selects: bool  # takes the tokens cov_select chose (Clip-Cov, KL-Cov), positionally after the mask
    summary: str


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def policy_loss_variant(name: str, *, params=(), selects: bool = False):
    """Register a policy loss. params: LossConfig fields passed as keywords of the same name, or a dict
    {keyword: LossConfig field}."""
    def deco(fn):
        p = dict(params) if isinstance(params, dict) else {k: k for k in params}
        POLICY_LOSSES[name] = PolicyLoss(fn, p, selects, _summary(fn))
        return fn
    return deco


@policy_loss_variant("ppo", params=("clip_low", "clip_high", "dual_clip", "ratio_level"))
def policy_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: float | None = 0.0, ratio_level: str = "token", agg: str = "token-mean",
                norm_length: float | None = None, n_tokens=None, n_seqs=None, weights=None):
    """PPO's clipped surrogate, token or sequence (GSPO) ratio, clip-higher (DAPO) and dual clip

    logp, old_logp, mask: (B, T); advantages: (B,). Returns (loss, stats).

    ratio_level "token":    ρ_{i,t} = exp(clamp(lp_{i,t} − lp_old_{i,t}, ±20))   (the clamp as verl's)
    ratio_level "sequence": ρ_{i,t} = exp(sg(log s_i) + lp_{i,t} − sg(lp_{i,t})),
                            s_i = exp(Σ_t m·(lp − lp_old) / Σ_t m)                (GSPO)
    ℓ_{i,t} = max(−A_i ρ, −A_i clip(ρ, 1 − clip_low, 1 + clip_high))            (PPO; DAPO when high > low)
    dual clip (c = dual_clip > 1; 0 or None: off): for A_i < 0, ℓ ← min(ℓ, −c·A_i)   (bounds the loss of
                                                                                 huge ratios on bad samples)
    loss = aggregate(w·ℓ, mask, agg, ...)  — see `aggregate`; w: rollout-correction weights (detached), or 1.

    GSPO's ratio is written in the "GSPO-token" form of its paper (as verl writes it): its value is s_i at
    every token, and ∂ρ_{i,t}/∂lp_{i,t} = s_i, so each token's weight w_{i,t} scales that token's own gradient.
    Broadcasting s_i itself over the row gives the same value and, without per-token weights, the same
    gradient, but it spreads the row's weighted loss evenly over the row's tokens: a token that masked IS set
    to 0 would still learn. (psyche does not clamp log s_i at 10 as verl does: the value is exactly s_i.)
    stats (0-d float64 tensors): clip_frac_low (ρ < 1 − clip_low with A < 0: the clip removed the gradient),
    clip_frac_high (ρ > 1 + clip_high with A > 0), dual_clip_frac, ratio_mean / ratio_max / ratio_min over
    masked tokens (1 when the mask is empty).
    """
    loss_tok, ratio = _ppo_tokens(logp, old_logp, advantages, mask, clip_low, clip_high, ratio_level)
    A = advantages.to(logp.dtype)[:, None]
    dual = torch.zeros_like(loss_tok, dtype=torch.bool)
    if dual_clip:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -A * dual_clip
        dual = (A < 0) & (loss_tok > bound)
        loss_tok = torch.where(A < 0, torch.minimum(loss_tok, bound), loss_tok)
    loss = _weighted(loss_tok, mask, agg, weights, norm_length=norm_length, n_tokens=n_tokens, n_seqs=n_seqs)
    with torch.no_grad():
        stats = {**_clip_stats(ratio, A, mask, clip_low, clip_high), "dual_clip_frac": frac(dual, mask.bool())}
    return loss, stats


def _ppo_tokens(logp, old_logp, advantages, mask, clip_low, clip_high, ratio_level="token"):
    """PPO's clipped per-token loss max(−A ρ, −A clip(ρ, 1 − clip_low, 1 + clip_high)) -> (loss (B, T), ρ)."""
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    m = mask.to(logp.dtype)
    log_ratio = (logp - old_logp) * m
    if ratio_level == "token":
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))  # as verl: no inf, no huge gradient
    else:  # GSPO-token: value s_i, gradient per token (see policy_loss)
        seq = log_ratio.sum(-1) / m.sum(-1).clamp(min=1)  # (B,) log s_i
        ratio = torch.exp(seq.detach()[:, None] + (logp - logp.detach()))
    A = advantages.to(logp.dtype)[:, None]
    return torch.maximum(-A * ratio, -A * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)), ratio


@torch.no_grad()
def _clip_stats(ratio, A, mask, clip_low, clip_high) -> dict:
    """clip_frac_low / clip_frac_high (the tokens whose gradient PPO's clip removed) and the ratio's stats."""
    mb = mask.bool()
    return {"clip_frac_low": frac((ratio < 1 - clip_low) & (A < 0), mb),
            "clip_frac_high": frac((ratio > 1 + clip_high) & (A > 0), mb), **_ratio_stats(ratio, mb)}


def _ratio_stats(ratio: torch.Tensor, mb: torch.Tensor) -> dict:
    """ratio_mean / ratio_max / ratio_min over masked positions (1 when the mask is empty), no sync."""
    r, some = ratio.detach().double(), mb.any()
    return {"ratio_mean": torch.where(some, (r * mb).sum() / mb.sum().clamp(min=1).double(), 1.0),
            "ratio_max": torch.where(some, r.masked_fill(~mb, -torch.inf).max(), 1.0),
            "ratio_min": torch.where(some, r.masked_fill(~mb, torch.inf).min(), 1.0)}


def _weighted(loss_tok, mask, agg, weights, **counts):
    """aggregate(w · ℓ): the per-token loss times the rollout-correction weights (when given)."""
    return aggregate(loss_tok if weights is None else loss_tok * weights, mask, agg, **counts)


@torch.no_grad()
def _unclipped_stats(ratio, mask) -> dict:
    zero = torch.zeros((), dtype=torch.float64, device=ratio.device)
    return {"clip_frac_low": zero, "clip_frac_high": zero, **_ratio_stats(ratio, mask.bool())}


@policy_loss_variant("cispo", params=("clip_low", "clip_high"))
def cispo_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, agg="token-mean",
               norm_length=None, n_tokens=None, n_seqs=None, weights=None):
    """CISPO: the importance weight clipped and detached, every token keeps a gradient (MiniMax-M1)

        ρ = exp(clamp(lp − lp_old, ±20)),   ℓ_{i,t} = −sg(clip(ρ, 1 − clip_low, 1 + clip_high)) · A_i · lp_{i,t}

    so every token keeps a gradient (∇ℓ = −sg(ρ̂)·A·∇lp); only its weight is bounded. clip_frac_low/high:
    tokens whose ρ was clipped from below / above (whatever the sign of A)."""
    m = mask.to(logp.dtype)
    ratio = torch.exp(((logp - old_logp) * m).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    A = advantages.to(logp.dtype)[:, None]
    loss_tok = -torch.clamp(ratio, 1 - clip_low, 1 + clip_high).detach() * A * logp
    loss = _weighted(loss_tok, mask, agg, weights, norm_length=norm_length, n_tokens=n_tokens, n_seqs=n_seqs)
    with torch.no_grad():
        mb = mask.bool()
        stats = {"clip_frac_low": frac(ratio < 1 - clip_low, mb), "clip_frac_high": frac(ratio > 1 + clip_high, mb),
                 **_ratio_stats(ratio, mb)}
    return loss, stats


@policy_loss_variant("gmpo", params=("clip_low", "clip_high"))
def gmpo_loss(logp, old_logp, advantages, mask, *, clip_low=0.4, clip_high=0.4, n_seqs=None, weights=None,
              **_agg):
    """GMPO: one ratio per sequence, the geometric mean of its clipped token ratios (a sequence mean)

    Each token ratio is clipped in log space on the side the advantage pushes:

        d_{i,t} = lp − lp_old,   d̂ = sign(A_i) · min(sign(A_i)·d, sign(A_i)·clamp(d, −clip_low, clip_high))
        ρ_i = exp(Σ_t m·d̂ / (Σ_t m + 1e-8)),   ℓ_i = −A_i · ρ_i · w_i,   loss = Σ_i ℓ_i / n_seqs

    w_i: the geometric mean of the row's rollout-correction weights w_{i,t}, as in verl, for the value. The
    gradient is not verl's: there every token of the row learns with the row's w_i (a token that masked IS
    set to 0 still learns, and one weight stands for all); psyche keeps each token's own weight in its
    gradient, ∂ℓ_i/∂lp_{i,t} = −A_i·ρ_i·w_{i,t}·∂d̂_{i,t}/∂lp_{i,t} / Σ_t m (the value is unchanged: the extra
    term is x − sg(x), zero in value). The loss is a mean over sequences
    whatever `grpo.loss_agg` says (as in verl, whose GMPO ignores loss_agg_mode); n_seqs is the global
    count, so micro-batches and ranks sum to the mini-batch mean. Unlike verl, a row with no completion
    tokens (truncation = mask) contributes 0, not −A_i (its empty mean would make ρ_i = 1). The GMPO paper's
    clip range is wide (e^±0.4); psyche passes grpo.clip_low/high. clip_frac_high / _low: tokens whose d was
    clamped, with A > 0 / A < 0."""
    m = mask.to(logp.dtype)
    d = (logp - old_logp) * m
    sgn = torch.sign(advantages.to(logp.dtype))[:, None]
    d_clamp = torch.clamp(d, -clip_low, clip_high)
    d_min = sgn * torch.minimum(sgn * d, sgn * d_clamp)
    n_tok = m.sum(-1)
    log_ratio = (d_min * m).sum(-1) / (n_tok + 1e-8)  # (B,)
    if weights is not None:  # value unchanged; token t's gradient scaled by w_t / w_i (see the docstring)
        w_seq = torch.exp((torch.log(weights + 1e-10) * m).sum(-1) / (n_tok + 1e-8))
        scale = weights * m / w_seq[:, None]
        log_ratio = log_ratio.detach() + (scale * (d_min - d_min.detach())).sum(-1) / (n_tok + 1e-8)
    ratio = torch.exp(log_ratio)
    A = advantages.to(logp.dtype)
    loss_seq = -A * ratio * (n_tok > 0).to(logp.dtype)
    if weights is not None:
        loss_seq = loss_seq * w_seq
    loss = loss_seq.sum() / max(float(n_seqs if n_seqs is not None else len(A)), 1.0)
    with torch.no_grad():
        mb = mask.bool()
        clipped = d != d_clamp
        stats = {"clip_frac_low": frac(clipped & (A < 0)[:, None], mb),
                 "clip_frac_high": frac(clipped & (A > 0)[:, None], mb),
                 **_ratio_stats(ratio[:, None].expand_as(logp), mb)}
    return loss, stats


@policy_loss_variant("sapo", params={"tau_pos": "sapo_tau_pos", "tau_neg": "sapo_tau_neg"})
def sapo_loss(logp, old_logp, advantages, mask, *, tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean",
              norm_length=None, n_tokens=None, n_seqs=None, weights=None):
    """SAPO: a smooth sigmoid gate in place of the hard clip (`sapo_tau_pos/neg`)

        ρ = exp(clamp(lp − lp_old, ±20)),   τ = τ_pos if A_i > 0 else τ_neg,
        f(ρ) = σ(τ·(ρ − 1)) · 4/τ,   ℓ_{i,t} = −f(ρ_{i,t}) · A_i

    (∇f = ρ·σ'·4 → the gradient fades smoothly as ρ leaves 1; τ_neg > τ_pos damps negative updates faster).
    verl always aggregates SAPO as seq-mean-token-mean; psyche uses `grpo.loss_agg` (its configs/tiny-grpo-
    sapo.toml sets seq-mean-token-mean). No clipping: clip fractions are 0."""
    m = mask.to(logp.dtype)
    ratio = torch.exp(((logp - old_logp) * m).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    A = advantages.to(logp.dtype)[:, None]
    tau = torch.where(A > 0, torch.as_tensor(tau_pos, dtype=logp.dtype), torch.as_tensor(tau_neg, dtype=logp.dtype))
    loss_tok = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * A
    loss = _weighted(loss_tok, mask, agg, weights, norm_length=norm_length, n_tokens=n_tokens, n_seqs=n_seqs)
    return loss, _unclipped_stats(ratio, mask)


def token_covariance(advantages, logp, mask, reduce=None) -> torch.Tensor:
    """cov_{i,t} = (A_i − Ā)(lp_{i,t} − l̄p) per completion token (B, T), the means over the mask of the whole
    mini-batch (`reduce` sums over ranks): the entropy-mechanism paper's measure of which tokens drive the
    entropy collapse (a confident token with a high advantage)."""
    reduce = reduce or _one_process
    m = mask.to(torch.float64)
    A = advantages.double()[:, None].expand_as(m)
    n, sa, sl = reduce([m.sum(), (A * m).sum(), (logp.double() * m).sum()])
    return (A - sa / max(n, 1.0)) * (logp.double() - sl / max(n, 1.0))


def cov_select(kind: str, cov, mask, *, ratio: float, lb: float = 1.0, ub: float = 5.0, excluded=None,
               generator=None, gather=None, rank: int = 0) -> torch.Tensor:
    """The tokens (B, T) bool that Clip-Cov cuts or KL-Cov penalises, from their covariance `cov`:

        clip_cov: k = max(⌊ratio·n⌋, 1) tokens drawn at random among those with lb < cov < ub (and not
                  `excluded`: tokens the PPO clip already cuts);
        kl_cov:   the k = max(⌊ratio·n⌋, 1) tokens of largest cov.

    n counts the mini-batch's completion tokens on every rank; `gather` (psyche.dist.all_gather_object)
    collects every rank's candidates in rank order (this one is `rank`), so the choice is that of one process
    holding the whole mini-batch. verl makes this choice per micro-batch from the current log-probs; psyche
    makes it once per mini-batch, before its update (see psyche.grpo.step.update_policy), so micro-batching
    and the number of ranks do not change it. Random draws use `generator` (the same seed on every rank)."""
    gather = gather or (lambda x: [x])
    mb = mask.bool()
    if kind == "clip_cov":
        cand = mb & (cov > lb) & (cov < ub)
        if excluded is not None:
            cand = cand & ~excluded
        local = cand.nonzero()  # (c, 2) row-major
        parts = gather((int(mb.sum()), local.shape[0]))
        n = sum(p[0] for p in parts)
        k = max(int(ratio * n), 1)
        total = sum(p[1] for p in parts)
        pick = torch.randperm(total, generator=generator)[:k] if total else torch.zeros(0, dtype=torch.long)
        offset = sum(p[1] for p in parts[:rank])
        mine = pick[(pick >= offset) & (pick < offset + local.shape[0])] - offset
        out = torch.zeros_like(mb)
        idx = local[mine.to(local.device)]
        out[idx[:, 0], idx[:, 1]] = True
        return out
    if kind == "kl_cov":
        vals = cov[mb]  # row-major
        parts = gather(vals.cpu())
        allv = torch.cat(parts) if parts else vals.cpu()
        if allv.numel() == 0:
            return torch.zeros_like(mb)
        k = max(1, int(allv.numel() * ratio))
        top = torch.topk(allv, min(k, allv.numel()), largest=True).indices
        offset = sum(p.numel() for p in parts[:rank])
        mine = top[(top >= offset) & (top < offset + vals.numel())] - offset
        flat = torch.zeros(vals.numel(), dtype=torch.bool)
        flat[mine] = True
        out = torch.zeros_like(mb)
        out[mb] = flat.to(mb.device)
        return out
    raise ValueError(f"cov selection kind must be clip_cov or kl_cov, got {kind!r}")


@policy_loss_variant("clip_cov", params=("clip_low", "clip_high"), selects=True)
def clip_cov_loss(logp, old_logp, advantages, mask, selected, *, clip_low=0.2, clip_high=0.2, agg="token-mean",
                  norm_length=None, n_tokens=None, n_seqs=None, weights=None):
    """Clip-Cov: PPO with the gradient cut on a few high-covariance tokens (`clip_cov_ratio/lb/ub`)

    The `selected` tokens come from cov_select:

        ℓ_{i,t} = max(−A ρ, −A clip(ρ, 1 − clip_low, 1 + clip_high)) · (0 if selected else 1)

    cov_frac: the fraction of tokens cut; clip_frac_low/high as for ppo."""
    loss_tok, ratio = _ppo_tokens(logp, old_logp, advantages, mask, clip_low, clip_high)
    stats = _clip_stats(ratio, advantages.to(logp.dtype)[:, None], mask, clip_low, clip_high)
    loss_tok = loss_tok * (~selected).to(loss_tok.dtype)
    loss = _weighted(loss_tok, mask, agg, weights, norm_length=norm_length, n_tokens=n_tokens, n_seqs=n_seqs)
    stats["cov_frac"] = frac(selected, mask.bool())
    return loss, stats


@policy_loss_variant("kl_cov", params={"coef": "kl_cov_coef"}, selects=True)
def kl_cov_loss(logp, old_logp, advantages, mask, selected, *, coef=0.1, agg="token-mean", norm_length=None,
                n_tokens=None, n_seqs=None, weights=None):
    """KL-Cov: unclipped, a penalty on the highest-covariance tokens' abs(log ratio) (`kl_cov_ratio/coef`)

    The penalty acts on how far the `selected` tokens moved:

        ℓ_{i,t} = −A_i ρ_{i,t} + coef · |lp − lp_old|_{i,t} · [selected]

    (no clip at all: the penalty on the high-covariance tokens is what keeps the entropy up). cov_frac: the
    fraction of tokens penalised."""
    m = mask.to(logp.dtype)
    log_ratio = (logp - old_logp) * m
    ratio = torch.exp(log_ratio)
    A = advantages.to(logp.dtype)[:, None]
    loss_tok = -A * ratio + coef * log_ratio.abs() * selected.to(logp.dtype)
    loss = _weighted(loss_tok, mask, agg, weights, norm_length=norm_length, n_tokens=n_tokens, n_seqs=n_seqs)
    return loss, {**_unclipped_stats(ratio, mask), "cov_frac": frac(selected, mask.bool())}


# ---- the objective ----

@dataclass
class LossConfig:
    """The knobs of one update, as plain values: a view of the run config's grpo section (`from_grpo`), whose
    keys of the same name they are, but for agg (grpo.loss_agg), norm_length (None: the mask's width) and
    kl_in_loss (grpo.kl_mode == "loss")."""

    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 0.0  # 0: off
    ratio_level: str = "token"
    agg: str = "token-mean"
    norm_length: float | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    kl_in_loss: bool = True
    entropy_coef: float = 0.0
    policy_loss: str = "ppo"
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    kl_cov_coef: float = 0.1
    rollout_correction: str = "none"
    rc_threshold: float = 2.0
    rc_low: float = 0.5

    @classmethod
    def from_grpo(cls, g) -> "LossConfig":
        """The loss settings of a run config's grpo section `g` (the one place they are read from it)."""
        derived = {"agg": g.loss_agg, "norm_length": g.norm_length or g.max_new_tokens,
                   "kl_in_loss": g.kl_mode == "loss"}
        same = {f.name: getattr(g, f.name) for f in fields(cls) if f.name not in derived}  # a renamed key fails here
        return cls(**same, **derived)


def surrogate(name: str, lp, old, advantages, mask, lc: LossConfig, *, agg: str, weights=None, selected=None,
              **counts):
    """The policy term of the loss under the registered policy loss `name` (POLICY_LOSSES), with lc's
    parameters -> (loss, stats). selected: the tokens cov_select chose, for the losses that select."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"policy loss must be one of {tuple(POLICY_LOSSES)}, got {name!r}")
    pl = POLICY_LOSSES[name]
    extra = ()
    if pl.selects:
        if selected is None:
            raise ValueError(f"policy loss {name!r} needs its token selection (RolloutBatch.cov_selected)")
        extra = (selected,)
    kw = {k: getattr(lc, f) for k, f in pl.params.items()}
    return pl.fn(lp, old, advantages, mask, *extra, agg=agg, weights=weights, **kw, **counts)


def objective(lp, ent, b, lc: LossConfig, n_tokens, n_seqs, *, agg: str | None = None, mask=None,
              policy: str | None = None):
    """The GRPO loss of one micro-batch `b` (a psyche.grpo.RolloutBatch) from its per-token log-probs lp and
    entropies ent (B, T) under the current policy -> (terms, stats):

        w    = rollout_correction(lp_old, lp_sampler)    (when grpo.rollout_correction is not "none"; else 1)
        pg   = surrogate(policy, lp, lp_old, A, mask, w)  (lp_old = lp.detach() when the batch has none: on-policy)
        kl   = agg(k(lp, lp_ref))                        (only when the batch has reference log-probs)
        H    = agg(entropy)
        loss = pg + β·kl·[kl_in_loss] − c_H·H

    terms: {"pg", "kl" (with a reference), "entropy", "loss"}, 0-d tensors with their graph; stats: the
    policy loss's statistics (and the rollout correction's). Every term is aggregated with the global counts
    n_tokens / n_seqs (all micro-batches, all ranks), so the micro-batch losses sum to the mini-batch loss
    exactly, and a mask that keeps some rows splits the loss (and its gradient) by rows. Training calls this
    with the config's `agg` and policy loss; the diagnostics call it with the others for their
    counterfactuals."""
    mask = b.mask if mask is None else mask
    agg = agg or lc.agg
    policy = policy or lc.policy_loss
    kw = dict(norm_length=lc.norm_length, n_tokens=n_tokens, n_seqs=n_seqs)
    old = b.old_logp if b.old_logp is not None else lp.detach()
    weights, rc_stats = None, {}
    if lc.rollout_correction != "none":
        weights, rc_stats = rollout_correction(old, b.sampler_logp, mask, lc.rollout_correction,
                                               threshold=lc.rc_threshold, low=lc.rc_low)
    pg, stats = surrogate(policy, lp, old, b.advantages, mask, lc, agg=agg, weights=weights,
                          selected=b.cov_selected.get(policy), **kw)
    stats.update(rc_stats)
    terms = {"pg": pg}
    loss = pg
    if b.ref_logp is not None:
        terms["kl"] = aggregate(kl_estimate(lp, b.ref_logp, lc.kl_kind), mask, agg, **kw)
        if lc.kl_coef and lc.kl_in_loss:
            loss = loss + lc.kl_coef * terms["kl"]
    terms["entropy"] = aggregate(ent, mask, agg, **kw)
    if lc.entropy_coef:
        loss = loss - lc.entropy_coef * terms["entropy"]
    terms["loss"] = loss
    return terms, stats


# ---- the registries, as the config and the README see them ----

REGISTRIES = {"advantage": ESTIMATORS, "policy_loss": POLICY_LOSSES, "loss_agg": AGGS, "kl_kind": KL_KINDS,
              "rollout_correction": ROLLOUT_CORRECTIONS}  # grpo.<key> -> its registry
NONE_FIRST = {"rollout_correction"}  # keys whose first choice is "none" (no variant at all)


def registered(key: str) -> list[str]:
    """The values grpo.<key> may take: its registry's names in registration order (the default first)."""
    return (["none"] if key in NONE_FIRST else []) + list(REGISTRIES[key])
