"""GRPO internals, measured each step beside the loss that trains: plain functions plus one small collector.

Switches (grpo section) and what each costs on top of a normal step:

  diagnostics = true
    loss/<mode>, pg_loss/<mode>   the step's loss under every aggregation mode (counterfactual), from the
                                  per-token values the update already has: a few (B, T) reductions per
                                  micro-batch, no extra forward. The chosen mode's value equals `loss`/`pg_loss`.
    pg_loss/<policy loss>         the policy term under every policy-loss variant (ppo, cispo, gmpo, sapo,
                                  clip_cov, kl_cov) with the chosen aggregation: the same reductions again;
                                  the chosen variant's value equals `pg_loss`.
    entropy/pos_<lo>-<hi>,        token entropy by position in the completion and by the sign of the row's
    entropy/adv_<sign>            advantage: reductions of the update's own entropy, free.
    kl_exact, kl_k1..k3,          exact full-vocabulary KL(π‖π_ref) per completion token against the one-sample
    kl_bias/k*, kl_abs_err/k*     estimates k1, k2, k3 of the sampled token: one no-grad forward of the policy
                                  and of the reference plus a V-wide log-softmax at each completion position
                                  (what `exact_kl` costs; it replaces that computation). Needs a reference.
  grad_split = true
    grad_norm/<part>              the gradient of the loss split by term (policy, kl, entropy) and by advantage
    grad_split_residual           sign (adv_pos, adv_neg, adv_zero); each split sums to the total gradient. One
                                  extra forward + backward of every micro-batch per part: up to 6 parts, i.e.
                                  up to 7x the update's compute (parts that are zero by the config are skipped);
                                  memory: two extra gradient-sized buffers. Also logs the free in-update values
                                  above (loss/<mode>, entropy/...).
  (always, with an accuracy reward)
    RUN_DIR/pass_rates.jsonl      per prompt, the fraction of its group with accuracy reward 1: free.
  replay_steps = [k, ...] / replay_every = N
    RUN_DIR/replay/step_XXXX/     the step's rollout batch, loss settings and a checkpoint (model, optimizer,
                                  scheduler, RNG) taken before the update; `psyche replay` recomputes it.
                                  Cost: one checkpoint write per dumped step.

Every function here only reads the batch and the model; the update's gradients are restored exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from psyche import dist
from psyche.jsonl import jsonl_lines
from psyche.grpo.kl import KL_KINDS, kl_estimate
from psyche.grpo.loss import AGGS, POLICY_LOSSES, objective

POS_EDGES = (0, 4, 16, 64, 256, 1024)  # completion-position buckets [0,4) [4,16) ... [1024, ∞)
SIGNS = (("adv_pos", 1), ("adv_neg", -1), ("adv_zero", 0))
PASS_RATES = "pass_rates.jsonl"


# ---- the loss, part by part ----

def split_parts(lc, has_ref: bool) -> dict[str, list[str]]:
    """The two partitions of the loss whose gradients `part_gradients` computes, as far as the config makes
    them non-trivial: by term (policy, kl, entropy; skipped when the policy term is the whole loss) and by
    advantage sign (adv_pos, adv_neg, adv_zero; adv_zero only when a KL or entropy term exists or the policy
    loss has a term without the advantage (KL-Cov's penalty), else its gradient is zero by construction)."""
    from psyche.grpo.loss import POLICY_LOSSES

    terms = ["policy"] + (["kl"] if has_ref and lc.kl_coef and lc.kl_in_loss else []) + \
        (["entropy"] if lc.entropy_coef else [])
    # KL-Cov's penalty on its selected tokens does not depend on the advantage (Clip-Cov's rows at A = 0 then
    # cost one more pass, with a zero gradient)
    zero_learns = len(terms) > 1 or POLICY_LOSSES[lc.policy_loss].selects
    signs = [name for name, _ in SIGNS if name != "adv_zero" or zero_learns]
    return {"term": terms if len(terms) > 1 else [], "sign": signs}


def part_loss(name: str, lp, ent, b, lc, n_tokens, n_seqs):
    """The loss of one part: a term of the objective (policy: pg; kl: β·kl; entropy: −c_H·H) or the whole
    objective over the rows whose advantage has one sign."""
    if name.startswith("adv_"):
        s = dict(SIGNS)[name]
        rows = torch.sign(b.advantages.to(lp.dtype)) == s  # (B,)
        return objective(lp, ent, b, lc, n_tokens, n_seqs, mask=b.mask & rows[:, None])[0]["loss"]
    t, _ = objective(lp, ent, b, lc, n_tokens, n_seqs)
    return {"policy": lambda: t["pg"], "kl": lambda: lc.kl_coef * t["kl"],
            "entropy": lambda: -lc.entropy_coef * t["entropy"]}[name]()


def part_gradients(model, batch, rows, lc, names, *, micro_batch: int, n_tokens, n_seqs, amp=None):
    """For each part in `names`: zero the gradients, then forward + backward that part's loss over the
    mini-batch `rows` micro-batch by micro-batch (the same accumulation as the update), and yield
    (name, [p.grad for p in params]). The caller reads the gradients before asking for the next part."""
    from psyche.grpo.step import sequence_logprobs

    params = [p for p in model.parameters() if p.requires_grad]
    for name in names:
        for p in params:
            p.grad = None
        for s in range(0, len(rows), micro_batch):
            b = batch.rows(rows[s:s + micro_batch])
            with amp if amp is not None else contextlib.nullcontext():
                lp, ent = sequence_logprobs(model, b, lc.temperature)
                loss = part_loss(name, lp, ent, b, lc, n_tokens, n_seqs)
            loss.backward()
        yield name, [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def _norm(tensors) -> float:
    return float(dist.global_norm(tensors))


# ---- positions and signs ----

def completion_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) index of each completion token within its completion (0, 1, ...), −1 off the mask."""
    return torch.where(mask, mask.long().cumsum(-1) - 1, -1)


def position_buckets(edges=POS_EDGES) -> list[tuple[str, int, float]]:
    """[(name, lo, hi)] half-open buckets of completion positions: pos_0-3, pos_4-15, ..., pos_1024+."""
    bounds = list(edges) + [float("inf")]
    return [(f"pos_{lo}-{int(hi) - 1}" if hi != float("inf") else f"pos_{lo}+", lo, hi)
            for lo, hi in zip(bounds[:-1], bounds[1:])]


# ---- the collector used inside update_policy ----

class StepDiagnostics:
    """Collects one step's in-update diagnostics. psyche.grpo.update_policy calls `observe` for each
    micro-batch (counterfactual losses, entropy buckets), `split` for each mini-batch when grad_split is on,
    and `result(n_updates)` at the end; the values are summed over ranks inside `result`, so every rank
    returns the global numbers."""

    def __init__(self, lc, *, grad_split: bool = False, pos_edges=POS_EDGES):
        self.lc, self.grad_split = lc, grad_split
        self.buckets = position_buckets(pos_edges)
        self.sums: dict[str, float] = defaultdict(float)  # this rank's shares: summed over ranks in result()
        self.norms: dict[str, float] = defaultdict(float)  # gradient norms: already global
        self.residual = 0.0

    @torch.no_grad()
    def observe(self, lp, ent, b, n_tokens, n_seqs):
        """Add this micro-batch's share of the mini-batch loss under every mode, and its entropy sums."""
        lp, ent = lp.detach(), ent.detach()
        for mode in AGGS:
            t, _ = objective(lp, ent, b, self.lc, n_tokens, n_seqs, agg=mode)
            self.sums[f"pg_loss/{mode}"] += float(t["pg"])
            self.sums[f"loss/{mode}"] += float(t["loss"])
        for name, pl in POLICY_LOSSES.items():  # every policy-loss variant under the configured aggregation
            if pl.selects and name not in b.cov_selected:  # (Clip-Cov, KL-Cov: when update_policy chose their tokens)
                continue
            t, _ = objective(lp, ent, b, self.lc, n_tokens, n_seqs, policy=name)
            self.sums[f"pg_loss/{name}"] += float(t["pg"])
        e = ent.float()
        pos = completion_positions(b.mask)
        for name, lo, hi in self.buckets:
            sel = b.mask & (pos >= lo) & (pos < hi)
            self.sums[f"H/{name}"] += float(e[sel].sum())
            self.sums[f"n/{name}"] += int(sel.sum())
        sign = torch.sign(b.advantages.float())
        for name, s in SIGNS:
            sel = b.mask & (sign == s)[:, None]
            self.sums[f"H/{name}"] += float(e[sel].sum())
            self.sums[f"n/{name}"] += int(sel.sum())

    def split(self, model, batch, rows, *, micro_batch, n_tokens, n_seqs, amp=None):
        """Gradient norms of each part of the mini-batch `rows`, with the accumulated total gradient (already in
        .grad) put back untouched afterwards. Logs ‖g_part‖ and the relative residual ‖g − Σ g_part‖ / ‖g‖ of
        each partition (≈ 1e-7 in fp32: the parts are exact by construction)."""
        params = [p for p in model.parameters() if p.requires_grad]
        total = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        t_norm = _norm(total)
        parts = split_parts(self.lc, batch.ref_logp is not None)
        if not parts["term"]:  # the policy term is the whole loss
            self.norms["grad_norm/policy"] += t_norm
        for names in parts.values():
            if not names:
                continue
            acc = [torch.zeros_like(g) for g in total]
            for name, grads in part_gradients(model, batch, rows, self.lc, names, micro_batch=micro_batch,
                                              n_tokens=n_tokens, n_seqs=n_seqs, amp=amp):
                self.norms[f"grad_norm/{name}"] += _norm(grads)
                for a, g in zip(acc, grads):
                    a.add_(g)
            res = _norm([t - a for t, a in zip(total, acc)]) / max(t_norm, 1e-30)
            self.residual = max(self.residual, res)
        for p, g in zip(params, total):
            p.grad = g

    def result(self, n_updates: int) -> dict:
        """Metrics: loss/<mode>, pg_loss/<mode> (mean over the step's optimizer steps, like `loss`), entropy by
        bucket (token-weighted means; empty buckets left out), grad_norm/<part> (mean over optimizer steps)."""
        s = dist.sum_over_ranks(dict(self.sums))
        out = {}
        for k, v in sorted(s.items()):
            if k.startswith(("loss/", "pg_loss/")):  # pg_loss/<agg mode> and pg_loss/<policy loss>
                out[k] = v / max(n_updates, 1)
            elif k.startswith("H/") and s["n/" + k[2:]] > 0:
                out["entropy/" + k[2:]] = v / s["n/" + k[2:]]
        if self.grad_split:
            out.update({k: v / max(n_updates, 1) for k, v in sorted(self.norms.items())})
            out["grad_split_residual"] = self.residual
        return out


# ---- KL estimators against the exact KL ----

@torch.no_grad()
def kl_check(policy, ref, batch, temperature: float, chunk: int = 256) -> dict:
    """Exact KL_t at every completion position t (psyche.grpo.completion_kl) against the one-sample estimates
    k1, k2, k3 (psyche.grpo.kl.kl_estimate) of the sampled token y_t ~ π:

        kl_exact = mean_t KL_t          kl_k{i} = mean_t k_i,t
        kl_bias/k{i} = mean_t (k_i,t − KL_t)      kl_abs_err/k{i} = mean_t |k_i,t − KL_t|

    k1 and k3 are unbiased (E_y[k] = KL_t), k2 is not; the absolute error shows each one's spread. Token means
    are combined over ranks by token weight (psyche.grpo.METRICS), which is exact for all of these."""
    from psyche.grpo.step import completion_kl

    ex, lp_y, lq_y = completion_kl(policy, ref, batch, temperature, chunk)
    if not ex.numel():
        return {"kl_exact": 0.0}
    out = {"kl_exact": float(ex.mean())}
    for k in KL_KINDS:
        e = kl_estimate(lp_y, lq_y, k)
        out[f"kl_{k}"] = float(e.mean())
        out[f"kl_bias/{k}"] = float((e - ex).mean())
        out[f"kl_abs_err/{k}"] = float((e - ex).abs().mean())
    return out


# ---- per-prompt pass rates ----

def pass_counts(b, key: str = "accuracy") -> dict[str, list[int]]:
    """Prompt id -> [completions with reward `key` == 1, completions sampled] for this step's groups. The id is
    the item's `id` when it has one, else the prompt's index in the prompt file(s)."""
    if key not in b.reward_parts:
        return {}
    G = b.group_size
    hits = (b.reward_parts[key] == 1).view(-1, G).sum(1).tolist()
    out: dict[str, list[int]] = {}
    for g, n in enumerate(hits):
        item = b.items[g * G] if b.items else {}
        pid = str(item.get("id", f"#{b.prompt_ids[g * G]}"))
        c = out.setdefault(pid, [0, 0])
        c[0] += n
        c[1] += G
    return out


def record_pass_rates(run_dir, step: int, b, key: str = "accuracy"):
    """Append {"step", "pass_rate": {prompt id: fraction}} for this step's prompts to RUN_DIR/pass_rates.jsonl
    (every rank's groups gathered to rank 0). Call on every rank."""
    everyone = dist.gather_object(pass_counts(b, key))
    if everyone is None or not any(everyone):
        return
    merged: dict[str, list[int]] = {}
    for d in everyone:
        for pid, (h, n) in d.items():
            m = merged.setdefault(pid, [0, 0])
            m[0] += h
            m[1] += n
    with open(Path(run_dir) / PASS_RATES, "a", encoding="utf-8") as f:  # ids sorted: the same file for any world size
        f.write(json.dumps({"step": step, "pass_rate": {k: merged[k][0] / merged[k][1] for k in sorted(merged)}},
                           ensure_ascii=False) + "\n")


def read_pass_rates(run_dir) -> list[dict]:
    """The rows of RUN_DIR/pass_rates.jsonl by step; a step written twice (a resumed run redoing the steps
    after its last checkpoint) keeps its last line."""
    path = Path(run_dir) / PASS_RATES
    if not path.is_file():
        return []
    rows = {}
    for line in jsonl_lines(path.read_text(encoding="utf-8")):  # (item ids may hold U+2028: not splitlines)
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]


# ---- step dumps for replay ----

TENSORS = ("input_ids", "targets", "mask", "sampler_logp", "lengths", "finished", "rewards", "advantages",
           "old_logp", "ref_logp")
REPLAY_DIR = "replay"


def replay_due(gc, step: int) -> bool:
    return step in gc.replay_steps or bool(gc.replay_every and step % gc.replay_every == 0)


def dump_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / REPLAY_DIR / f"step_{step:04d}"


def save_step_dump(run_dir, step: int, b, *, cfg, lc, plan, model, optimizer, scheduler) -> Path:
    """RUN_DIR/replay/step_XXXX/: batch_rank{r}.safetensors (the rollout batch exactly as the update sees it),
    batch_rank{r}.json (texts, prompts, items), step.json (step, ranks, loss settings, the UpdatePlan),
    config.toml, and checkpoints/step_XXXXXXXX (model, optimizer, scheduler, RNG; psyche.checkpoint) taken
    before the update. Call on every rank, after advantages and before update_policy."""
    from psyche.checkpoint import save_checkpoint
    from psyche.config import to_toml

    d = dump_dir(run_dir, step)
    rank = dist.get_rank()
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: getattr(b, k).contiguous() for k in TENSORS if getattr(b, k) is not None}
    tensors.update({f"reward_parts/{k}": v.contiguous() for k, v in b.reward_parts.items()})
    save_file({k: v.cpu() for k, v in tensors.items()}, str(d / f"batch_rank{rank}.safetensors"))
    text = {"group_size": b.group_size, "texts": b.texts, "prompts": b.prompts,
            "items": b.items, "prompt_ids": b.prompt_ids}
    (d / f"batch_rank{rank}.json").write_text(json.dumps(text, ensure_ascii=False), encoding="utf-8")
    if dist.is_main():
        meta = {"step": step, "world_size": dist.get_world_size(), "loss_config": dataclasses.asdict(lc),
                "update": dataclasses.asdict(plan)}
        (d / "step.json").write_text(json.dumps(meta, indent=1) + "\n")
        (d / "config.toml").write_text(to_toml(cfg))
    save_checkpoint(d, step, model=model, optimizer=optimizer, scheduler=scheduler, keep_last=1,
                    state={"step": step})
    return d


def save_logged(d: Path, metrics: dict | None):
    """The metrics the run logged for the dumped step (rank 0), for `psyche replay` to compare against."""
    if metrics is not None:
        (Path(d) / "logged.json").write_text(json.dumps(metrics) + "\n")


def load_step_dump(d) -> tuple[dict, "RolloutBatch"]:  # noqa: F821
    """(step.json, the global RolloutBatch). With several ranks, their shares are interleaved so that global
    mini-batch k holds every rank's k-th local mini-batch, as in the run. Never unpickles."""
    from psyche.grpo.step import RolloutBatch

    d = Path(d)
    meta = json.loads((d / "step.json").read_text())
    world = meta["world_size"]
    shards = [load_file(str(d / f"batch_rank{r}.safetensors")) for r in range(world)]
    texts = [json.loads((d / f"batch_rank{r}.json").read_text(encoding="utf-8")) for r in range(world)]
    n_local = shards[0]["input_ids"].shape[0]
    per = meta["update"]["mini_batch_rows"]
    order = [(r, i) for c in range(0, n_local, per) for r in range(world) for i in range(c, min(c + per, n_local))]
    T = max(s["input_ids"].shape[1] for s in shards)

    def take(key, fill):
        if key not in shards[0]:
            return None
        rows = []
        for r, i in order:
            x = shards[r][key][i]
            if x.dim() == 1:  # a (T_r,) row of a (N, T_r) tensor: pad to the widest shard
                x = torch.cat([x, torch.full((T - x.shape[0],), fill, dtype=x.dtype)])
            rows.append(x)
        return torch.stack(rows)

    b = RolloutBatch(take("input_ids", 0), take("targets", -1), take("mask", False), take("sampler_logp", 0.0),
                     take("lengths", 0), take("finished", False), texts[0]["group_size"], take("rewards", 0.0),
                     take("advantages", 0.0), take("old_logp", 0.0), take("ref_logp", 0.0))
    b.reward_parts = {k.split("/", 1)[1]: take(k, 0.0) for k in shards[0] if k.startswith("reward_parts/")}
    for name in ("texts", "prompts", "items", "prompt_ids"):
        setattr(b, name, [texts[r][name][i] for r, i in order if texts[r].get(name)])
    return meta, b
