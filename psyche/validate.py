"""Checks of a resolved run config as a whole, before a stage writes or computes anything.

`psyche.config` checks each key on its own (name, type, choices). This module checks what only the whole
config can tell: ranges (lr > 0, 0 < top_p <= 1, ...), rules between keys (group size vs advantage estimator,
batch divisibility by micro-batch x ranks, rewards vs reward weights) and rules between the config and its
inputs (every data file exists, the model to start from has a readable config.json, lengths fit its
max_position_embeddings). Each violation is a one-line ConfigError that names the key or keys, their values
and the rule, e.g.

    grpo.group_size=1: estimator 'grpo' with std_ddof=1 needs >= 2 samples per prompt

Why here and not in the loops: a rule checked where a value is first used fires after the data was read, the
model built or the first rollout sampled, sometimes after the run directory was written. `run_sft` and
`run_grpo` call `check_sft` / `check_grpo` first; `python train.py` without --config calls `check_settings` on
the embedded default's settings (its data and models are made by the recipe, so there are no files to check).

Reading a model's config.json is the only file access (a few hundred bytes); no model is built.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from psyche.config import ConfigError, RunConfig, SamplingParams
from psyche.model_config import PRESETS, ModelConfig
from psyche.hf_checkpoint import check_checkpoint

MAX_SEED = 2**32  # run.seed feeds int64 hashes (GRPO's row seeds) and numpy's generator: 0 <= seed < 2**32


def world_size() -> int:
    """The number of ranks this process belongs to (torchrun sets WORLD_SIZE), known before any process group
    exists."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _v(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _need(ok: bool, key: str, value, rule: str):
    if not ok:
        raise ConfigError(f"{key}={_v(value)}: {rule}")


def _finite(key: str, value):
    _need(isinstance(value, (int, float)) and math.isfinite(value), key, value, "must be a finite number")


def _at_least(key: str, value, lo):
    _need(value >= lo, key, value, f"must be >= {lo}")


def _fraction(key: str, value, hi_open=False):
    _finite(key, value)
    ok = 0.0 <= value < 1.0 if hi_open else 0.0 <= value <= 1.0
    _need(ok, key, value, f"must be in [0, 1{')' if hi_open else ']'}")


# ============================================================================================================
# ranges: each section on its own (every stage checks every section: a bad value anywhere is a mistake)
# ============================================================================================================

def check_run(cfg: RunConfig):
    _need(bool(cfg.run.out.strip()), "run.out", cfg.run.out, "the run directory must not be empty")
    _need(0 <= cfg.run.seed < MAX_SEED, "run.seed", cfg.run.seed, "must be in [0, 2**32)")


def check_model(cfg: RunConfig):
    _init_spec("model.init", cfg.model.init)


def _init_spec(key: str, init: str):
    _need(bool(init.strip()), key, init, "give an HF checkpoint directory or 'preset:NAME'")
    if init.startswith("preset:"):
        name = init.removeprefix("preset:")
        _need(name in PRESETS, key, init, f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")


def check_data(cfg: RunConfig):
    _at_least("data.max_length", cfg.data.max_length, 2)


def check_optim(o, prefix: str = "optim", allow_zero_lr: bool = False):
    """AdamW and the schedule (torch would refuse some of these only when the optimizer is built, with a
    message that names no key). allow_zero_lr: GRPO's lr may be 0, a negative control (nothing learns)."""
    _finite(f"{prefix}.lr", o.lr)
    if allow_zero_lr:
        _need(o.lr >= 0, f"{prefix}.lr", o.lr, "the learning rate must be >= 0 (0: a negative control)")
    else:
        _need(o.lr > 0, f"{prefix}.lr", o.lr, "the learning rate must be > 0")
    _need(len(o.betas) == 2, f"{prefix}.betas", o.betas, "AdamW takes two betas, e.g. [0.9, 0.999]")
    for i, b in enumerate(o.betas):
        _fraction(f"{prefix}.betas[{i}]", b, hi_open=True)
    _finite(f"{prefix}.eps", o.eps)
    _need(o.eps > 0, f"{prefix}.eps", o.eps, "must be > 0 (Adam divides by sqrt(v) + eps)")
    _finite(f"{prefix}.weight_decay", o.weight_decay)
    _at_least(f"{prefix}.weight_decay", o.weight_decay, 0)
    _fraction(f"{prefix}.warmup_ratio", o.warmup_ratio)
    _at_least(f"{prefix}.warmup_steps", o.warmup_steps, 0)
    _fraction(f"{prefix}.min_lr_ratio", o.min_lr_ratio)
    _finite(f"{prefix}.grad_clip", o.grad_clip)
    _need(o.grad_clip >= 0, f"{prefix}.grad_clip", o.grad_clip, "the gradient-norm limit must be >= 0 (0: off)")


def check_sft_section(cfg: RunConfig):
    sc = cfg.sft
    _finite("sft.epochs", sc.epochs)
    _at_least("sft.epochs", sc.epochs, 0)
    _at_least("sft.max_steps", sc.max_steps, 0)
    _need(sc.epochs > 0 or sc.max_steps > 0, "sft.epochs", sc.epochs, "with sft.max_steps=0 there is nothing to "
          "train: give sft.epochs > 0 or sft.max_steps > 0")
    _at_least("sft.global_batch", sc.global_batch, 1)
    _at_least("sft.micro_batch", sc.micro_batch, 1)
    _at_least("sft.global_batch_tokens", sc.global_batch_tokens, 0)


def check_checkpoint_and_log(cfg: RunConfig):
    _at_least("checkpoint.every", cfg.checkpoint.every, 0)
    _at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 1)
    _at_least("log.every", cfg.log.every, 1)


def check_grpo_section(cfg: RunConfig):
    g = cfg.grpo
    if g.init:
        _init_spec("grpo.init", g.init)
    _at_least("grpo.steps", g.steps, 0)
    _finite("grpo.epochs", g.epochs)
    _at_least("grpo.epochs", g.epochs, 0)
    _need(g.epochs > 0 or g.steps > 0, "grpo.epochs", g.epochs, "with grpo.steps=0 there is nothing to train: "
          "give grpo.epochs > 0 or grpo.steps > 0")
    for key in ("prompts_per_step", "group_size", "micro_batch", "ppo_epochs", "max_prompt_length",
                "max_new_tokens"):
        _at_least(f"grpo.{key}", getattr(g, key), 1)
    for key in ("mini_batch", "top_k", "std_ddof", "norm_length", "ref_reset_every", "overlong_buffer",
                "max_refill", "exact_kl_rows", "dump_every", "replay_every"):
        _at_least(f"grpo.{key}", getattr(g, key), 0)
    _variants(g)
    _advantage(g)
    _finite("grpo.temperature", g.temperature)
    _need(g.temperature >= SamplingParams.MIN_TEMPERATURE, "grpo.temperature", g.temperature,
          f"must be > 0, at least {SamplingParams.MIN_TEMPERATURE} (log-probs are divided by it; GRPO needs "
          "sampled, not greedy, groups)")
    _finite("grpo.top_p", g.top_p)
    _need(0 < g.top_p <= 1, "grpo.top_p", g.top_p, "must be in (0, 1]")
    _fraction("grpo.min_p", g.min_p, hi_open=True)
    _fraction("grpo.clip_low", g.clip_low, hi_open=True)
    _finite("grpo.clip_high", g.clip_high)
    _at_least("grpo.clip_high", g.clip_high, 0)
    _finite("grpo.dual_clip", g.dual_clip)
    _need(g.dual_clip == 0 or g.dual_clip > 1, "grpo.dual_clip", g.dual_clip, "must be 0 (off) or > 1")
    for key in ("adv_eps", "kl_coef", "overlong_penalty"):
        _finite(f"grpo.{key}", getattr(g, key))
        _at_least(f"grpo.{key}", getattr(g, key), 0)
    _finite("grpo.entropy_coef", g.entropy_coef)
    if g.truncation == "penalty":
        _need(g.overlong_buffer <= g.max_new_tokens, "grpo.overlong_buffer", g.overlong_buffer,
              f"the soft zone cannot be longer than grpo.max_new_tokens={g.max_new_tokens}")
    bad = [s for s in g.replay_steps if s < 1]
    _need(not bad, "grpo.replay_steps", g.replay_steps, "steps count from 1")
    _policy_loss(g)
    _rewards(g)
    check_optim(g.optim, "grpo.optim", allow_zero_lr=True)


def _variants(g):
    """Every variant key names a registered variant (psyche/grpo/loss.py REGISTRIES): a value set in code is
    checked here, one from a config file or --set already when it was read."""
    from psyche.grpo.loss import registered

    for key in ("advantage", "policy_loss", "loss_agg", "kl_kind", "rollout_correction"):
        names = registered(key)
        _need(getattr(g, key) in names, f"grpo.{key}", getattr(g, key), f"not one of {', '.join(names)}")


def _advantage(g):
    """The estimator's smallest group (its registry entry): a group of one has no baseline, and 'grpo' needs
    more samples than std_ddof for its standard deviation."""
    from psyche.grpo.advantages import ESTIMATORS

    rule = ESTIMATORS[g.advantage].min_group
    need = rule(g.std_ddof)
    ddof = f" with std_ddof={g.std_ddof}" if rule(0) != rule(100) else ""
    _need(g.group_size >= need, "grpo.group_size", g.group_size,
          f"estimator {g.advantage!r}{ddof} needs >= {need} samples per prompt")


def _policy_loss(g):
    """The variants' own parameters, and what only some variants take (their registry entries say)."""
    from psyche.grpo.correction import ROLLOUT_CORRECTIONS
    from psyche.grpo.loss import POLICY_LOSSES

    def owners(param):  # the policy losses that take `param`
        return " or ".join(repr(n) for n, pl in POLICY_LOSSES.items() if param in pl.params.values())

    takes = POLICY_LOSSES[g.policy_loss].params.values()
    _need(g.ratio_level == "token" or "ratio_level" in takes, "grpo.ratio_level", g.ratio_level,
          f"the sequence ratio (GSPO) belongs to policy_loss {owners('ratio_level')}, not {g.policy_loss!r}")
    _need(g.dual_clip == 0 or "dual_clip" in takes, "grpo.dual_clip", g.dual_clip,
          f"dual clip belongs to policy_loss {owners('dual_clip')}, not {g.policy_loss!r}")
    for key in ("sapo_tau_pos", "sapo_tau_neg", "rc_threshold"):
        _finite(f"grpo.{key}", getattr(g, key))
        _need(getattr(g, key) > 0, f"grpo.{key}", getattr(g, key), "must be > 0")
    for key in ("clip_cov_ratio", "kl_cov_ratio"):
        _finite(f"grpo.{key}", getattr(g, key))
        _need(0 < getattr(g, key) <= 1, f"grpo.{key}", getattr(g, key), "must be in (0, 1] (a share of tokens)")
    for key in ("clip_cov_lb", "clip_cov_ub", "kl_cov_coef", "rc_low"):
        _finite(f"grpo.{key}", getattr(g, key))
    _need(g.clip_cov_lb < g.clip_cov_ub, "grpo.clip_cov_lb", g.clip_cov_lb,
          f"must be below grpo.clip_cov_ub={g.clip_cov_ub}")
    _at_least("grpo.kl_cov_coef", g.kl_cov_coef, 0)
    rc = ROLLOUT_CORRECTIONS.get(g.rollout_correction)
    _need(rc is None or g.old_logprobs == "recompute", "grpo.rollout_correction", g.rollout_correction,
          "corrects the trainer's old log-probs against the sampler's; with grpo.old_logprobs = \"sampler\" they "
          "are the same and every weight would be 1 (set old_logprobs = \"recompute\")")
    if rc is not None and not rc.band:
        _need(g.rc_threshold >= 1, "grpo.rc_threshold", g.rc_threshold,
              "must be >= 1 for TIS (weights above it are truncated; below 1 every token would be)")
    if rc is not None and rc.band:
        _need(0 <= g.rc_low < 1 < g.rc_threshold, "grpo.rc_low", g.rc_low,
              f"MIS keeps weights in [rc_low, rc_threshold] = [{g.rc_low}, {g.rc_threshold}]: need "
              "0 <= rc_low < 1 < rc_threshold")


def _rewards(g):
    from psyche.rewards import REGISTRY

    _need(len(g.rewards) > 0, "grpo.rewards", g.rewards, f"name at least one of {', '.join(sorted(REGISTRY))}")
    unknown = [r for r in g.rewards if r not in REGISTRY]
    _need(not unknown, "grpo.rewards", g.rewards, f"unknown reward function(s) {unknown}; registered: "
          f"{', '.join(sorted(REGISTRY))}")
    twice = sorted({r for r in g.rewards if g.rewards.count(r) > 1})
    _need(not twice, "grpo.rewards", g.rewards, f"{twice} named twice (give one weight per function)")
    if len(g.rewards) != len(g.reward_weights):
        raise ConfigError(f"grpo.rewards={g.rewards} and grpo.reward_weights={g.reward_weights}: one weight per "
                          f"reward function ({len(g.rewards)} functions, {len(g.reward_weights)} weights)")
    for i, w in enumerate(g.reward_weights):
        _finite(f"grpo.reward_weights[{i}]", w)


def check_lora(cfg: RunConfig):
    """LoRA's settings (when rank > 0), its adapter to start from, and what a LoRA run cannot do."""
    lo = cfg.lora
    _at_least("lora.rank", lo.rank, 0)
    if lo.rank == 0:
        _need(not lo.init, "lora.init", lo.init, "an adapter to start from needs lora.rank > 0 (it sets the rank)")
        return
    from psyche.lora import LoRAError, check_init_matches, check_settings

    try:
        check_settings(lo.rank, lo.alpha, lo.dropout, lo.targets)
        if lo.init:
            check_init_matches(lo)
    except LoRAError as e:
        raise ConfigError(str(e)) from None
    _need(cfg.grpo.ref_reset_every == 0, "grpo.ref_reset_every", cfg.grpo.ref_reset_every,
          "a LoRA run's reference is the base model (its adapters off): it cannot be reset to the policy")


def check_sections(cfg: RunConfig):
    """Every section's ranges and rules that need neither the number of ranks nor any file."""
    check_run(cfg)
    check_model(cfg)
    check_data(cfg)
    check_optim(cfg.optim)
    check_sft_section(cfg)
    check_checkpoint_and_log(cfg)
    check_grpo_section(cfg)
    check_lora(cfg)


# ============================================================================================================
# a stage: the rules that depend on the number of ranks and on the stage's inputs
# ============================================================================================================

def sft_global_rows(cfg: RunConfig) -> int:
    sc = cfg.sft
    return sc.global_batch_tokens // cfg.data.max_length if sc.global_batch_tokens > 0 else sc.global_batch


def check_sft_batch(cfg: RunConfig, world: int):
    sc, rows = cfg.sft, sft_global_rows(cfg)
    if sc.global_batch_tokens > 0:
        _need(rows >= 1, "sft.global_batch_tokens", sc.global_batch_tokens,
              f"less than one row of data.max_length={cfg.data.max_length} tokens")
        what = f"sft.global_batch_tokens={sc.global_batch_tokens} ({rows} rows of {cfg.data.max_length} tokens)"
    else:
        what = f"sft.global_batch={rows}"
    if rows % (sc.micro_batch * world):
        raise ConfigError(f"{what}, sft.micro_batch={sc.micro_batch}: the global batch must be a multiple of "
                          f"micro_batch x ranks ({sc.micro_batch} x {world} = {sc.micro_batch * world})")


def check_grpo_batch(cfg: RunConfig, world: int):
    g = cfg.grpo
    mini = g.mini_batch or g.prompts_per_step
    if g.prompts_per_step % world:
        raise ConfigError(f"grpo.prompts_per_step={g.prompts_per_step}: must be a multiple of the number of ranks "
                          f"({world})")
    if g.prompts_per_step % mini:
        raise ConfigError(f"grpo.prompts_per_step={g.prompts_per_step}, grpo.mini_batch={g.mini_batch}: "
                          "prompts_per_step must be a multiple of mini_batch")
    if mini % world:
        raise ConfigError(f"grpo.mini_batch={mini}: must be a multiple of the number of ranks ({world})")


def _paths(key: str, paths: list[str]):
    _need(len(paths) > 0, key, paths, "give at least one JSONL/JSON file")
    for i, p in enumerate(paths):
        f = Path(p)
        if not f.exists():
            raise ConfigError(f"{key}[{i}] = {p!r}: data file not found")
        if not f.is_file():
            raise ConfigError(f"{key}[{i}] = {p!r}: not a file")


def model_config(key: str, init: str) -> ModelConfig:
    """The config of the model a stage starts from: a preset's shapes, or the directory's config.json (read,
    not built). Raises a ConfigError naming `key` when the directory is missing or holds no config.json."""
    if init.startswith("preset:"):
        return ModelConfig(**PRESETS[init.removeprefix("preset:")])
    path = Path(init)
    if not path.is_dir():
        raise ConfigError(f"{key} = {init!r}: no such directory (an HF checkpoint directory, or 'preset:NAME')")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key} = {init!r}: no config.json there (an HF checkpoint directory, or 'preset:NAME')")
    mc = ModelConfig.from_dir(path)
    check_checkpoint(mc, path)  # its safetensors headers against config.json (no tensor read, no torch)
    return mc


def check_sft_lengths(cfg: RunConfig, mc: ModelConfig, model: str):
    _need(cfg.data.max_length <= mc.max_position_embeddings, "data.max_length", cfg.data.max_length,
          f"longer than the model's max_position_embeddings ({mc.max_position_embeddings}, {model})")


def check_grpo_lengths(cfg: RunConfig, mc: ModelConfig, model: str):
    g = cfg.grpo
    n = g.max_prompt_length + g.max_new_tokens
    if n > mc.max_position_embeddings:
        raise ConfigError(f"grpo.max_prompt_length={g.max_prompt_length} + grpo.max_new_tokens={g.max_new_tokens} = "
                          f"{n}: longer than the model's max_position_embeddings ({mc.max_position_embeddings}, "
                          f"{model})")


def check_sft(cfg: RunConfig, world: int | None = None, files: bool = True):
    """Everything `run_sft` needs of its config, before it writes or computes anything."""
    world = world or world_size()
    check_sections(cfg)
    check_sft_batch(cfg, world)
    if files:
        _paths("data.paths", cfg.data.paths)
        check_sft_lengths(cfg, model_config("model.init", cfg.model.init), cfg.model.init)


def check_grpo(cfg: RunConfig, world: int | None = None, files: bool = True):
    """Everything `run_grpo` needs of its config, before it writes or computes anything."""
    world = world or world_size()
    g = cfg.grpo
    check_sections(cfg)
    check_grpo_batch(cfg, world)
    _need(not cfg.lora.init, "lora.init", cfg.lora.init,
          "GRPO's reference would be the base without this adapter, not the policy GRPO starts from; start GRPO "
          "from the merged model instead (a LoRA SFT run's hf/) with fresh adapters")
    if files:
        _paths("grpo.paths", g.paths)
        init = g.init or cfg.model.init
        check_grpo_lengths(cfg, model_config("grpo.init" if g.init else "model.init", init), init)


def check_settings(cfg: RunConfig, world: int = 1, base: Path | None = None):
    """Both stages' settings without their inputs: the embedded default (`python train.py`), whose data and models
    the recipe makes as it goes, runs its SFT and GRPO stages in one process. `base`: the checkpoint directory
    both stages' models take their shapes from, when it exists already (lengths are checked against it)."""
    check_sections(cfg)
    check_sft_batch(cfg, world)
    check_grpo_batch(cfg, world)
    if base is not None:
        mc = ModelConfig.from_dir(base)
        check_sft_lengths(cfg, mc, str(base))
        check_grpo_lengths(cfg, mc, str(base))


STAGES = {"sft": check_sft, "grpo": check_grpo}


def check_stage(cfg: RunConfig, stage: str, world: int | None = None, files: bool = True):
    """Validate `cfg` for `stage` ('sft' or 'grpo'); raises a one-line ConfigError naming the key(s)."""
    STAGES[stage](cfg, world, files)
