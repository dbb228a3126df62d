"""GRPO, one step at a time: rollout -> rewards -> advantages -> μ passes of clipped policy updates -> log.

The math lives in psyche/grpo/advantages.py, kl.py, correction.py and loss.py (plain tensor functions,
re-exported here); this file moves tensors
between the sampler, the reward functions and the optimizer. Deliberate choices, each a config knob:
- log-probs are recomputed at the sampling temperature, over the full vocabulary (no top-p): a ratio
  between log-probs at two different temperatures is not an importance ratio;
- the loss is normalised by the token / sequence counts of the whole mini-batch on all ranks, so micro-batch
  size and world size do not change the gradient (a per-micro-batch mean would weight short micro-batches up);
- the completion mask comes from the sampler's lengths, never from `token != pad`: the pad id can be a real
  token (Qwen's pad is <|endoftext|>), and a completion's stop token is trained on;
- groups whose rewards are all equal are counted (`zero_std_frac`) and, with dynamic sampling, replaced;
- truncated completions (no stop token) get reward 0 by default, or are masked, or pay an overlong penalty.

`METRICS` says, for every value a step logs, how it combines over micro-batches and over ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import MISSING, dataclass, field, fields

import torch

from psyche import dist
from psyche.grpo.correction import ROLLOUT_CORRECTIONS, rollout_correction  # noqa: F401
from psyche.grpo.kl import KL_KINDS, exact_kl, kl_estimate  # noqa: F401
from psyche.grpo.loss import (AGGS, ESTIMATORS, POLICY_LOSSES, LossConfig, aggregate,  # noqa: F401
                              compute_advantages, cov_select, objective, policy_loss, surrogate, token_covariance,
                              zero_std_groups)
from psyche.sampler import Rollout


def _per(kind: str, default=MISSING, factory=MISSING):
    """A RolloutBatch field with one entry per row, of `kind`: "token" (N, T), "row" (N,), "list" (N items),
    "token_dict" / "row_dict" (a dict of such tensors). `rows` and `concat` keep every such field aligned."""
    return field(default=default, default_factory=factory, metadata={"per": kind})


@dataclass
class RolloutBatch:
    """N = prompts × G sequences (prompt + completion), right-padded, in sequence coordinates: position t of
    a row predicts token t + 1, so completion token k of row i sits at target position P_i − 1 + k.
    A prompt's G rows are consecutive. Every per-row field has N entries and `rows` keeps them aligned."""

    input_ids: torch.Tensor = _per("token")  # (N, T)
    targets: torch.Tensor = _per("token")  # (N, T) next token at completion positions, −1 elsewhere
    mask: torch.Tensor = _per("token")  # (N, T) bool: positions whose target is a completion token (stop included)
    sampler_logp: torch.Tensor = _per("token")  # (N, T) log-probs the sampler reported, at the same positions
    lengths: torch.Tensor = _per("row")  # (N,) completion lengths
    finished: torch.Tensor = _per("row")  # (N,) ended on a stop token
    group_size: int
    rewards: torch.Tensor | None = _per("row", None)  # (N,)
    advantages: torch.Tensor | None = _per("row", None)  # (N,)
    old_logp: torch.Tensor | None = _per("token", None)  # (N, T) the sampling policy's log-probs, the trainer's
    ref_logp: torch.Tensor | None = _per("token", None)  # (N, T)
    reward_parts: dict[str, torch.Tensor] = _per("row_dict", factory=dict)  # name -> (N,) each reward function
    texts: list[str] = _per("list", factory=list)  # N completion texts
    prompts: list[str] = _per("list", factory=list)  # N prompt texts (repeated per group)
    items: list[dict] = _per("list", factory=list)  # N items the rewards checked (answer, qtype, id, ...)
    prompt_ids: list[int] = _per("list", factory=list)  # N indices of each row's prompt in the prompt file(s)
    cov_selected: dict[str, torch.Tensor] = _per("token_dict", factory=dict)  # clip_cov / kl_cov -> (N, T) bool:
    #                                                        the tokens cov_select chose (select_cov_tokens)

    @property
    def n_groups(self) -> int:
        return self.input_ids.shape[0] // self.group_size

    def rows(self, idx) -> "RolloutBatch":
        """The sub-batch of rows `idx` (a micro-batch, or whole groups), every per-row field included, trimmed
        to its longest sequence."""
        idx_list = [int(i) for i in idx]
        idx = torch.as_tensor(idx_list, dtype=torch.long, device=self.input_ids.device)
        m = self.mask[idx]
        # the last target position t needs inputs 0..t; one more column keeps the token t predicts, so each
        # trimmed row is still its whole sequence
        T = int(m.nonzero()[:, 1].max()) + ROW_TAIL if m.any() else 1
        take = {"token": lambda x: x[idx.to(x.device)][:, :T], "row": lambda x: x[idx.to(x.device)],
                "list": lambda xs: [xs[i] for i in idx_list] if xs else []}
        out = {}
        for f in fields(self):
            kind, v = f.metadata.get("per"), getattr(self, f.name)
            if kind is None or v is None:
                out[f.name] = v
            elif kind.endswith("_dict"):
                out[f.name] = {k: take[kind.removesuffix("_dict")](x) for k, x in v.items()}
            else:
                out[f.name] = take[kind](v)
        return RolloutBatch(**out)


def concat(batches: list[RolloutBatch]) -> RolloutBatch:
    """Stack rollout batches row-wise (sequences padded to the longest; advantages, log-probs and token
    selections, which come after this, are not carried)."""
    T = max(b.input_ids.shape[1] for b in batches)
    pad_value = {"input_ids": 0, "targets": -1, "mask": False, "sampler_logp": 0.0}

    def cat(name, kind, xs):
        if kind == "list":
            return [x for b in xs for x in b]
        if kind == "token":
            return torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1]), value=pad_value[name]) for x in xs])
        return torch.cat(xs)

    out = {"group_size": batches[0].group_size}
    for f in fields(RolloutBatch):
        kind = f.metadata.get("per")
        if kind is None or f.name in ("advantages", "old_logp", "ref_logp", "cov_selected"):
            continue
        vals = [getattr(b, f.name) for b in batches]
        if kind == "row_dict":
            out[f.name] = {k: torch.cat([v[k] for v in vals]) for k in vals[0]}
        elif all(v is not None for v in vals):
            out[f.name] = cat(f.name, kind, vals)
    return RolloutBatch(**out)


ROW_TAIL = 2  # columns kept past a row's last target position: its own and the token it predicts


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
    keep:    rewarded as scored: an unfinished answer that happens to parse earns reward, which
             teaches the model to ramble to the limit (kept only for ablations).
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
    """How far the sampler's log-probs are from the trainer's for the same weights (different kernels, a
    different batch shape or precision), over completion tokens y ~ π_sampler:

        logprob_gap = mean |lp_s − lp_t|,   logprob_gap_k1 = mean (lp_s − lp_t),
        logprob_gap_kl = mean (r − 1 − log r) with r = π_t(y)/π_s(y)   (k1 and k3 estimates of KL(π_s ‖ π_t))

    A gap well above float rounding means the "on-policy" update is not (grpo.rollout_correction)."""
    m = mask.bool()
    if not m.any():
        return {"logprob_gap": 0.0, "logprob_gap_k1": 0.0, "logprob_gap_kl": 0.0}
    s, t = sampler_logp[m], trainer_logp[m]
    return {"logprob_gap": float((s - t).abs().mean()), "logprob_gap_k1": float((s - t).mean()),
            "logprob_gap_kl": float(kl_estimate(s, t, "k3").mean())}


@torch.no_grad()
def completion_kl(policy, ref, batch: RolloutBatch, temperature: float, chunk: int = 256, rows: int = 16):
    """At every completion position t (in `batch.mask.nonzero()` order), both at `temperature`:
    the exact full-vocabulary KL_t = Σ_v π(v) (log π(v) − log π_ref(v)), and log π(y_t), log π_ref(y_t) of the
    sampled token -> three (n,) tensors. Forwards `rows` rows at a time (hidden states of those only), and
    never more than `chunk` × V log-probs at once."""
    parts = [_completion_kl(policy, ref, batch.rows(range(i, min(i + rows, len(batch.lengths)))), temperature,
                            chunk) for i in range(0, len(batch.lengths), rows)]
    if not parts:
        return (torch.zeros(0),) * 3
    return tuple(torch.cat([p[k] for p in parts]) for k in range(3))


def _completion_kl(policy, ref, batch: RolloutBatch, temperature: float, chunk: int):
    h = policy(batch.input_ids, return_hidden=True)
    dev_ref = next(ref.parameters()).device
    h_ref = ref(batch.input_ids.to(dev_ref), return_hidden=True)
    r, c = batch.mask.nonzero(as_tuple=True)
    exact, lp_y, lq_y = [], [], []
    for s in range(0, len(r), chunk):
        rr, cc = r[s:s + chunk], c[s:s + chunk]
        lp = torch.log_softmax(policy.lm_head(h[rr, cc]).float() / temperature, -1)  # (n, V)
        lq = torch.log_softmax(ref.lm_head(h_ref[rr.to(dev_ref), cc.to(dev_ref)]).float().to(lp.device)
                               / temperature, -1)
        exact.append((lp.exp() * (lp - lq)).sum(-1))
        y = batch.targets[rr, cc].to(lp.device)[:, None]
        lp_y.append(lp.gather(-1, y)[:, 0])
        lq_y.append(lq.gather(-1, y)[:, 0])
    if not exact:
        return (h.new_zeros(0, dtype=torch.float32),) * 3
    return torch.cat(exact), torch.cat(lp_y), torch.cat(lq_y)


def rollout_stats(rewards, advantages, lengths, finished, reward_parts: dict, group_size: int) -> dict:
    """Reward, advantage, length and group statistics of one step's rollouts (before the update); the
    arguments are a RolloutBatch's fields, of one rank or of all ranks gathered."""
    r, a, G = rewards, advantages, group_size
    st = {
        "reward_mean": float(r.mean()), "reward_std": float(r.std()) if len(r) > 1 else 0.0,
        "zero_std_frac": float(zero_std_groups(r, G).float().mean()),
        "adv_mean": float(a.mean()), "adv_std": float(a.std()) if len(a) > 1 else 0.0,
        "adv_min": float(a.min()), "adv_max": float(a.max()),
        "response_length_mean": float(lengths.float().mean()),
        "response_length_max": int(lengths.max()),
        "length_cv_in_group": float(_group_cv(lengths.float().view(-1, G))),
        "truncation_rate": float((~finished).float().mean()),
    }
    for name, v in reward_parts.items():
        st[f"reward/{name}"] = float(v.mean())
    if "format" in reward_parts:
        st["format_rate"] = float(reward_parts["format"].mean())
    if "accuracy" in reward_parts:
        acc = reward_parts["accuracy"]
        st["accuracy"] = float(acc.mean())
        st.update(length_by_outcome(lengths, acc >= 1))
        st.update(pass_rate_stats(acc.view(-1, G).float().mean(1)))
    return st


def _group_cv(L):
    """Mean over groups of std/mean of the completion lengths (G, ...) within the group (0 for a group of one)."""
    if L.shape[1] < 2:
        return torch.zeros(())
    return (L.std(dim=1) / L.mean(dim=1).clamp(min=1)).mean()


def length_by_outcome(lengths, correct) -> dict:
    """Mean completion length of the correct and of the incorrect completions (a key is left out when no
    completion has that outcome)."""
    L, out = lengths.float(), {}
    for name, sel in (("length_correct_mean", correct), ("length_incorrect_mean", ~correct)):
        if sel.any():
            out[name] = float(L[sel].mean())
    return out


PASS_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def pass_rate_stats(p) -> dict:
    """The distribution of per-prompt pass rates p (P,) (the share of a prompt's group with accuracy 1): mean,
    quantiles (pass_rate_p10 ... p90, linear interpolation), and the share of prompts all wrong / all right."""
    p = p.double()
    q = torch.quantile(p, torch.tensor(PASS_QUANTILES, dtype=torch.float64))
    return {"pass_rate_mean": float(p.mean()), **{f"pass_rate_p{round(k * 100)}": float(v)
                                                  for k, v in zip(PASS_QUANTILES, q)},
            "pass_all_wrong_frac": float((p == 0).double().mean()), "pass_all_right_frac": float((p == 1).double().mean())}


# ---- how each logged value combines ----
#   loss:       a share of the mini-batch loss: summed over micro-batches and ranks, averaged over optimizer steps
#   global:     the same on every rank (computed over all of them): averaged over optimizer steps
#   token_mean: a mean over completion tokens: weighted by each micro-batch's / rank's token count
#   token_sum:  a sum over completion tokens, logged as the mean (NAME_sum -> NAME)
#   count:      summed over ranks;   max / min: over micro-batches and ranks
#   rank_mean:  a mean over each rank's first draw of prompts (the same number on every rank): unweighted
#   seq_mean:   a mean over sequences: weighted by each micro-batch's rows; over ranks (equal rows) unweighted
METRICS = {"accuracy_sampled": "rank_mean", "zero_std_frac_sampled": "rank_mean",
           "rc/weight_max": "max", "rc/seq_truncated_frac": "seq_mean", "rc/seq_masked_frac": "seq_mean",
           "loss": "loss", "pg_loss": "loss", "kl_loss": "loss", "entropy_loss": "loss",
           "grad_norm": "global", "optimizer_steps": "global", "lr": "global",
           "entropy_sum": "token_sum",
           "update_tokens": "count", "prompts_drawn": "count", "groups_padded": "count",
           "ratio_max": "max", "refill_rounds": "max", "response_length_max": "max", "ratio_min": "min"}


def combine_kind(key: str) -> str:
    """How the logged value `key` combines (METRICS; anything else is a token-weighted mean)."""
    return METRICS.get(key, "token_mean")


def combine(values: list[float], weights: list[float], kind: str) -> float:
    """Values of one metric from several ranks (with their token counts) -> one number, per `kind`."""
    if kind in ("loss", "count"):
        return sum(values)
    if kind == "global":
        return values[0]
    if kind == "max":
        return max(values)
    if kind == "min":
        return min(values)
    if kind in ("rank_mean", "seq_mean"):
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


# ---- the update ----

def micro_loss(model, b: RolloutBatch, lc: LossConfig, n_tokens: float, n_seqs: float, diag=None):
    """Forward one micro-batch -> (loss to backprop, {logged value: 0-d tensor}, the log-probs, detached).

    The loss is `psyche.grpo.loss.objective` with the mini-batch's global counts, so summing micro-batch
    losses gives the mini-batch loss exactly. The logged values are the terms (pg_loss, kl_loss with a
    reference, entropy_loss, loss), the policy-loss statistics, n_tokens and entropy_sum, all still tensors.
    diag: a psyche.grpo.diagnostics.StepDiagnostics that sees the per-token values (no extra forward)."""
    lp, ent = sequence_logprobs(model, b, lc.temperature)
    if diag is not None:
        diag.observe(lp, ent, b, n_tokens, n_seqs)
    terms, stats = objective(lp, ent, b, lc, n_tokens, n_seqs)
    logged = {("loss" if k == "loss" else f"{k}_loss"): v.detach().double() for k, v in terms.items()}
    logged.update(stats)
    logged["n_tokens"] = b.mask.sum()
    logged["n_seqs"] = b.mask.shape[0]
    logged["entropy_sum"] = (ent.detach() * b.mask).sum().double()
    return terms["loss"], logged, lp.detach()


def selecting_losses() -> list[str]:
    """The policy losses that take a token selection from cov_select (Clip-Cov, KL-Cov)."""
    return [name for name, pl in POLICY_LOSSES.items() if pl.selects]


@torch.no_grad()
def select_cov_tokens(batch: RolloutBatch, rows: list[int], lc: LossConfig, names, *, seed: int):
    """Choose, once for the mini-batch `rows` (all ranks together), the tokens Clip-Cov cuts / KL-Cov
    penalises (psyche.grpo.loss.cov_select), from the covariance of the advantage with the log-probs of the
    policy before this update (the recomputed old log-probs, else the sampler's), and store them in
    batch.cov_selected[name] for those rows. Clip-Cov's random draw is seeded by `seed` on every rank."""
    sub = batch.rows(rows)
    lp = sub.old_logp if sub.old_logp is not None else sub.sampler_logp
    cov = token_covariance(sub.advantages, lp, sub.mask, reduce=dist.sum_over_ranks)
    idx = torch.as_tensor(rows, device=batch.mask.device)
    for name in names:
        ratio, kw = (lc.clip_cov_ratio, dict(lb=lc.clip_cov_lb, ub=lc.clip_cov_ub)) if name == "clip_cov" else \
            (lc.kl_cov_ratio, {})
        chosen = cov_select(name, cov, sub.mask, ratio=ratio, generator=torch.Generator().manual_seed(seed),
                            gather=dist.all_gather_object, rank=dist.get_rank(), **kw)
        full = batch.cov_selected.setdefault(name, torch.zeros_like(batch.mask))
        full[idx] = False
        full[idx, : chosen.shape[1]] = chosen


class StepMetrics:
    """What one step's update logs, accumulated over micro-batches on the device as METRICS says (no host sync
    until `result`): losses summed, token means weighted by each micro-batch's completion tokens, max / min."""

    def __init__(self):
        self.acc: dict[str, torch.Tensor] = {}
        self.tokens = 0  # completion tokens seen (a tensor after the first micro-batch)
        self.seqs = 0  # rows seen
        self.updates = 0

    def add(self, logged: dict):
        """One micro-batch's logged values (micro_loss's dict, with its n_tokens)."""
        w, n = logged.pop("n_tokens"), logged.pop("n_seqs")
        for k, v in logged.items():
            kind = combine_kind(k)
            v = v if kind in ("loss", "token_sum", "max", "min") else v * (n if kind == "seq_mean" else w)
            if k not in self.acc:
                self.acc[k] = v
            elif kind == "max":
                self.acc[k] = torch.maximum(self.acc[k], v)
            elif kind == "min":
                self.acc[k] = torch.minimum(self.acc[k], v)
            else:
                self.acc[k] = self.acc[k] + v
        self.tokens = self.tokens + w
        self.seqs += n

    def add_update(self, grad_norm: torch.Tensor):
        self.acc["grad_norm"] = self.acc.get("grad_norm", 0.0) + grad_norm.detach().double()
        self.updates += 1

    def result(self) -> dict:
        """The step's values as Python numbers (one host sync)."""
        acc = self.acc
        values = dict(zip(acc, torch.stack([v.double().to(self.tokens.device) for v in acc.values()]).tolist())) \
            if acc else {}
        n_tokens = int(self.tokens)
        out = {}
        for k, v in values.items():
            kind = combine_kind(k)
            if kind in ("loss", "global"):
                out[k] = v / self.updates
            elif kind == "token_sum":
                out[k.removesuffix("_sum")] = v / max(n_tokens, 1)
            elif kind in ("max", "min"):
                out[k] = v
            elif kind == "seq_mean":
                out[k] = v / max(self.seqs, 1)
            else:
                out[k] = v / max(n_tokens, 1)
        out["optimizer_steps"] = self.updates
        out["update_tokens"] = n_tokens
        return out


@dataclass(frozen=True)
class UpdatePlan:
    """How one rollout becomes optimizer steps: μ = `epochs` passes over it; each pass in mini-batches of
    `mini_batch_rows` rows of this rank (one optimizer step each), each mini-batch in micro-batches of
    `micro_batch` rows (gradient accumulation); gradients clipped to `grad_clip` (0: off); `seed`: Clip-Cov's
    draw of tokens (per mini-batch: seed + its index), the same on every rank and however many there are."""

    mini_batch_rows: int
    micro_batch: int
    epochs: int = 1
    grad_clip: float = 1.0
    seed: int = 0


def update_policy(model, optimizer, batch: RolloutBatch, lc: LossConfig, plan: UpdatePlan, *, clip_fn=None,
                  on_first_forward=None, diag=None, amp=None) -> dict:
    """The rollout's update as `plan` cuts it (UpdatePlan). Returns this rank's metrics of the step,
    combined over micro-batches as METRICS says (one host sync at the end, none per micro-batch).

    clip_fn(parameters, max_norm) -> total norm: the clipping function (FSDP2-aware from psyche.dist).
    on_first_forward(rows, sub_batch, logp): called with the trainer's log-probs of each micro-batch the first
    time it is seen (epoch 0; for the sampler-gap metric when no old log-probs were recomputed).
    diag: a psyche.grpo.diagnostics.StepDiagnostics (counterfactual losses, entropy buckets, gradient split); its
    metrics join the returned ones. It leaves the update itself unchanged.
    amp: the context the forwards run in (psyche.run.Run.amp: autocast for a bf16 compute dtype); backward
    runs outside it.
    """
    clip_fn = clip_fn or torch.nn.utils.clip_grad_norm_
    amp = amp if amp is not None else contextlib.nullcontext()
    N = batch.input_ids.shape[0]
    sums = StepMetrics()
    for epoch in range(plan.epochs):
        for start in range(0, N, plan.mini_batch_rows):
            rows = list(range(start, min(start + plan.mini_batch_rows, N)))
            cov_names = [n for n in selecting_losses() if diag is not None or n == lc.policy_loss]
            if cov_names and epoch == 0:  # chosen before the mini-batch's first update, kept for its epochs
                select_cov_tokens(batch, rows, lc, cov_names, seed=plan.seed + start // plan.mini_batch_rows)
            n_tok = dist.sum_over_ranks(batch.mask[rows].sum())  # the loss's normalisers: the whole mini-batch
            n_seq = dist.sum_over_ranks(len(rows))
            optimizer.zero_grad(set_to_none=True)
            for s in range(0, len(rows), plan.micro_batch):
                mrows = rows[s:s + plan.micro_batch]
                b = batch.rows(mrows)
                with amp:
                    loss, logged, lp = micro_loss(model, b, lc, n_tok, n_seq, diag)
                loss.backward()
                if epoch == 0 and on_first_forward is not None:
                    on_first_forward(mrows, b, lp)
                sums.add(logged)
            if diag is not None and diag.grad_split:  # extra passes; the accumulated .grad is put back
                diag.split(model, batch, rows, micro_batch=plan.micro_batch, n_tokens=n_tok, n_seqs=n_seq, amp=amp)
            sums.add_update(clip_fn(model.parameters(), plan.grad_clip if plan.grad_clip > 0 else float("inf")))
            optimizer.step()
    out = sums.result()
    if diag is not None:
        out.update(diag.result(sums.updates))
    return out
