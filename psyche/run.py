"""What every training stage does around its own loop, written once (SFT and GRPO both use it): the model it
starts from (prepare_init, build_model_for_training), AdamW and the LR schedule, and the run around the loop.

    rank, world, device = begin(cfg, check_sft)          # validate the whole config, init ranks, seed, print it
    init_dir = prepare_init(...)                         # (the stage reads its inputs here)
    run = Run(cfg, init_dir, device, cfg.optim, total)   # model (fp32 master weights, parallelized), AdamW, LR
    state = run.resume(...)                              # the latest checkpoint, when there is one
    run.open()                                           # only now: the run directory, config.toml, metrics, bar
    for step in run.steps():                             # the stage's loop: forwards under `run.amp`
        ...; run.log(step, metrics, keys); run.checkpoint_due(step) and run.checkpoint(step, state)
    run.finish(tok)                                      # export to Hugging Face format, tear down ranks

Precision, in one place: the weights and the optimizer state stay fp32; with a bf16 compute dtype an
unsharded model runs its forwards under `torch.autocast` (CPU or CUDA) and a sharded one through FSDP2's
MixedPrecisionPolicy (psyche.dist). Nothing is written before the inputs are read, the model is built and any
checkpoint is loaded, so a bad input leaves the run directory as it was.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from psyche import dist
from psyche.checkpoint import (export_adapter, export_hf, fault, latest_checkpoint, load_checkpoint,
                               load_full_model_state, read_safetensors_dir, save_checkpoint)
from psyche.config import ConfigError, config_diff, load_run_config, to_toml
from psyche.model_config import ModelConfig
from psyche.metrics import MetricsLogger, step_line


class NonFiniteLossError(RuntimeError):
    pass


# ---- what a stage starts from: the model, the optimizer, the LR schedule ----

def prepare_init(init: str, run_dir: Path, seed: int, texts=None) -> Path:
    """The HF checkpoint directory to start from. "preset:NAME" makes RUN_DIR/init once (rank 0; a random
    model and a BPE tokenizer trained on `texts`) and reuses it on resume."""
    if not init.startswith("preset:"):
        path = Path(init)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.init = {init!r}: no config.json there (a checkpoint directory, or "
                                    "'preset:NAME')")
        return path
    path = run_dir / "init"
    if dist.is_main() and not (path / "config.json").is_file():
        from psyche.weights import init_checkpoint

        init_checkpoint(path, init.removeprefix("preset:"), seed=seed, texts=texts)
    dist.barrier()
    return path


def build_model_for_training(init_dir: Path, device: torch.device, *, compute_dtype=torch.float32,
                             activation_checkpointing=False, compile=False, lora=None, seed: int = 0) -> nn.Module:
    """fp32 master weights from `init_dir`, parallelized (psyche.dist.parallelize), on `device`; with `lora` (a
    LoraSection of rank > 0) the base frozen and adapters added (from lora.init, else fresh from `seed`).

    One rank: load, then AC/compile. Several ranks: build on the meta device, fully_shard, materialise only
    the local shards, and let rank 0 alone read the files and broadcast (no rank holds two full copies).
    """
    from psyche.lora import add_lora, load_adapter_tensors, settings

    cfg = ModelConfig.from_dir(init_dir)
    kw = dict(activation_checkpointing=activation_checkpointing, compile=compile, param_dtype=compute_dtype,
              reduce_dtype=torch.float32)
    use_lora = lora is not None and lora.rank > 0
    adapters = lora.init if use_lora and lora.init else None  # the adapters' own source, named when one is broken

    def adapt(model):  # on the meta device: shapes only (the values come from rank 0)
        if use_lora:
            add_lora(model, **settings(lora), seed=seed)
            if lora.init and model.lm_head.weight.device.type != "meta":
                load_adapter_tensors(model, lora.init)

    if dist.get_world_size() == 1:
        from psyche.weights import load_pretrained

        model, _ = load_pretrained(init_dir, dtype=torch.float32, device=device)
        adapt(model)
        check_finite_weights(model, init_dir, adapters)
        return dist.parallelize(model.train(), **kw)
    from psyche.hf_checkpoint import check_checkpoint
    from psyche.model import Qwen2

    check_checkpoint(cfg, init_dir)
    with torch.device("meta"):
        model = Qwen2(cfg)
    adapt(model)  # shapes only: the values come with the base weights from rank 0
    dist.parallelize(model, **kw)
    model.to_empty(device=device)
    sd = {}
    if dist.is_main():
        sd = {k: v.float() for k, v in read_safetensors_dir(init_dir).items()}
        if cfg.tie_word_embeddings:
            sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
        if use_lora:
            sd.update(_adapter_values(model, lora, seed))
    load_full_model_state(model, sd)
    check_finite_weights(model, init_dir, adapters)
    return model.train()


def _adapter_values(model: nn.Module, lora, seed: int) -> dict:
    """The adapters' starting values for rank 0's full state dict: lora.init's tensors (checked as on one
    rank), else init_state."""
    from psyche.lora import init_state, read_adapter_tensors

    if lora.init:
        return {k: t.float() for k, t in read_adapter_tensors(lora.init, {n: p.shape for n, p in
                                                                         model.named_parameters()}).items()}
    return init_state(model, seed)


def check_finite_weights(model: nn.Module, source: Path, adapters: str | None = None):
    """A model with a NaN or inf weight (a diverged run's checkpoint) cannot be trained from: a CheckpointError
    naming the tensor and where it came from (`adapters`, lora.init, for a LoRA adapter's tensor, else
    `source`), before anything is written. Each rank looks at its own shards; every rank names the same tensor."""
    from psyche.hf_checkpoint import CheckpointError

    bad = [n for n, p in model.named_parameters()
           if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())]
    if not dist.sum_over_ranks(len(bad)):
        return
    name = next(n for names in dist.all_gather_object(bad[:1]) for n in names)
    if adapters and name.endswith((".lora_A.weight", ".lora_B.weight")):
        raise CheckpointError(f"lora.init = {adapters}: adapter tensor {name!r} holds NaN or inf: the adapter is "
                              "broken (a run that diverged?); nothing was written")
    raise CheckpointError(f"{source}: tensor {name!r} holds NaN or inf: the checkpoint is broken (a run that "
                          "diverged?); nothing was written")


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (biases and norm weights are 1-D and not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)


class LRSchedule:
    """LR multiplier for optimizer step s (0-based), W warm-up steps, S total steps, floor m:

        s < W:  (s + 1) / W                                         linear warm-up, no zero-LR step
        else:   p = (s - W) / max(1, S - W);  cosine: m + (1 - m) * (1 + cos(pi * p)) / 2
                                              linear: m + (1 - m) * (1 - p);   constant: 1
    A plain object so LambdaLR's state_dict saves its fields (resume needs no pickled function).
    """

    def __init__(self, warmup: int, total: int, kind: str = "cosine", min_ratio: float = 0.0):
        self.warmup, self.total, self.kind, self.min_ratio = warmup, total, kind, min_ratio

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        p = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        m = self.min_ratio
        if self.kind == "cosine":
            return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
        if self.kind == "linear":
            return m + (1 - m) * (1 - p)
        return 1.0


def build_scheduler(optimizer, optim_cfg, total_steps: int):
    warmup = optim_cfg.warmup_steps or math.ceil(optim_cfg.warmup_ratio * total_steps)
    sched = LRSchedule(warmup, total_steps, optim_cfg.schedule, optim_cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, sched), warmup


# what loading a checkpoint puts back in place of the config's settings: label -> LRSchedule field, AdamW keys
_SCHEDULE_FIELDS = {"total steps": "total", "warm-up steps": "warmup", "schedule": "kind", "min_lr_ratio": "min_ratio"}
_OPTIM_FIELDS = ("betas", "eps", "weight_decay")


def training_settings(optimizer, scheduler) -> dict:
    """What a checkpoint's optimizer and scheduler state replace when loaded: each LR schedule's fields and base
    LR, and each parameter group's AdamW settings (a copy)."""
    return {"schedules": [dict(vars(f)) for f in scheduler.lr_lambdas], "base_lrs": list(scheduler.base_lrs),
            "adamw": [{k: tuple(g[k]) if k == "betas" else g[k] for k in _OPTIM_FIELDS} for g in optimizer.param_groups]}


def _lrs(settings: dict, steps: range) -> list[list[float]]:
    """Each parameter group's LR at each of `steps` (0-based: index k is step k + 1's) under `settings`."""
    return [[base * LRSchedule(**fields)(k) for k in steps]
            for base, fields in zip(settings["base_lrs"], settings["schedules"])]


def setting_changes(saved: dict, config: dict, start: int, total: int) -> list[str]:
    """How the `config`'s settings (training_settings) differ from a checkpoint's (`saved`, as loaded), e.g.
    ["total steps 6 -> 12"]. The LR schedule counts as changed only when some step still to train (start + 1
    .. total) would get another LR: extending a constant schedule changes nothing."""
    changes = []
    if _lrs(saved, range(start, total)) != _lrs(config, range(start, total)):
        was, now = saved["schedules"][0], config["schedules"][0]
        changes.append(("lr", saved["base_lrs"][0], config["base_lrs"][0]))
        changes += [(label, was[f], now[f]) for label, f in _SCHEDULE_FIELDS.items()]
    for was, now in zip(saved["adamw"], config["adamw"]):
        changes += [(k, was[k], now[k]) for k in _OPTIM_FIELDS]
    return list(dict.fromkeys(f"{label} {a} -> {b}" for label, a, b in changes if a != b))  # once each


# ---- the stage around its loop ----

def begin(cfg, check) -> tuple[int, int, torch.device]:
    """Validate the whole config (`check`, from psyche.validate) before anything is computed or written, set
    up the ranks and the seed, and print the resolved config. -> (rank, world size, device).

    A fresh start (checkpoint.resume=false) in a run directory that holds checkpoints is a ConfigError: its
    checkpoints would mix with the earlier run's, and pruning would delete some of either."""
    check(cfg)
    if not cfg.checkpoint.resume and (found := latest_checkpoint(cfg.run.out)) is not None:
        raise ConfigError(f"checkpoint.resume=false, but {found.parent} holds checkpoints of an earlier run (the latest "
                          f"{found.name}): a new run there would mix with them and prune them; give it another "
                          "run.out, or move those away, or resume them (checkpoint.resume=true)")
    rank, world, device = dist.init_distributed()
    torch.manual_seed(cfg.run.seed)
    dist.print0(f"# resolved config ({world} rank{'s' if world > 1 else ''}, {device})\n{to_toml(cfg)}")
    return rank, world, device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype from the config: auto -> bfloat16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Run:
    """One stage's model, optimizer, LR schedule, precision, logger, progress bar and checkpoints."""

    def __init__(self, cfg, init_dir: Path, device: torch.device, optim_cfg, total: int):
        self.cfg, self.init_dir, self.device, self.total = cfg, Path(init_dir), device, total
        self.dir = Path(cfg.run.out)
        self.model_cfg = ModelConfig.from_dir(init_dir)
        self.compute_dtype = resolve_dtype(cfg.model.dtype, device)
        self.model = build_model_for_training(init_dir, device, compute_dtype=self.compute_dtype,
                                              compile=cfg.model.compile,
                                              activation_checkpointing=cfg.model.activation_checkpointing,
                                              lora=cfg.lora, seed=cfg.run.seed)
        self.optimizer = build_optimizer(self.model, optim_cfg)
        self.scheduler, self.warmup = build_scheduler(self.optimizer, optim_cfg, total)
        self.amp = dist.autocast(self.model, device, self.compute_dtype)
        self.start, self.resumed, self.extra_models = 0, None, None
        self.logger = self.bar = None
        self.t_start = time.time()

    @property
    def params(self) -> str:
        """The model's size for the start line, and what trains when that is not all of it (LoRA)."""
        total = self.model_cfg.num_params()
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)  # global sizes (DTensor too)
        return f"{total:,} parameters" + (f" + {trainable:,} trainable (the adapters; the base frozen)"
                                          if trainable < sum(p.numel() for p in self.model.parameters()) else "")

    @property
    def precision(self) -> str:
        how = f"FSDP2 over {dist.get_world_size()} ranks" if dist.is_sharded(self.model) else "unsharded"
        by = "MixedPrecisionPolicy" if dist.is_sharded(self.model) else "autocast"
        amp = "" if self.compute_dtype == torch.float32 else f" ({by}, fp32 master weights)"
        return f"compute {self.compute_dtype}{amp}, {how}"

    def resume(self, extra_models: dict | None = None) -> dict | None:
        """Load the latest checkpoint of the run directory (when `checkpoint.resume`) into the model, the
        optimizer, the scheduler and `extra_models` (e.g. GRPO's reference); -> its saved state, or None.

        Resuming is exact: loading puts the checkpoint's LR schedule and AdamW settings in place of the config's,
        so a config whose schedule (lr, total steps, warm-up, schedule, floor) would give a step still to train
        another LR, or whose betas, eps or weight decay differ, is a ConfigError naming the changes (raised once
        the checkpoint is read; nothing is written before). A change that moves no LR (a constant schedule
        extended) is taken, and the config's schedule is the one carried on."""
        self.extra_models = extra_models
        ckpt = latest_checkpoint(self.dir) if self.cfg.checkpoint.resume else None
        if ckpt is None:
            return None
        config = training_settings(self.optimizer, self.scheduler)
        state = load_checkpoint(ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                extra_models=extra_models)
        changes = setting_changes(training_settings(self.optimizer, self.scheduler), config, state["step"], self.total)
        if changes:
            raise ConfigError(f"cannot resume {ckpt} exactly: the config changes what it was trained with "
                              f"({', '.join(changes)}), and resuming would put the checkpoint's values back; set "
                              "them back to resume, or start the new settings in another run.out (model.init = this run's hf/ "
                              "export goes on from its weights)")
        for f, fields in zip(self.scheduler.lr_lambdas, config["schedules"]):  # the config's (same LRs ahead)
            vars(f).update(fields)
        self.scheduler.base_lrs = config["base_lrs"]
        self.start, self.resumed = state["step"], ckpt
        self.t_start = time.time() - state.get("elapsed", 0.0)
        return state

    def open(self):
        """Write config.toml (saying how it differs from the one already there) and open the metrics logger
        and the progress bar. Call once the inputs are read and any checkpoint is loaded."""
        from tqdm import tqdm

        cfg = self.cfg
        if dist.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            saved = self.dir / "config.toml"
            try:
                diff = config_diff(load_run_config(saved, cls=type(cfg)), cfg) if saved.is_file() else []
            except ConfigError as e:
                diff = [f"(previous config unreadable: {e})"]
            if diff:
                print("config differs from the run directory's previous config.toml:\n  " + "\n  ".join(diff))
            saved.write_text(to_toml(cfg))
        self.logger = MetricsLogger(self.dir, tensorboard=cfg.log.tensorboard, enabled=dist.is_main(),
                                    resume_step=self.start if self.resumed is not None else 0)
        self.bar = tqdm(total=self.total, initial=self.start, unit="step", dynamic_ncols=True,
                        disable=not (dist.is_main() and cfg.log.progress))

    def write(self, line: str):
        (self.bar.write if not self.bar.disable else dist.print0)(line)

    def steps(self):
        """Step numbers start + 1 .. total (counted from 1, as checkpoints and logs are), with the fault
        injection points that the fault tests use."""
        for step in range(self.start + 1, self.total + 1):
            fault("step_start", step)
            yield step
            fault("step_end", step)

    @property
    def elapsed(self) -> float:
        return time.time() - self.t_start

    def log(self, step: int, metrics: dict | None, keys: tuple, **postfix):
        """metrics.jsonl (rank 0; None on other ranks), the progress bar, and a line every `log.every` steps."""
        self.logger.log(step, metrics)
        self.bar.update(1)
        if metrics is None:
            return
        if postfix:
            self.bar.set_postfix(**postfix, refresh=False)
        if step % self.cfg.log.every == 0 or step == self.total:
            self.write(step_line(metrics, step=step, total=self.total, elapsed=self.elapsed, keys=keys))

    def checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return step == self.total or (every > 0 and step % every == 0)

    def checkpoint(self, step: int, tokenizer, state: dict):
        """An atomic checkpoint of the model, optimizer, scheduler, extra models and `state` (+ step, elapsed)."""
        save_checkpoint(self.dir, step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                        extra_models=self.extra_models, keep_last=self.cfg.checkpoint.keep_last, tokenizer=tokenizer,
                        state={"step": step, **state, "elapsed": self.elapsed})

    def stop(self, step: int, what: str, before: str):
        """Raise the error that ends a run on a non-finite value, naming the last good checkpoint."""
        raise NonFiniteLossError(f"step {step}: non-finite {what}; stopped {before}. Last good checkpoint: "
                                 f"{latest_checkpoint(self.dir) or 'none'} (untouched)")

    def finish(self, tokenizer):
        self.bar.close()
        self.logger.close()
        if self.cfg.checkpoint.export:
            out = export_hf(self.model, self.dir / "hf", tokenizer, dtype=self.model_cfg.dtype)
            dist.print0(f"exported {out}")
            if self.cfg.lora.rank > 0:
                out = export_adapter(self.model, self.dir / "adapter", self.cfg.lora, str(self.init_dir))
                dist.print0(f"exported {out} (the adapters alone, PEFT's format)")
        dist.cleanup()
