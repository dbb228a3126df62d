"""GRPO's math as plain tensor functions: advantages, KL estimators, the clipped policy loss, aggregation,
and `objective`, the one place where they are put together into the loss that trains.

Nothing here knows about models or sampling, so each function can be checked by hand and compared with
other implementations. Notation: G completions per prompt, reward r_i, per-token log-probs lp (current
policy), lp_old (the policy that sampled), lp_ref (reference); ratio ρ = exp(lp − lp_old); mask m over
completion tokens; A_i a completion's advantage, broadcast over its tokens. Statistics are returned as
0-d tensors, never Python floats, so the math forces no host-device sync; the caller converts them when
it logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "batch_std")
KL_KINDS = ("k1", "k2", "k3")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def compute_advantages(rewards: torch.Tensor, group_size: int, *, estimator: str = "grpo", std_ddof: int = 1,
                       eps: float = 1e-6) -> torch.Tensor:
    """rewards (N,) with N = prompts × group_size, a prompt's completions consecutive -> advantages (N,).

    grpo:      A_i = (r_i − mean_g r) / (std_g r + eps), std over the group with `std_ddof`
               (1: verl, TRL, OpenRLHF; 0: several minimal implementations).
    dr_grpo:   A_i = r_i − mean_g r  (Dr. GRPO: no division by the std; no difficulty bias).
    rloo:      A_i = r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean_g r)  (leave-one-out baseline).
    batch_std: A_i = (r_i − mean_g r) / (std_batch r + eps)  (group mean, std over the whole batch).
    A group whose rewards are all equal gets A = 0 under every estimator (also with eps = 0).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    if (estimator == "rloo" and group_size < 2) or (estimator == "grpo" and group_size - std_ddof < 1):
        raise ValueError(f"group_size={group_size} is too small for estimator {estimator!r} (ddof={std_ddof})")
    r = rewards.double().view(-1, group_size)  # (P, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        std = r.std(dim=1, correction=std_ddof, keepdim=True)
        adv = torch.where(std > 0, centred / (std + eps), 0.0)  # eps = 0 must not turn 0/0 into NaN
    elif estimator == "dr_grpo":
        adv = centred
    elif estimator == "rloo":
        adv = centred * group_size / (group_size - 1)
    else:
        adv = centred / (rewards.double().std(correction=std_ddof) + eps)
    return adv.flatten().to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P,) bool: groups whose rewards are all equal (they carry no learning signal)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(dim=1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimates of KL(π || π_ref) from samples of π. With d = lp_ref − lp:

    k1 = −d = lp − lp_ref               (unbiased, high variance, can be negative)
    k2 = ½ d²                           (biased, low variance, ≥ 0)
    k3 = exp(d) − d − 1                 (unbiased, low variance, ≥ 0; Schulman's estimator, used by GRPO)
    No clamping: values are returned as computed.
    """
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"kl kind must be one of {KL_KINDS}, got {kind!r}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str, *, norm_length: float | None = None,
              n_tokens: float | None = None, n_seqs: float | None = None) -> torch.Tensor:
    """Reduce per-token values (B, T) to a scalar.

    token-mean:              Σ_{i,t} m·v / n_tokens
    seq-mean-token-mean:     Σ_i (Σ_t m·v / Σ_t m) / n_seqs          (the original GRPO)
    seq-mean-token-sum:      Σ_i Σ_t m·v / n_seqs
    seq-mean-token-sum-norm: Σ_i Σ_t m·v / (n_seqs · norm_length)     (Dr. GRPO; norm_length a constant,
                                                                      by default the mask's width T)
    n_tokens / n_seqs default to this batch's counts. Pass the *global* counts (all micro-batches, all
    ranks) and sum the micro-batch results: the total is then independent of how the batch was split.
    """
    m = mask.to(values.dtype)
    n_tokens = m.sum() if n_tokens is None else n_tokens
    n_seqs = m.shape[0] if n_seqs is None else n_seqs
    if agg == "token-mean":
        return (values * m).sum() / max(float(n_tokens), 1.0)
    if agg == "seq-mean-token-mean":
        return ((values * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / max(float(n_seqs), 1.0)
    if agg == "seq-mean-token-sum":
        return (values * m).sum() / max(float(n_seqs), 1.0)
    if agg == "seq-mean-token-sum-norm":
        L = float(norm_length if norm_length is not None else mask.shape[-1])
        return (values * m).sum() / (max(float(n_seqs), 1.0) * L)
    raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")


def policy_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: float | None = None, ratio_level: str = "token", agg: str = "token-mean",
                norm_length: float | None = None, n_tokens=None, n_seqs=None):
    """The clipped surrogate. logp, old_logp, mask: (B, T); advantages: (B,). Returns (loss, stats).

    ratio_level "token":    ρ_{i,t} = exp(lp_{i,t} − lp_old_{i,t})
    ratio_level "sequence": ρ_{i,t} = s_i = exp(Σ_t m·(lp − lp_old) / Σ_t m)   (GSPO)
    ℓ_{i,t} = max(−A_i ρ, −A_i clip(ρ, 1 − clip_low, 1 + clip_high))            (PPO; DAPO when high > low)
    dual clip (c = dual_clip > 1): for A_i < 0, ℓ ← min(ℓ, −c·A_i)              (bounds the loss of
                                                                                 huge ratios on bad samples)
    loss = aggregate(ℓ, mask, agg, ...)  — see `aggregate`.
    stats (0-d float64 tensors): clip_frac_low (ρ < 1 − clip_low with A < 0: the clip removed the gradient),
    clip_frac_high (ρ > 1 + clip_high with A > 0), dual_clip_frac, ratio_mean / ratio_max / ratio_min over
    masked tokens (1 when the mask is empty).
    """
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    m = mask.to(logp.dtype)
    log_ratio = (logp - old_logp) * m
    if ratio_level == "token":
        ratio = torch.exp(log_ratio)
    else:
        seq = log_ratio.sum(-1) / m.sum(-1).clamp(min=1)  # (B,)
        ratio = torch.exp(seq)[:, None].expand_as(logp)
    A = advantages.to(logp.dtype)[:, None]  # (B, 1)
    unclipped = -A * ratio
    clipped = -A * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss_tok = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(loss_tok, dtype=torch.bool)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -A * dual_clip
        dual = (A < 0) & (loss_tok > bound)
        loss_tok = torch.where(A < 0, torch.minimum(loss_tok, bound), loss_tok)
    loss = aggregate(loss_tok, mask, agg, norm_length=norm_length, n_tokens=n_tokens, n_seqs=n_seqs)
    with torch.no_grad():
        mb = mask.bool()
        n = mb.sum().clamp(min=1).double()  # (stays a tensor: no sync)
        r = ratio.detach().double()
        some = mb.any()
        stats = {
            "clip_frac_low": ((ratio < 1 - clip_low) & (A < 0) & mb).sum().double() / n,
            "clip_frac_high": ((ratio > 1 + clip_high) & (A > 0) & mb).sum().double() / n,
            "dual_clip_frac": (dual & mb).sum().double() / n,
            "ratio_mean": torch.where(some, (r * mb).sum() / n, 1.0),
            "ratio_max": torch.where(some, r.masked_fill(~mb, -torch.inf).max(), 1.0),
            "ratio_min": torch.where(some, r.masked_fill(~mb, torch.inf).min(), 1.0),
        }
    return loss, stats


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary KL(π || π_ref) per position from logits (..., V) -> (...). The yardstick for k1-k3."""
    lp = torch.log_softmax(logits.float() / temperature, -1)
    lq = torch.log_softmax(ref_logits.float() / temperature, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


# ---- the objective ----

@dataclass
class LossConfig:
    """The knobs of one update, as plain values (a view of the run config's grpo section)."""

    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    ratio_level: str = "token"
    agg: str = "token-mean"
    norm_length: float | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    kl_in_loss: bool = True
    entropy_coef: float = 0.0


def objective(lp, ent, b, lc: LossConfig, n_tokens, n_seqs, *, agg: str | None = None, mask=None):
    """The GRPO loss of one micro-batch `b` (a psyche.grpo.RolloutBatch) from its per-token log-probs lp and
    entropies ent (B, T) under the current policy -> (terms, stats):

        pg   = policy_loss(lp, lp_old, A, mask)          (lp_old = lp.detach() when the batch has none: on-policy)
        kl   = agg(k(lp, lp_ref))                        (only when the batch has reference log-probs)
        H    = agg(entropy)
        loss = pg + β·kl·[kl_in_loss] − c_H·H

    terms: {"pg", "kl" (with a reference), "entropy", "loss"}, 0-d tensors with their graph; stats: the
    policy loss's statistics. Every term is aggregated with the global counts n_tokens / n_seqs (all
    micro-batches, all ranks), so the micro-batch losses sum to the mini-batch loss exactly, and a mask that
    keeps some rows splits the loss (and its gradient) by rows. Training calls this with the config's `agg`;
    the diagnostics call it with every other `agg` and with sub-masks for their counterfactuals."""
    mask = b.mask if mask is None else mask
    agg = agg or lc.agg
    kw = dict(norm_length=lc.norm_length, n_tokens=n_tokens, n_seqs=n_seqs)
    old = b.old_logp if b.old_logp is not None else lp.detach()
    pg, stats = policy_loss(lp, old, b.advantages, mask, clip_low=lc.clip_low, clip_high=lc.clip_high,
                            dual_clip=lc.dual_clip, ratio_level=lc.ratio_level, agg=agg, **kw)
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
