"""GRPO, one step at a time: rollout -> rewards -> advantages -> μ passes of clipped policy updates -> log.

The math lives in psyche/grpo_loss.py (plain tensor functions, re-exported here); this file moves tensors
between the sampler, the reward functions and the optimizer. Deliberate choices, each a config knob:
- log-probs are recomputed at the sampling temperature (trap 4), over the full vocabulary (no top-p);
- the loss is normalised by the token / sequence counts of the whole mini-batch on all ranks, so micro-batch
  size and world size do not change the gradient (trap 1);
- the completion mask comes from the sampler's lengths, never from `token != pad` (trap 5);
- groups whose rewards are all equal are counted (`zero_std_frac`) and, with dynamic sampling, replaced;
- truncated completions (no stop token) get reward 0 by default, or are masked, or pay an overlong penalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from psyche.grpo_loss import (AGGS, ESTIMATORS, KL_KINDS, aggregate, compute_advantages, exact_kl,  # noqa: F401
                              kl_estimate, policy_loss, zero_std_groups)
from psyche.sampler import Rollout


@dataclass
class RolloutBatch:
    """N = prompts × G sequences (prompt + completion), right-padded, in sequence coordinates: position t of
    a row predicts token t + 1, so completion token k of row i sits at target position P_i − 1 + k."""

    input_ids: torch.Tensor  # (N, T)
    targets: torch.Tensor  # (N, T) next token at completion positions, −1 elsewhere
    mask: torch.Tensor  # (N, T) bool: positions whose target is a completion token (stop token included)
    sampler_logp: torch.Tensor  # (N, T) log-probs the sampler reported, at the same positions
    lengths: torch.Tensor  # (N,) completion lengths
    finished: torch.Tensor  # (N,) ended on a stop token
    group_size: int
    rewards: torch.Tensor | None = None  # (N,)
    advantages: torch.Tensor | None = None  # (N,)
    old_logp: torch.Tensor | None = None  # (N, T) the sampling policy's log-probs as the trainer computes them
    ref_logp: torch.Tensor | None = None  # (N, T)
    reward_parts: dict = field(default_factory=dict)  # name -> (N,) values of each reward function
    texts: list = field(default_factory=list)  # N completion texts
    prompts: list = field(default_factory=list)  # N prompt texts (repeated per group)

    def rows(self, idx):
        """The sub-batch of rows `idx` (a micro-batch), trimmed to its longest sequence."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.input_ids.device)
        T = int((self.mask[idx].nonzero()[:, 1].max() + 2) if self.mask[idx].any() else 1)
        pick = lambda x: None if x is None else x[idx][:, :T]  # noqa: E731
        return RolloutBatch(self.input_ids[idx][:, :T], self.targets[idx][:, :T], self.mask[idx][:, :T],
                            self.sampler_logp[idx][:, :T], self.lengths[idx], self.finished[idx], self.group_size,
                            None if self.rewards is None else self.rewards[idx],
                            None if self.advantages is None else self.advantages[idx],
                            pick(self.old_logp), pick(self.ref_logp))


def build_batch(prompts: list[list[int]], rollout: Rollout, pad_id: int) -> RolloutBatch:
    """Join each row's prompt and completion into one right-padded sequence with its target mask."""
    N, L = rollout.tokens.shape
    device = rollout.tokens.device
    plen = torch.tensor([len(prompts[int(p)]) for p in rollout.prompt_index], device=device)  # (N,)
    T = int((plen + rollout.lengths).max())
    ids = torch.full((N, T), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(rollout.prompt_index.tolist()):
        ids[i, : len(prompts[p])] = torch.tensor(prompts[p], device=device)
    r, c = rollout.mask.nonzero(as_tuple=True)  # completion token c of row r ...
    ids[r, plen[r] + c] = rollout.tokens[r, c]  # ... sits at plen + c
    targets = torch.full((N, T), -1, dtype=torch.long, device=device)
    mask = torch.zeros(N, T, dtype=torch.bool, device=device)
    slp = torch.zeros(N, T, dtype=torch.float32, device=device)
    tpos = plen[r] - 1 + c  # and is predicted by the logit one position earlier
    targets[r, tpos], mask[r, tpos], slp[r, tpos] = rollout.tokens[r, c], True, rollout.logprobs[r, c].float()
    return RolloutBatch(ids, targets, mask, slp, rollout.lengths.clone(), rollout.finished.clone(),
                        group_size=int((rollout.prompt_index == rollout.prompt_index[0]).sum()))


def sequence_logprobs(model, batch: RolloutBatch, temperature: float):
    """(logp, entropy), both (N, T), of the batch's targets under `model` at `temperature` (0 off-target)."""
    return model(batch.input_ids, targets=batch.targets, temperature=temperature)


@torch.no_grad()
def batched_logprobs(model, batch: RolloutBatch, micro_batch: int, temperature: float) -> torch.Tensor:
    """Log-probs (N, T) of the batch's targets under `model`, micro-batch by micro-batch (no gradient)."""
    dev = next(model.parameters()).device
    out = torch.zeros(batch.mask.shape, dtype=torch.float32, device=batch.mask.device)
    for i in range(0, batch.mask.shape[0], micro_batch):
        rows = list(range(i, min(i + micro_batch, batch.mask.shape[0])))
        sub = batch.rows(rows)
        lp, _ = model(sub.input_ids.to(dev), targets=sub.targets.to(dev), temperature=temperature)
        out[rows, : lp.shape[1]] = lp.float().to(out.device)
    return out


def shape_rewards(rewards: torch.Tensor, batch: RolloutBatch, *, truncation: str, max_new_tokens: int,
                  overlong_buffer: int = 0, overlong_penalty: float = 1.0) -> torch.Tensor:
    """Apply the truncation policy to raw rewards (N,).

    zero:    a truncated completion (no stop token) gets reward 0 — its answer never finished (default).
    keep:    rewarded as scored (trap 7; kept only for ablations).
    mask:    rewarded as scored, but excluded from the loss (its mask is cleared by `apply_truncation_mask`).
    penalty: DAPO's soft overlong punishment: for lengths in (max − buffer, max] the reward falls linearly by
             up to `overlong_penalty`; truncated completions get the full penalty.
    """
    r = rewards.clone()
    trunc = ~batch.finished
    if truncation == "zero":
        r[trunc] = 0.0
    elif truncation == "penalty":
        L = batch.lengths.to(r.dtype)
        start = max_new_tokens - overlong_buffer
        frac = ((L - start) / max(overlong_buffer, 1)).clamp(0, 1) if overlong_buffer > 0 else torch.zeros_like(L)
        r = r - overlong_penalty * torch.where(trunc, torch.ones_like(frac), frac)
    elif truncation not in ("keep", "mask"):
        raise ValueError(f"truncation must be zero, keep, mask or penalty, got {truncation!r}")
    return r


def apply_truncation_mask(batch: RolloutBatch):
    """truncation = mask: truncated completions contribute no tokens to the loss."""
    batch.mask = batch.mask & batch.finished[:, None]
    batch.targets = torch.where(batch.mask, batch.targets, -1)


def logprob_gap(sampler_logp, trainer_logp, mask) -> dict:
    """How far the sampler's log-probs are from the trainer's for the same weights (trap 10):
    mean |Δ| over completion tokens and the k3 KL estimate between the two."""
    m = mask.bool()
    if not m.any():
        return {"logprob_gap": 0.0, "logprob_gap_kl": 0.0}
    d = (sampler_logp - trainer_logp)[m]
    return {"logprob_gap": float(d.abs().mean()),
            "logprob_gap_kl": float(kl_estimate(trainer_logp[m], sampler_logp[m], "k3").mean())}


@torch.no_grad()
def exact_kl_tokens(policy, ref, batch: RolloutBatch, temperature: float, chunk: int = 256) -> torch.Tensor:
    """Full-vocabulary KL(π || π_ref) at every completion position (n,), chunked over positions."""
    h = policy(batch.input_ids, return_hidden=True)
    h_ref = ref(batch.input_ids.to(next(ref.parameters()).device), return_hidden=True).to(h.device)
    r, c = batch.mask.nonzero(as_tuple=True)
    out = []
    for s in range(0, len(r), chunk):
        rr, cc = r[s:s + chunk], c[s:s + chunk]
        out.append(exact_kl(policy.lm_head(h[rr, cc]), ref.lm_head(h_ref[rr, cc].to(ref.lm_head.weight.device))
                            .to(h.device), temperature))
    return torch.cat(out) if out else h.new_zeros(0)


def rollout_stats(batch: RolloutBatch, max_new_tokens: int) -> dict:
    """Reward, advantage, length and group statistics of one step's rollouts (before the update)."""
    r, a, G = batch.rewards, batch.advantages, batch.group_size
    st = {
        "reward_mean": float(r.mean()), "reward_std": float(r.std()) if len(r) > 1 else 0.0,
        "zero_std_frac": float(zero_std_groups(r, G).float().mean()),
        "adv_mean": float(a.mean()), "adv_std": float(a.std()) if len(a) > 1 else 0.0,
        "adv_min": float(a.min()), "adv_max": float(a.max()),
        "response_length_mean": float(batch.lengths.float().mean()),
        "response_length_max": int(batch.lengths.max()),
        "truncation_rate": float((~batch.finished).float().mean()),
    }
    for name, v in batch.reward_parts.items():
        st[f"reward/{name}"] = float(v.mean())
    if "format" in batch.reward_parts:
        st["format_rate"] = float(batch.reward_parts["format"].mean())
    if "accuracy" in batch.reward_parts:
        st["accuracy"] = float(batch.reward_parts["accuracy"].mean())
    return st


def reduce_scalar(x: float, op: str = "sum") -> float:
    """Sum (or max) of a number over ranks (identity in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([float(x)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return float(t.item())
    return float(x)


def _global_sum(x: float) -> float:
    """Loss denominators must count the whole batch on every rank."""
    return reduce_scalar(x, "sum")


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


def micro_loss(model, b: RolloutBatch, lc: LossConfig, n_tokens: float, n_seqs: float, loss_scale: float = 1.0,
               diag=None):
    """Forward one micro-batch, return (loss to backprop, detached terms and stats).

    loss = policy_loss + β·KL(agg) − entropy_coef·H(agg), every term aggregated with the mini-batch's global
    counts, so summing micro-batch losses gives the mini-batch loss exactly. `loss_scale` multiplies the
    backpropagated value (e.g. the world size when the data-parallel wrapper averages gradients over ranks).
    diag: a psyche.diagnostics.StepDiagnostics that sees the per-token values (no extra forward).
    """
    lp, ent = sequence_logprobs(model, b, lc.temperature)
    if diag is not None:
        diag.observe(lp, ent, b, n_tokens, n_seqs)
    old = b.old_logp if b.old_logp is not None else lp.detach()
    agg = dict(norm_length=lc.norm_length, n_tokens=n_tokens, n_seqs=n_seqs)
    pg, st = policy_loss(lp, old, b.advantages, b.mask, clip_low=lc.clip_low, clip_high=lc.clip_high,
                         dual_clip=lc.dual_clip, ratio_level=lc.ratio_level, agg=lc.agg, **agg)
    loss = pg
    terms = {"pg_loss": float(pg.detach())}
    if b.ref_logp is not None:
        kl = aggregate(kl_estimate(lp, b.ref_logp, lc.kl_kind), b.mask, lc.agg, **agg)
        terms["kl_loss"] = float(kl.detach())
        if lc.kl_coef and lc.kl_in_loss:
            loss = loss + lc.kl_coef * kl
    h = aggregate(ent, b.mask, lc.agg, **agg)
    terms["entropy_loss"] = float(h.detach())
    if lc.entropy_coef:
        loss = loss - lc.entropy_coef * h
    terms["loss"] = float(loss.detach())
    st["n_tokens"] = int(b.mask.sum())
    st["entropy_sum"] = float((ent.detach() * b.mask).sum())
    return loss * loss_scale, terms, st, lp.detach()


def update_policy(model, optimizer, batch: RolloutBatch, lc: LossConfig, *, mini_batch_rows: int, micro_batch: int,
                  epochs: int = 1, grad_clip: float = 1.0, loss_scale: float = 1.0, clip_fn=None,
                  on_first_forward=None, diag=None) -> dict:
    """μ = `epochs` passes over the rollout; each pass splits it into mini-batches (one optimizer step each),
    each mini-batch into micro-batches (gradient accumulation). Returns averaged stats.

    clip_fn(parameters, max_norm) -> total norm: the clipping function (FSDP2-aware from psyche.dist).
    on_first_forward(rows, logp): called with the trainer's log-probs of each row the first time it is seen
    (epoch 0, before any update of this step when `old_logp` was recomputed), for the sampler-gap metric.
    diag: a psyche.diagnostics.StepDiagnostics (counterfactual losses, entropy buckets, gradient split); its
    metrics join the returned ones. It leaves the update itself unchanged.
    """
    clip_fn = clip_fn or torch.nn.utils.clip_grad_norm_
    N = batch.input_ids.shape[0]
    acc: dict[str, float] = {}
    n_updates = 0
    weights = 0
    for epoch in range(epochs):
        for start in range(0, N, mini_batch_rows):
            rows = list(range(start, min(start + mini_batch_rows, N)))
            n_tok = _global_sum(batch.mask[rows].sum())
            n_seq = _global_sum(len(rows))
            optimizer.zero_grad(set_to_none=True)
            for s in range(0, len(rows), micro_batch):
                mrows = rows[s:s + micro_batch]
                b = batch.rows(mrows)
                loss, terms, st, lp = micro_loss(model, b, lc, n_tok, n_seq, loss_scale, diag)
                loss.backward()
                if epoch == 0 and on_first_forward is not None:
                    on_first_forward(mrows, b, lp)
                for k, v in terms.items():  # terms are already fractions of the mini-batch loss: sum them
                    acc[k] = acc.get(k, 0.0) + v
                w = st.pop("n_tokens")
                for k, v in st.items():
                    if k == "entropy_sum":
                        acc[k] = acc.get(k, 0.0) + v
                    elif k in ("ratio_max",):
                        acc[k] = max(acc.get(k, -math.inf), v)
                    elif k in ("ratio_min",):
                        acc[k] = min(acc.get(k, math.inf), v)
                    else:
                        acc[k] = acc.get(k, 0.0) + v * w
                weights += w
            if diag is not None and diag.grad_split:  # extra passes; the accumulated .grad is put back
                diag.split(model, batch, rows, micro_batch=micro_batch, n_tokens=n_tok, n_seqs=n_seq,
                           loss_scale=loss_scale)
            gn = clip_fn(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
            acc["grad_norm"] = acc.get("grad_norm", 0.0) + float(gn)
            optimizer.step()
            n_updates += 1
    out = {}
    for k, v in acc.items():
        if k in ("loss", "pg_loss", "kl_loss", "entropy_loss", "grad_norm"):
            out[k] = v / n_updates
        elif k == "entropy_sum":
            out["entropy"] = v / max(weights, 1)
        elif k in ("ratio_max", "ratio_min"):
            out[k] = v
        else:
            out[k] = v / max(weights, 1)
    out["optimizer_steps"] = n_updates
    out["update_tokens"] = weights
    if diag is not None:
        out.update(diag.result(n_updates))
    return out
