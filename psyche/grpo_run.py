"""The GRPO loop (`python train.py --stage grpo`, alone or under torchrun).

Per step: take the next prompts -> sample group_size completions each with the KV-cache sampler (the policy's
own weights; gathered once under FSDP2) -> rewards -> (optionally drop zero-std groups and refill) ->
reference and old log-probs -> advantages -> μ passes of mini-batch updates -> log, dump, checkpoint.
Every quantity of `psyche.grpo.rollout_stats`, the update stats and the timings goes to metrics.jsonl.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import torch

from psyche import dist
from psyche.checkpoint import fault, latest_checkpoint, load_checkpoint, save_checkpoint, export_hf
from psyche.config import ConfigError, ModelConfig, RunConfig, config_diff, load_run_config, to_toml
from psyche.data import DataError, format_mc_prompt, read_records
from psyche.diagnostics import StepDiagnostics, kl_check, record_pass_rates, replay_due, save_logged, save_step_dump
from psyche.grpo import (LossConfig, RolloutBatch, apply_truncation_mask, batched_logprobs, build_batch,
                         compute_advantages, exact_kl_tokens, reduce_scalar, kl_estimate, logprob_gap, rollout_stats, sequence_logprobs,
                         shape_rewards, update_policy, zero_std_groups)
from psyche.metrics import MetricsLogger, step_line
from psyche.rewards import RewardError, RewardSet
from psyche.sampler import generate, row_seeds, splitmix64


# ---- prompts ----

def load_prompts(paths, tok, style: str = "plain", max_prompt_length: int = 1024) -> tuple[list[dict], int]:
    """GRPO records -> [{ids, text, item, where}], and how many were dropped as too long.

    A record is an MC item {question, options, answer[, qtype]} whose prompt is built in `style` (plain: the
    same user turn SFT trains on; psyche: Psyche-R1's system prompt and user prefix), or {messages, answer}
    with the prompt turns given. `answer` is the gold letters the accuracy rewards check."""
    from psyche.prompts import PSYCHE_SYSTEM, PSYCHE_USER_PREFIX

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

    def _order(self, epoch):
        order = list(range(self.n))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.pos, self.n)
            out.append(self._order(epoch)[i])
            self.pos += 1
        return out


# ---- one step ----

def sample_groups(policy, prompts, idx, gc, tok, reward_set, seeds):
    """Rollouts for prompts `idx` (row seeds `seeds`, len(idx) * group_size) with their rewards."""
    ids = [prompts[i]["ids"] for i in idx]
    with torch.no_grad(), dist.unsharded(policy):
        r = generate(policy, ids, n=gc.group_size, max_new_tokens=gc.max_new_tokens, temperature=gc.temperature,
                     top_p=gc.top_p, top_k=gc.top_k, stop_token_ids=tok.stop_ids, seeds=seeds, pad_id=tok.pad_id)
    b = build_batch(ids, r, tok.pad_id)
    b.texts = r.texts(tok, skip_special_tokens=True)
    b.prompts = [prompts[idx[int(p)]]["text"] for p in r.prompt_index]
    b.items = [prompts[idx[int(p)]]["item"] for p in r.prompt_index]
    totals, parts = [], {name: [] for name in reward_set.weights}
    wheres = [f"the prompt at {prompts[idx[int(p)]]['where']}, sample {k % gc.group_size + 1} of {gc.group_size}"
              for k, p in enumerate(r.prompt_index)]
    for prompt, text, item, where in zip(b.prompts, b.texts, b.items, wheres):
        total, part = reward_set(prompt, text, item, where)  # a raising or non-finite reward stops the run
        totals.append(total)
        for k, v in part.items():
            parts[k].append(v)
    b.rewards = torch.tensor(totals, dtype=torch.float32, device=b.input_ids.device)
    b.reward_parts = {k: torch.tensor(v, dtype=torch.float32) for k, v in parts.items()}
    b.prompt_ids = list(idx)
    return b


def concat(batches: list[RolloutBatch]) -> RolloutBatch:
    """Stack rollout batches (padding sequences to the longest)."""
    T = max(b.input_ids.shape[1] for b in batches)

    def pad(x, v):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)

    out = RolloutBatch(torch.cat([pad(b.input_ids, 0) for b in batches]), torch.cat([pad(b.targets, -1) for b in batches]),
                       torch.cat([pad(b.mask, False) for b in batches]),
                       torch.cat([pad(b.sampler_logp, 0.0) for b in batches]),
                       torch.cat([b.lengths for b in batches]), torch.cat([b.finished for b in batches]),
                       batches[0].group_size, torch.cat([b.rewards for b in batches]))
    out.reward_parts = {k: torch.cat([b.reward_parts[k] for b in batches]) for k in batches[0].reward_parts}
    for name in ("texts", "prompts", "items", "prompt_ids"):
        setattr(out, name, [x for b in batches for x in getattr(b, name)])
    return out


def select_groups(b: RolloutBatch, groups: list[int]) -> RolloutBatch:
    G = b.group_size
    rows = [g * G + j for g in groups for j in range(G)]
    out = b.rows(rows)
    out.rewards = b.rewards[rows]
    out.reward_parts = {k: v[rows] for k, v in b.reward_parts.items()}
    for name in ("texts", "prompts", "items"):
        setattr(out, name, [getattr(b, name)[r] for r in rows])
    out.prompt_ids = [b.prompt_ids[g] for g in groups]
    return out


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
    if not gc.dynamic_sampling:
        return b, info
    kept = [select_groups(b, [g for g, z in enumerate(zs) if not z])]
    spare = [select_groups(b, [g for g, z in enumerate(zs) if z])]
    rounds = 0
    while rounds < gc.max_refill:
        need = max(0, n_local - sum(len(x.prompt_ids) for x in kept))
        width = int(reduce_scalar(need, "max"))  # every rank takes part in every round
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
    n_kept = sum(len(x.prompt_ids) for x in kept)
    b = concat([x for x in kept + spare if len(x.prompt_ids)])
    b = select_groups(b, list(range(n_local)))
    info.update(refill_rounds=rounds, groups_padded=max(0, n_local - n_kept))
    return b, info


def rank_row_seeds(seed: int, step: int, round_: int, n_rows: int) -> torch.Tensor:
    """Sampling seeds of the global batch's rows for (step, refill round): each rank samples its rows with
    their global seeds, so the rollouts of R ranks together equal those of one process."""
    base = int(splitmix64(torch.tensor([seed * 1_000_003 + step * 7919 + round_ * 15_485_863]))[0])
    return row_seeds(base, n_rows)


SUMMED = ("loss", "pg_loss", "kl_loss", "entropy_loss", "prompts_drawn", "groups_padded", "update_tokens")
SAME = ("grad_norm", "optimizer_steps", "lr")  # already global: identical on every rank


def combine_ranks(b: RolloutBatch, local: dict, max_new_tokens: int) -> dict | None:
    """Metrics of the whole step on rank 0 (None elsewhere): rollout statistics over every rank's rollouts;
    loss terms summed (each rank holds its share of the global loss); maxima/minima over ranks; the rest
    averaged with each rank's completion-token count as weight."""
    mine = {"rewards": b.rewards, "advantages": b.advantages, "lengths": b.lengths, "finished": b.finished,
            "parts": b.reward_parts, "tokens": int(b.mask.sum()), "local": local}
    everyone = dist.gather_object(mine)
    if everyone is None:
        return None
    cat = lambda k: torch.cat([e[k].cpu() for e in everyone])  # noqa: E731
    view = RolloutBatch(b.input_ids[:0], b.targets[:0], b.mask[:0], b.sampler_logp[:0], cat("lengths"),
                        cat("finished"), b.group_size, cat("rewards"), cat("advantages"))
    view.reward_parts = {k: torch.cat([e["parts"][k] for e in everyone]) for k in b.reward_parts}
    out = rollout_stats(view, max_new_tokens)
    w = [max(e["tokens"], 1) for e in everyone]
    for k in local:
        vals = [e["local"].get(k) for e in everyone]
        if any(v is None for v in vals):
            continue
        if k in SUMMED:
            out[k] = sum(vals)
        elif k in SAME:
            out[k] = vals[0]
        elif k in ("ratio_max", "refill_rounds", "response_length_max"):
            out[k] = max(vals)
        elif k == "ratio_min":
            out[k] = min(vals)
        else:
            out[k] = sum(v * wi for v, wi in zip(vals, w)) / sum(w)
    return out


def dump_rollouts(path: Path, step: int, b: RolloutBatch):
    with open(path, "a", encoding="utf-8") as f:
        for i in range(len(b.texts)):
            f.write(json.dumps({"step": step, "prompt": b.prompts[i], "completion": b.texts[i],
                                "reward": float(b.rewards[i]), "advantage": float(b.advantages[i]),
                                "parts": {k: float(v[i]) for k, v in b.reward_parts.items()},
                                "finished": bool(b.finished[i]), "length": int(b.lengths[i]),
                                "item": b.items[i]}, ensure_ascii=False) + "\n")


# ---- the loop ----

def run_grpo(cfg: RunConfig) -> Path:
    """Train per `cfg.grpo`; returns the run directory."""
    from tqdm import tqdm

    from psyche.sft import build_model_for_training, build_optimizer, build_scheduler, prepare_init, resolve_dtype
    from psyche.tokenizer import Tokenizer
    from psyche.validate import check_grpo
    from psyche.weights import load_pretrained

    check_grpo(cfg)  # the whole config, before anything is written or computed
    gc = cfg.grpo
    rank, world, device = dist.init_distributed()
    run_dir = Path(cfg.run.out)
    torch.manual_seed(cfg.run.seed)
    dist.print0(f"# resolved config ({world} rank{'s' if world > 1 else ''}, {device})\n{to_toml(cfg)}")
    mini = gc.mini_batch or gc.prompts_per_step
    reward_set = RewardSet(dict(zip(gc.rewards, gc.reward_weights)))

    # ---- model, reference, data ----
    init_dir = prepare_init(gc.init or cfg.model.init, run_dir, cfg.run.seed)
    tok = Tokenizer.from_dir(init_dir)
    model_cfg = ModelConfig.from_dir(init_dir)
    prompts, too_long = load_prompts(gc.paths, tok, gc.prompt_style, gc.max_prompt_length)
    compute_dtype = resolve_dtype(cfg.model.dtype, device)
    policy = build_model_for_training(init_dir, device, compute_dtype=compute_dtype, compile=cfg.model.compile,
                                      activation_checkpointing=cfg.model.activation_checkpointing)
    need_ref = gc.kl_coef > 0 or gc.exact_kl
    ref = None
    if need_ref:  # a full frozen copy on every rank (in the compute dtype), optionally parked on the CPU
        ref, _ = load_pretrained(init_dir, dtype=compute_dtype, device="cpu" if gc.ref_offload else device)
        ref.requires_grad_(False).eval()
    optimizer = build_optimizer(policy, gc.optim)
    steps_per_epoch = max(1, len(prompts) // gc.prompts_per_step)
    total = gc.steps if gc.steps > 0 else math.ceil(gc.epochs * steps_per_epoch)
    scheduler, warmup = build_scheduler(optimizer, gc.optim, total)
    lc = LossConfig(temperature=gc.temperature, clip_low=gc.clip_low, clip_high=gc.clip_high,
                    dual_clip=gc.dual_clip or None, ratio_level=gc.ratio_level, agg=gc.loss_agg,
                    norm_length=gc.norm_length or gc.max_new_tokens, kl_coef=gc.kl_coef, kl_kind=gc.kl_kind,
                    kl_in_loss=gc.kl_mode == "loss", entropy_coef=gc.entropy_coef)
    dist.print0(f"grpo: {len(prompts)} prompts ({too_long} dropped as longer than {gc.max_prompt_length} tokens); "
                f"{gc.prompts_per_step} prompts x {gc.group_size} samples per step, {gc.prompts_per_step // mini} "
                f"updates per pass, {gc.ppo_epochs} pass(es); {total} steps; policy {model_cfg.num_params():,} "
                f"parameters from {init_dir}; reference {'on CPU' if gc.ref_offload else 'on ' + str(device)}"
                f"{'' if need_ref else ' (none: kl_coef = 0 and exact_kl off)'}")

    # ---- resume ----
    start, elapsed0, pos = 0, 0.0, 0
    ckpt = latest_checkpoint(run_dir) if cfg.checkpoint.resume else None
    if ckpt is not None:
        extra = {"reference": ref} if ref is not None else None
        state = load_checkpoint(ckpt, model=policy, optimizer=optimizer, scheduler=scheduler, extra_models=extra)
        start, elapsed0, pos = state["step"], state["elapsed"], state["prompt_position"]
        dist.print0(f"resumed from {ckpt} at step {start}")
    if dist.is_main():  # inputs read, model built, checkpoint loaded: only now is the run dir written
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = run_dir / "config.toml"
        try:
            diff = config_diff(load_run_config(saved), cfg) if saved.is_file() else []
        except ConfigError as e:
            diff = [f"(previous config unreadable: {e})"]
        if diff:
            print("config differs from the run directory's previous config.toml:\n  " + "\n  ".join(diff))
        saved.write_text(to_toml(cfg))
    stream = PromptStream(len(prompts), cfg.run.seed, pos)
    logger = MetricsLogger(run_dir, tensorboard=cfg.log.tensorboard, enabled=dist.is_main(),
                           resume_step=start if ckpt is not None else 0)
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
               disable=not (dist.is_main() and cfg.log.progress))
    write = bar.write if not bar.disable else dist.print0
    t_start = time.time() - elapsed0
    for s in range(start, total):
        step = s + 1
        fault("step_start", step)
        t0 = time.time()
        try:
            b, sampling = gather_rollouts(policy, prompts, stream, gc, tok, reward_set, seed=cfg.run.seed, step=step,
                                          rank=rank, world=world, mini=mini)
        except RewardError as e:
            raise RewardError(f"step {step}: {e}; stopped before the update. Last good checkpoint: "
                              f"{latest_checkpoint(run_dir) or 'none'} (untouched)") from e
        t_roll = time.time()
        raw = b.rewards
        b.rewards = shape_rewards(raw, b, truncation=gc.truncation, max_new_tokens=gc.max_new_tokens,
                                  overlong_buffer=gc.overlong_buffer, overlong_penalty=gc.overlong_penalty)
        metrics = {}
        with torch.no_grad():
            if ref is not None:
                if gc.ref_offload:
                    ref.to(device)
                b.ref_logp = batched_logprobs(ref, b, gc.micro_batch, gc.temperature)
            t_ref = time.time()
            n_updates = gc.prompts_per_step // mini * gc.ppo_epochs
            if gc.old_logprobs == "sampler":
                b.old_logp = b.sampler_logp
            if gc.old_logprobs == "recompute" and n_updates > 1:
                with dist.unsharded(policy):
                    b.old_logp = batched_logprobs(policy, b, gc.micro_batch, gc.temperature)
            if b.old_logp is not None and gc.old_logprobs == "recompute":
                metrics.update(logprob_gap(b.sampler_logp, b.old_logp, b.mask))
            if ref is not None:
                lp_pol = b.old_logp if b.old_logp is not None and gc.old_logprobs == "recompute" else None
                if gc.diagnostics:  # the exact KL and the k1/k2/k3 estimates of the same tokens
                    with dist.unsharded(policy):
                        metrics.update(kl_check(policy, ref, b, gc.temperature))
                elif gc.exact_kl:
                    with dist.unsharded(policy):
                        rows = list(range(min(len(b.lengths), gc.exact_kl_rows or len(b.lengths))))
                        ex = exact_kl_tokens(policy, ref, b.rows(rows), gc.temperature)
                    metrics["kl_exact"] = float(ex.mean()) if ex.numel() else 0.0
                if lp_pol is not None:
                    metrics["kl"] = float(kl_estimate(lp_pol[b.mask], b.ref_logp[b.mask], gc.kl_kind).mean())
                if gc.kl_mode == "reward" and gc.kl_coef:
                    lp_now = lp_pol if lp_pol is not None else b.sampler_logp
                    kl_tok = kl_estimate(lp_now, b.ref_logp, gc.kl_kind) * b.mask
                    b.rewards = b.rewards - gc.kl_coef * kl_tok.sum(1)
                if gc.ref_offload:
                    ref.to("cpu")
            t_old = time.time()
        b.advantages = compute_advantages(b.rewards, gc.group_size, estimator=gc.advantage, std_ddof=gc.std_ddof,
                                          eps=gc.adv_eps)
        metrics.update(sampling)
        if gc.truncation == "mask":
            apply_truncation_mask(b)
        first_pass = {}

        def on_first(rows, sub, lp):
            # the trainer's log-probs before this step's first update (on-policy case) -> sampler gap, KL
            if b.old_logp is None:
                first_pass.setdefault("gap", []).append((sub.sampler_logp, lp, sub.mask))
                if sub.ref_logp is not None:
                    first_pass.setdefault("kl", []).append(kl_estimate(lp[sub.mask], sub.ref_logp[sub.mask],
                                                                       gc.kl_kind))

        upd_kw = dict(mini_batch_rows=(mini // world) * gc.group_size, micro_batch=gc.micro_batch,
                      epochs=gc.ppo_epochs, grad_clip=gc.optim.grad_clip)
        dumped = (save_step_dump(run_dir, step, b, cfg=cfg, lc=lc, update_kw=upd_kw, model=policy, optimizer=optimizer,
                                 scheduler=scheduler) if replay_due(gc, step) else None)
        diag = StepDiagnostics(lc, grad_split=gc.grad_split) if gc.diagnostics or gc.grad_split else None
        upd = update_policy(policy, optimizer, b, lc, **upd_kw, clip_fn=dist.clip_grad_norm_, on_first_forward=on_first,
                            diag=diag)
        if "gap" in first_pass:
            sl = torch.cat([x[0][x[2]] for x in first_pass["gap"]])
            tl = torch.cat([x[1][x[2]] for x in first_pass["gap"]])
            metrics.update(logprob_gap(sl, tl, torch.ones_like(sl, dtype=torch.bool)))
        if "kl" in first_pass:
            metrics["kl"] = float(torch.cat(first_pass["kl"]).mean())
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        t_end = time.time()
        if not math.isfinite(upd["loss"]) or not math.isfinite(upd["grad_norm"]):
            raise FloatingPointError(f"step {step}: non-finite loss {upd['loss']} / grad norm {upd['grad_norm']}; "
                                     f"last good checkpoint: {latest_checkpoint(run_dir) or 'none'} (untouched)")
        metrics.update(upd)
        metrics.update(lr=lr, time_rollout=t_roll - t0, time_reference=t_ref - t_roll,
                       time_old_logprob=t_old - t_ref, time_update=t_end - t_old)
        metrics = combine_ranks(b, metrics, gc.max_new_tokens)
        if gc.ref_reset_every and ref is not None and step % gc.ref_reset_every == 0:
            with torch.no_grad(), dist.unsharded(policy):  # full parameters on every rank for the copy
                current = dict(policy.named_parameters())
                for name, p in ref.named_parameters():
                    p.copy_(current[name].detach().to(p.device, p.dtype))
        if metrics is not None:
            n_tok = metrics["update_tokens"] // max(gc.ppo_epochs, 1)
            metrics.update(tokens=n_tok, tok_per_s=n_tok / max(t_end - t0, 1e-9),
                           ref_reset=int(bool(gc.ref_reset_every and step % gc.ref_reset_every == 0)))
        logger.log(step, metrics)
        if gc.diagnostics:
            record_pass_rates(run_dir, step, b)
        if dumped is not None:
            save_logged(dumped, metrics)
        if dist.is_main() and gc.dump_every and (step % gc.dump_every == 0 or step == 1):
            dump_rollouts(run_dir / "rollouts.jsonl", step, b)
        bar.update(1)
        if metrics is not None:
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", refresh=False)
        if metrics is not None and (step % cfg.log.every == 0 or step == total):
            write(step_line(metrics, step=step, total=total, elapsed=time.time() - t_start,
                            keys=("loss", "reward_mean", "accuracy", "zero_std_frac", "kl", "entropy",
                                  "response_length_mean", "clip_frac_high", "grad_norm", "logprob_gap",
                                  "time_rollout", "time_update")))
        if step == total or (cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0):
            save_checkpoint(run_dir, step, model=policy, optimizer=optimizer, scheduler=scheduler,
                            extra_models={"reference": ref} if ref is not None else None,
                            keep_last=cfg.checkpoint.keep_last, tokenizer=tok,
                            state={"step": step, "prompt_position": stream.pos, "elapsed": time.time() - t_start})
        fault("step_end", step)
    bar.close()
    logger.close()
    if cfg.checkpoint.export:
        export_hf(policy, run_dir / "hf", tok, dtype=model_cfg.dtype)
        dist.print0(f"exported {run_dir / 'hf'}")
    dist.cleanup()
    return run_dir
