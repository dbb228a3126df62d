"""The GRPO stage (`python train.py --stage grpo`, alone or under torchrun).

Per step: take the next prompts -> sample group_size completions each with the KV-cache sampler (the policy's
own weights; gathered once under FSDP2) -> rewards -> (optionally drop zero-std groups and refill) ->
reference and old log-probs (`score_rollouts`) -> advantages -> μ passes of mini-batch updates -> log, dump,
checkpoint. Every quantity of `rollout_stats`, the update's metrics and the timings goes to metrics.jsonl;
psyche/run.py does what SFT does too (config, precision, resume, logging, checkpoints, export).

Where this differs from the GRPO paper (DeepSeekMath), each a setting with the paper's choice available:
- the KL penalty is k3 in the loss by default, as in the paper, but k1/k2 and a KL in the reward are settings;
- the default aggregation is token-mean over the mini-batch (DAPO), not the paper's per-sequence mean
  (`grpo.loss_agg = "seq-mean-token-mean"`);
- with one update per rollout (mini_batch = prompts_per_step, ppo_epochs = 1) the old log-probs are the
  current ones detached (ratio 1), so the clip never acts; the defaults make 4 updates per rollout (mini-batches
  of 32 of 128 prompts), where it does;
- truncated completions get reward 0 (the paper does not say), and groups with equal rewards can be
  replaced (dynamic sampling, DAPO).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch

from psyche import dist
from psyche.checkpoint import latest_checkpoint
from psyche.config import RunConfig
from psyche.data import DataError, format_mc_prompt, read_records
from psyche.grpo.diagnostics import (StepDiagnostics, kl_check, record_pass_rates, replay_due, save_logged,
                                     save_step_dump)
from psyche.grpo.step import (LossConfig, RolloutBatch, apply_truncation_mask, batched_logprobs, build_batch, combine,
                              combine_kind, compute_advantages, completion_kl, concat, kl_estimate, logprob_gap,
                              rollout_stats, shape_rewards, UpdatePlan, update_policy, zero_std_groups)
from psyche.lora import Reference
from psyche.rewards import RewardError, RewardSet
from psyche.sampler import generate, row_seeds, splitmix64


# ---- prompts ----

def load_prompts(paths, tok, style: str = "plain", max_prompt_length: int = 1024) -> tuple[list[dict], int]:
    """GRPO records -> [{ids, text, item, where}], and how many were dropped as too long.

    A record is an MC item {question, options, answer[, qtype]} whose prompt is built in `style` (plain: the
    same user turn SFT trains on; psyche: Psyche-R1's system prompt and user prefix), or {messages, answer}
    with the prompt turns given. `answer` is the gold letters the accuracy rewards check."""
    from psyche.pceb import PSYCHE_SYSTEM, PSYCHE_USER_PREFIX

    if not paths:
        raise DataError("grpo.paths is empty: give at least one JSONL/JSON file of prompts with answers")
    out, dropped = [], 0
    for p in paths:
        n0 = len(out) + dropped
        for rec, where in read_records(p):
            if not str(rec.get("answer", "")).strip():
                raise DataError(f"{where}: missing or empty 'answer' (GRPO needs the gold answer)")
            if "messages" in rec:
                msgs = rec["messages"]
                if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                         for m in msgs):
                    raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
                msgs = [m for m in msgs if m["role"] != "assistant"]
            elif "question" in rec and isinstance(rec.get("options"), dict):
                body = format_mc_prompt(rec["question"], rec["options"])
                msgs = ([{"role": "system", "content": PSYCHE_SYSTEM},
                         {"role": "user", "content": PSYCHE_USER_PREFIX + body}] if style == "psyche"
                        else [{"role": "user", "content": body}])
            else:
                raise DataError(f"{where}: expected 'question' + 'options' or 'messages' (the prompt), got keys "
                                f"{sorted(rec)}")
            ids, _ = tok.encode_chat(msgs, add_generation_prompt=True)
            if len(ids) > max_prompt_length:
                dropped += 1
                continue
            item = {"answer": str(rec["answer"]).strip(), "qtype": rec.get("qtype", "")}
            item.update({k: v for k, v in rec.items() if k in ("id", "type", "category")})
            out.append({"ids": ids, "text": tok.render_chat(msgs, True), "item": item, "where": where})
        if len(out) + dropped == n0:
            raise DataError(f"{p}: empty dataset (no records)")
    if not out:
        raise DataError(f"every prompt is longer than grpo.max_prompt_length={max_prompt_length} tokens")
    return out, dropped


class PromptStream:
    """Prompts in a seeded order, reshuffled each epoch; position = number of prompts handed out so far, so
    a resumed run continues with the same prompts."""

    def __init__(self, n: int, seed: int, position: int = 0):
        self.n, self.seed, self.pos = n, seed, position
        self._epoch, self._cached = None, None

    def _order(self, epoch):
        if epoch != self._epoch:  # shuffled once per epoch, not once per prompt handed out
            self._cached = list(range(self.n))
            random.Random(f"{self.seed}/{epoch}").shuffle(self._cached)
            self._epoch = epoch
        return self._cached

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.pos, self.n)
            out.append(self._order(epoch)[i])
            self.pos += 1
        return out


# ---- one step ----

def sample_groups(policy, prompts, idx, gc, tok, reward_set, seeds) -> RolloutBatch:
    """Rollouts for prompts `idx` (row seeds `seeds`, len(idx) * group_size) with their rewards, shaped by the
    truncation policy (so dynamic sampling judges a group by the rewards it will train on)."""
    ids = [prompts[i]["ids"] for i in idx]
    with torch.no_grad(), dist.unsharded(policy):
        r = generate(policy, ids, n=gc.group_size, max_new_tokens=gc.max_new_tokens, sampling=gc.sampling,
                     stop_token_ids=tok.stop_ids, seed=seeds, pad_id=tok.pad_id)
    b = build_batch(ids, r, tok.pad_id)
    src = [idx[int(p)] for p in r.prompt_index]  # each row's prompt
    b.texts = r.texts(tok, skip_special_tokens=True)
    b.prompts = [prompts[i]["text"] for i in src]
    b.items = [prompts[i]["item"] for i in src]
    b.prompt_ids = src
    totals, parts = [], {name: [] for name in reward_set.weights}
    for k, (i, text) in enumerate(zip(src, b.texts)):
        where = f"the prompt at {prompts[i]['where']}, sample {k % gc.group_size + 1} of {gc.group_size}"
        total, part = reward_set(b.prompts[k], text, b.items[k], where)  # a raising or non-finite reward stops
        totals.append(total)
        for name, v in part.items():
            parts[name].append(v)
    b.reward_parts = {k: torch.tensor(v, dtype=torch.float32) for k, v in parts.items()}
    b.rewards = shape_rewards(torch.tensor(totals, dtype=torch.float32, device=b.input_ids.device), b,
                              truncation=gc.truncation, max_new_tokens=gc.max_new_tokens,
                              overlong_buffer=gc.overlong_buffer, overlong_penalty=gc.overlong_penalty)
    return b


def select_groups(b: RolloutBatch, groups: list[int]) -> RolloutBatch:
    """The rows of groups `groups`, in that order."""
    G = b.group_size
    return b.rows([g * G + j for g in groups for j in range(G)])


def local_share(global_idx: list, rank: int, world: int, chunk: int) -> list[int]:
    """Positions of this rank's part of a global list cut into mini-batch chunks of `chunk` items: rank r takes
    the r-th slice of every chunk, so mini-batch k is the same prompts whatever the number of ranks."""
    per = chunk // world
    return [c + rank * per + j for c in range(0, len(global_idx), chunk) for j in range(per)]


def gather_rollouts(policy, prompts, stream, gc, tok, reward_set, *, seed, step, rank, world, mini):
    """This rank's share of the step's prompt groups, sampled and rewarded.

    All ranks take the same prompts_per_step prompts from the stream and keep their share (`local_share`);
    each row's sampling seed comes from its position in the global batch. With dynamic sampling, groups whose
    rewards are all equal are dropped and replaced from new prompts in collective rounds (every rank draws the
    same prompts and uses its own slice) up to `max_refill` rounds; what is still missing is filled with dropped
    groups (zero advantage: no gradient), so every rank runs the same number of micro-batches."""
    G = gc.group_size
    n_local = gc.prompts_per_step // world
    glob = stream.take(gc.prompts_per_step)
    mine = local_share(glob, rank, world, mini)
    seeds = rank_row_seeds(seed, step, 0, gc.prompts_per_step * G)
    rows = torch.tensor([p * G + j for p in mine for j in range(G)])
    b = sample_groups(policy, prompts, [glob[p] for p in mine], gc, tok, reward_set, seeds[rows])
    zs = zero_std_groups(b.rewards, G).tolist()
    info = {"zero_std_frac_sampled": sum(zs) / len(zs), "prompts_drawn": len(mine)}
    if "accuracy" in b.reward_parts:  # before dynamic sampling keeps only mixed groups: comparable across runs
        info["accuracy_sampled"] = float(b.reward_parts["accuracy"].mean())
    if not gc.dynamic_sampling:
        return b, info
    kept = [select_groups(b, [g for g, z in enumerate(zs) if not z])]
    spare = [select_groups(b, [g for g, z in enumerate(zs) if z])]
    rounds = 0
    while rounds < gc.max_refill:
        need = max(0, n_local - sum(x.n_groups for x in kept))
        width = int(dist.max_over_ranks(need))  # every rank takes part in every round
        if width == 0:
            break
        rounds += 1
        glob = stream.take(width * world)  # the same draw on every rank
        if need == 0:
            continue
        idx = [glob[rank * width + j] for j in range(need)]
        seeds = rank_row_seeds(seed, step, rounds, width * world * G)
        rows = torch.tensor([(rank * width + j) * G + k for j in range(need) for k in range(G)])
        nb = sample_groups(policy, prompts, idx, gc, tok, reward_set, seeds[rows])
        z = zero_std_groups(nb.rewards, G).tolist()
        kept.append(select_groups(nb, [g for g, v in enumerate(z) if not v]))
        spare.append(select_groups(nb, [g for g, v in enumerate(z) if v]))
        info["prompts_drawn"] += need
    n_kept = sum(x.n_groups for x in kept)
    b = concat([x for x in kept + spare if x.n_groups])
    b = select_groups(b, list(range(n_local)))
    info.update(refill_rounds=rounds, groups_padded=max(0, n_local - n_kept))
    return b, info


# Three primes combine (run seed, step, refill round) into one integer, which splitmix64 scrambles into the base
# of the rows' seeds. Within one run two (step, round) pairs meet only if their steps differ by a multiple of
# 15,485,863, so no two rollouts of a run share seeds; neighbouring bases give unrelated row seeds.
SEED_MULT, STEP_MULT, ROUND_MULT = 1_000_003, 7919, 15_485_863


def rank_row_seeds(seed: int, step: int, round_: int, n_rows: int) -> torch.Tensor:
    """Sampling seeds of the global batch's rows for (step, refill round): each rank samples its rows with
    their global seeds, so the rollouts of R ranks together equal those of one process."""
    base = int(splitmix64(torch.tensor([seed * SEED_MULT + step * STEP_MULT + round_ * ROUND_MULT]))[0])
    return row_seeds(base, n_rows)


def combine_ranks(b: RolloutBatch, local: dict) -> dict | None:
    """Metrics of the whole step on rank 0 (None elsewhere): rollout statistics over every rank's rollouts,
    and each rank's other metrics combined as psyche.grpo.METRICS says (weight: the rank's completion tokens)."""
    mine = {"rewards": b.rewards, "advantages": b.advantages, "lengths": b.lengths, "finished": b.finished,
            "parts": b.reward_parts, "tokens": int(b.mask.sum()), "local": local}
    everyone = dist.gather_object(mine)
    if everyone is None:
        return None
    cat = lambda k: torch.cat([e[k].cpu() for e in everyone])  # noqa: E731
    out = rollout_stats(cat("rewards"), cat("advantages"), cat("lengths"), cat("finished"),
                        {k: torch.cat([e["parts"][k] for e in everyone]) for k in b.reward_parts}, b.group_size)
    keys = dict.fromkeys(k for e in everyone for k in e["local"])  # a rank without a token may lack a mean
    for k in keys:
        have = [e for e in everyone if e["local"].get(k) is not None]
        out[k] = combine([e["local"][k] for e in have], [max(e["tokens"], 1) for e in have], combine_kind(k))
    return out


def dump_rollouts(path: Path, step: int, b: RolloutBatch):
    with open(path, "a", encoding="utf-8") as f:
        for i in range(len(b.texts)):
            f.write(json.dumps({"step": step, "prompt": b.prompts[i], "completion": b.texts[i],
                                "reward": float(b.rewards[i]), "advantage": float(b.advantages[i]),
                                "parts": {k: float(v[i]) for k, v in b.reward_parts.items()},
                                "finished": bool(b.finished[i]), "length": int(b.lengths[i]),
                                "item": b.items[i]}, ensure_ascii=False) + "\n")


# ---- the step's other log-probs ----

@torch.no_grad()
def score_rollouts(policy, ref, b: RolloutBatch, gc, *, n_updates: int, device) -> tuple[dict, float]:
    """Fill in the log-probs the loss compares against, and measure them -> (metrics, time of the reference).

    reference: `ref`'s log-probs of the completions (when there is a reference; parked on the CPU between
      steps with ref_offload).
    old (the policy that sampled), by `grpo.old_logprobs`:
      recompute: the policy's own forward before any update, but only when this step makes several updates;
                 with one update the policy is still the sampling policy, so `objective` uses lp.detach()
                 and no forward is spent (the sampler gap is then measured on the update's first forward);
      sampler:   the sampler's log-probs as they came (no forward; carries the sampler-trainer gap).
    Measured: logprob_gap (sampler vs trainer), kl (policy vs reference, estimator kl_kind), and kl_exact or
    the estimator check (diagnostics). With kl_mode = reward the KL penalty is taken from the rewards here."""
    metrics = {}
    t0 = time.time()
    movable = isinstance(ref, torch.nn.Module) and gc.ref_offload
    if ref is not None:
        if movable:
            ref.to(device)
        b.ref_logp = batched_logprobs(ref, b, gc.micro_batch, gc.temperature)
    t_ref = time.time() - t0
    if gc.old_logprobs == "sampler":
        b.old_logp = b.sampler_logp
    if gc.old_logprobs == "recompute" and n_updates > 1:
        with dist.unsharded(policy):
            b.old_logp = batched_logprobs(policy, b, gc.micro_batch, gc.temperature)
    recomputed = b.old_logp if gc.old_logprobs == "recompute" else None
    if recomputed is not None:
        metrics.update(logprob_gap(b.sampler_logp, recomputed, b.mask))
    if ref is None:
        return metrics, t_ref
    if gc.diagnostics:  # the exact KL and the k1/k2/k3 estimates of the same tokens
        with dist.unsharded(policy):
            metrics.update(kl_check(policy, ref, b, gc.temperature))
    elif gc.exact_kl:
        with dist.unsharded(policy):
            n = min(len(b.lengths), gc.exact_kl_rows or len(b.lengths))
            ex = completion_kl(policy, ref, b.rows(range(n)), gc.temperature)[0]
        metrics["kl_exact"] = float(ex.mean()) if ex.numel() else 0.0
    # the policy's log-probs before the update, where this step has them: recomputed, or the sampler's (old =
    # sampler); on-policy steps measure the KL on the update's first forward instead (FirstForward)
    lp_now = recomputed if recomputed is not None else b.sampler_logp if gc.old_logprobs == "sampler" else None
    if lp_now is not None and b.mask.any():  # (truncation = mask can leave a rank without a token)
        metrics["kl"] = float(kl_estimate(lp_now[b.mask], b.ref_logp[b.mask], gc.kl_kind).mean())
    if gc.kl_mode == "reward" and gc.kl_coef:
        lp_now = lp_now if lp_now is not None else b.sampler_logp
        b.rewards = b.rewards - gc.kl_coef * (kl_estimate(lp_now, b.ref_logp, gc.kl_kind) * b.mask).sum(1)
    if movable:
        ref.to("cpu")
    return metrics, t_ref


class FirstForward:
    """On-policy steps (no old log-probs): the update's first forward of each micro-batch is the trainer's
    view of the sampling policy, so the sampler gap and the KL to the reference are measured on it, free."""

    def __init__(self, kl_kind: str):
        self.kl_kind, self.gap, self.kl = kl_kind, [], []

    def __call__(self, rows, sub: RolloutBatch, lp):
        if not sub.mask.any():  # (truncation = mask can leave a micro-batch without a token)
            return
        self.gap.append((sub.sampler_logp[sub.mask], lp[sub.mask]))
        if sub.ref_logp is not None:
            self.kl.append(kl_estimate(lp[sub.mask], sub.ref_logp[sub.mask], self.kl_kind))

    def metrics(self) -> dict:
        """The rank's sampler gap and KL; nothing where it saw no token (its ranks' mates then speak for it)."""
        out = {}
        if self.gap:
            sl, tl = torch.cat([g[0] for g in self.gap]), torch.cat([g[1] for g in self.gap])
            out.update(logprob_gap(sl, tl, torch.ones_like(sl, dtype=torch.bool)))
        if self.kl:
            out["kl"] = float(torch.cat(self.kl).mean())
        return out


def sampler_precision(name: str, run):
    """The context rollouts run in: the training forwards' (auto), or autocast to another dtype
    (grpo.sampler_dtype), so the sampler's log-probs differ from the trainer's as an inference engine's do."""
    if name == "auto":
        return run.amp
    dtype = getattr(torch, name)
    if dtype == torch.float32:
        return torch.autocast(run.device.type, enabled=False)
    return torch.autocast(run.device.type, dtype=dtype)


@torch.no_grad()
def reset_reference(policy, ref):
    """ref <- the policy's current weights (grpo.ref_reset_every): the KL then anchors to a recent policy."""
    with dist.unsharded(policy):  # full parameters on every rank for the copy
        current = dict(policy.named_parameters())
        for name, p in ref.named_parameters():
            p.copy_(current[name].detach().to(p.device, p.dtype))


def write_step_files(run_dir: Path, gc, step: int, b: RolloutBatch, metrics: dict | None, dumped: Path | None):
    """The step's files beside metrics.jsonl: pass_rates.jsonl (each prompt's pass rate, when an accuracy reward
    is among the rewards), the replay dump's logged metrics, and rollouts.jsonl (every dump_every steps and at
    step 1). Call on every rank."""
    if "accuracy" in b.reward_parts:
        record_pass_rates(run_dir, step, b)
    if dumped is not None:
        save_logged(dumped, metrics)
    if dist.is_main() and gc.dump_every and (step % gc.dump_every == 0 or step == 1):
        dump_rollouts(run_dir / "rollouts.jsonl", step, b)


# ---- the loop ----

class Laps:
    """Wall time of a step's phases: lap(name) ends the phase that ran since the last lap (or takes `seconds`
    measured inside it, e.g. the reference's share of scoring) -> times {time_<name>: s}; total: all of them."""

    def __init__(self):
        self.t, self.total, self.times = time.time(), 0.0, {}

    def lap(self, name: str, seconds: float | None = None):
        now = time.time()
        dt = now - self.t if seconds is None else seconds
        self.times[f"time_{name}"] = dt
        self.total += dt
        self.t = now if seconds is None else self.t + seconds

def build_reference(cfg: RunConfig, run, init_dir: Path, device):
    """The reference policy of the KL (None when neither kl_coef nor exact_kl needs one) and where it lives:
    with LoRA, the policy itself with its adapters off; otherwise a frozen copy of the starting weights on
    every rank, in the compute dtype, on the CPU with grpo.ref_offload."""
    from psyche.weights import load_pretrained

    gc = cfg.grpo
    if not (gc.kl_coef > 0 or gc.exact_kl):
        return None, "none (kl_coef = 0 and exact_kl off)"
    if cfg.lora.rank > 0:
        return Reference(run.model), "the policy with its adapters off"
    ref, _ = load_pretrained(init_dir, dtype=run.compute_dtype, device="cpu" if gc.ref_offload else device)
    return ref.requires_grad_(False).eval(), "on CPU" if gc.ref_offload else f"on {device}"


def run_grpo(cfg: RunConfig) -> Path:
    """Train per `cfg.grpo`; returns the run directory."""
    from psyche.run import Run, begin
    from psyche.run import prepare_init
    from psyche.tokenizer import Tokenizer
    from psyche.validate import check_grpo

    rank, world, device = begin(cfg, check_grpo)
    gc = cfg.grpo
    mini = gc.mini_batch or gc.prompts_per_step
    reward_set = RewardSet(dict(zip(gc.rewards, gc.reward_weights)))

    # ---- data, policy, reference ----
    init_dir = prepare_init(gc.init or cfg.model.init, Path(cfg.run.out), cfg.run.seed)
    tok = Tokenizer.from_dir(init_dir)
    prompts, too_long = load_prompts(gc.paths, tok, gc.prompt_style, gc.max_prompt_length)
    total = gc.steps if gc.steps > 0 else math.ceil(gc.epochs * max(1, len(prompts) // gc.prompts_per_step))
    run = Run(cfg, init_dir, device, gc.optim, total)
    policy = run.model
    ref, where = build_reference(cfg, run, init_dir, device)
    frozen_ref = ref if isinstance(ref, torch.nn.Module) else None  # a model of its own (checkpointed, movable)
    lc = LossConfig.from_grpo(gc)
    n_updates = gc.prompts_per_step // mini * gc.ppo_epochs
    dist.print0(f"grpo: {len(prompts)} prompts ({too_long} dropped as longer than {gc.max_prompt_length} tokens); "
                f"{gc.prompts_per_step} prompts x {gc.group_size} samples per step, {gc.prompts_per_step // mini} "
                f"updates per pass, {gc.ppo_epochs} pass(es); {total} steps; policy {run.params} "
                f"from {init_dir}, {run.precision}; reference {where}")
    state = run.resume({"reference": frozen_ref} if frozen_ref is not None else None)
    if state:
        dist.print0(f"resumed from {run.resumed} at step {run.start}")
    stream = PromptStream(len(prompts), cfg.run.seed, state["prompt_position"] if state else 0)
    run.open()
    plan = UpdatePlan(mini_batch_rows=(mini // world) * gc.group_size, micro_batch=gc.micro_batch,
                      epochs=gc.ppo_epochs, grad_clip=gc.optim.grad_clip)
    sampler_amp = sampler_precision(gc.sampler_dtype, run)

    for step in run.steps():
        clock = Laps()
        try:  # rollouts and rewards
            with sampler_amp:
                b, sampling = gather_rollouts(policy, prompts, stream, gc, tok, reward_set, seed=cfg.run.seed,
                                              step=step, rank=rank, world=world, mini=mini)
        except RewardError as e:
            raise RewardError(f"step {step}: {e}; stopped before the update. Last good checkpoint: "
                              f"{latest_checkpoint(run.dir) or 'none'} (untouched)") from e
        clock.lap("rollout")
        if gc.shuffle_rewards:  # negative control: each completion learns from another's reward
            perm = torch.randperm(len(b.rewards), generator=torch.Generator().manual_seed(cfg.run.seed * SEED_MULT
                                                                                          + step * STEP_MULT + rank))
            b.rewards = b.rewards[perm.to(b.rewards.device)]
        with run.amp:  # reference and old log-probs
            metrics, t_ref = score_rollouts(policy, ref, b, gc, n_updates=n_updates, device=device)
        clock.lap("reference", t_ref)
        clock.lap("old_logprob")
        b.advantages = compute_advantages(b.rewards, gc.group_size, estimator=gc.advantage, std_ddof=gc.std_ddof,
                                          eps=gc.adv_eps, lengths=b.lengths, reduce=dist.sum_over_ranks)
        if sampling.get("groups_padded"):  # dynamic sampling's fill-up groups (the last ones): no gradient,
            b.advantages[-sampling["groups_padded"] * gc.group_size:] = 0  # whatever the estimator or KL in reward
        metrics.update(sampling)
        if gc.truncation == "mask":
            apply_truncation_mask(b)
        first = FirstForward(gc.kl_kind) if b.old_logp is None else None
        step_plan = dataclasses.replace(plan, seed=cfg.run.seed * SEED_MULT + step * STEP_MULT)  # (Clip-Cov's draw)
        dumped = (save_step_dump(run.dir, step, b, cfg=cfg, lc=lc, plan=step_plan, model=policy,
                                 optimizer=run.optimizer, scheduler=run.scheduler) if replay_due(gc, step) else None)
        diag = StepDiagnostics(lc, grad_split=gc.grad_split) if gc.diagnostics or gc.grad_split else None
        upd = update_policy(policy, run.optimizer, b, lc, step_plan, clip_fn=dist.clip_grad_norm_,
                            on_first_forward=first, diag=diag, amp=run.amp)
        if first is not None:
            metrics.update(first.metrics())
        lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        clock.lap("update")
        if not math.isfinite(upd["loss"]) or not math.isfinite(upd["grad_norm"]):
            run.stop(step, f"loss {upd['loss']} / grad norm {upd['grad_norm']}", "before the checkpoint")
        metrics.update(upd)
        metrics.update(lr=lr, **clock.times)
        metrics = combine_ranks(b, metrics)
        reset = bool(gc.ref_reset_every and step % gc.ref_reset_every == 0)
        if reset and frozen_ref is not None:
            reset_reference(policy, frozen_ref)
        if metrics is not None:
            n_tok = metrics["update_tokens"] // max(gc.ppo_epochs, 1)
            metrics.update(tokens=n_tok, tok_per_s=n_tok / max(clock.total, 1e-9), ref_reset=int(reset))
        write_step_files(run.dir, gc, step, b, metrics, dumped)
        run.log(step, metrics, ("loss", "reward_mean", "accuracy", "zero_std_frac", "kl", "entropy",
                                "response_length_mean", "clip_frac_high", "grad_norm", "logprob_gap",
                                "time_rollout", "time_update"),
                reward=f"{metrics['reward_mean']:.3f}" if metrics else "")
        if run.checkpoint_due(step):
            run.checkpoint(step, tok, {"prompt_position": stream.pos})
    run.finish(tok)
    return run.dir
