"""Supervised fine-tuning: the step and the loop (`python train.py --stage sft`, or under torchrun).

One optimizer step over a global batch of G rows split into micro-batches on R ranks:

    N      = number of target tokens in the whole global batch (all micro-batches, all ranks; all-reduced)
    loss   = -(1/N) * sum over every target token t of log p(token_t | tokens_<t)
    grad   = sum over micro-batches and ranks of grad(-sum_mb log p / N)   (FSDP2 reduces by sum)

so gradient accumulation and the number of ranks change nothing but rounding. Then the total gradient norm
is clipped (over all shards), AdamW steps, and the LR follows linear warm-up then cosine (or linear) decay.

The log-probs come from `model(..., targets=labels)`, which applies lm_head to the target positions only,
in chunks, and never holds (N, V) fp32 logits. A non-finite loss or gradient norm stops the run before the
optimizer step, so no checkpoint ever holds the poisoned weights. Resume is automatic from the latest
checkpoint in the run directory; batches are a pure function of (data, seed, step), so the resumed run
continues bit for bit (CPU, fp32).

The functions under "building blocks" are shared with the GRPO stage; what both stages do around their
loop (config, precision, resume, logging, checkpoints, export) is psyche/run.py.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from psyche import dist
from psyche.checkpoint import load_full_model_state, read_safetensors_dir
from psyche.config import ModelConfig, RunConfig
from psyche.data import Batch, SFTBatches, load_messages, tokenize
from psyche.run import NonFiniteLossError, Run, begin, resolve_dtype  # noqa: F401 (re-exported)


# ============================================================================================================
# building blocks (shared with GRPO)
# ============================================================================================================

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
                             activation_checkpointing=False, compile=False) -> nn.Module:
    """fp32 master weights from `init_dir`, parallelized (psyche.dist.parallelize), on `device`.

    One rank: load, then AC/compile. Several ranks: build on the meta device, fully_shard, materialise only
    the local shards, and let rank 0 alone read the files and broadcast (no rank holds two full copies).
    """
    cfg = ModelConfig.from_dir(init_dir)
    kw = dict(activation_checkpointing=activation_checkpointing, compile=compile, param_dtype=compute_dtype,
              reduce_dtype=torch.float32)
    if dist.get_world_size() == 1:
        from psyche.weights import load_pretrained

        model, _ = load_pretrained(init_dir, dtype=torch.float32, device=device)
        return dist.parallelize(model.train(), **kw)
    from psyche.model import Qwen2

    with torch.device("meta"):
        model = Qwen2(cfg)
    dist.parallelize(model, **kw)
    model.to_empty(device=device)
    sd = {}
    if dist.is_main():
        sd = {k: v.float() for k, v in read_safetensors_dir(init_dir).items()}
        if cfg.tie_word_embeddings:
            sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    load_full_model_state(model, sd)
    return model.train()


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


# ============================================================================================================
# the SFT step
# ============================================================================================================

def train_step(model, optimizer, micro_batches: list[Batch], *, device, grad_clip: float, amp) -> dict:
    """One optimizer step (without the LR update) over this rank's micro-batches -> metrics.
    Raises NonFiniteLossError before touching the weights when loss or gradient norm is not finite."""
    counts = torch.tensor([sum(b.n_targets for b in micro_batches), sum(b.n_tokens for b in micro_batches)],
                          dtype=torch.float64, device=device)
    dist.all_reduce_sum(counts)  # (global target tokens, global real tokens)
    n_targets = counts[0].float()
    loss_sum = torch.zeros((), device=device)
    for mb in micro_batches:
        mb = mb.to(device)
        with amp:
            # (B, T), 0 where IGNORE; every target's log-prob gets the gradient -1 / n_targets
            logp, _ = model(mb.input_ids, doc_ids=mb.doc_ids, targets=mb.labels, uniform_grad=True)
        (-logp.sum() / n_targets).backward()
        loss_sum += -logp.detach().sum()
    loss = dist.all_reduce_sum(loss_sum) / n_targets
    grad_norm = dist.clip_grad_norm_(model.parameters(), grad_clip)
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"loss {loss.item()}, grad norm {grad_norm.item()}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "targets": int(counts[0]), "n_tokens": int(counts[1])}


# ============================================================================================================
# the loop
# ============================================================================================================

def run_sft(cfg: RunConfig, on_step=None) -> Path:
    """Train per `cfg`; returns the run directory. Works alone or under torchrun.

    on_step: optional callback(step, model) after each optimizer step, on every rank (e.g. a held-out
    evaluation for a learning curve; greedy generation draws no random numbers, so the run is unchanged)."""
    from psyche.tokenizer import Tokenizer
    from psyche.validate import check_sft

    rank, world, device = begin(cfg, check_sft)
    sc = cfg.sft

    # ---- data (a bad input fails here, before the run directory's files are touched) ----
    messages = load_messages(cfg.data.paths, cfg.data.format)
    texts = [m["content"] for msgs, _ in messages for m in msgs]
    init_dir = prepare_init(cfg.model.init, Path(cfg.run.out), cfg.run.seed, texts)
    tok = Tokenizer.from_dir(init_dir)
    samples = tokenize(messages, tok, cfg.data.max_length, cfg.data.truncation, cfg.data.system)
    dist.print0(f"data: {samples.summary()}")
    global_batch = sc.global_batch_tokens // cfg.data.max_length if sc.global_batch_tokens > 0 else sc.global_batch
    batches = SFTBatches(samples, global_batch=global_batch, micro_batch=sc.micro_batch, world_size=world,
                         packing=cfg.data.packing, max_length=cfg.data.max_length, pad_id=tok.pad_id,
                         seed=cfg.run.seed)
    total = sc.max_steps if sc.max_steps > 0 else math.ceil(sc.epochs * batches.steps_per_epoch)
    run = Run(cfg, init_dir, device, cfg.optim, total)
    dist.print0(f"model: {run.model_cfg.num_params():,} parameters from {init_dir}; {run.precision}\n"
                f"batch: {global_batch} {'packed rows' if cfg.data.packing else 'samples'} per step = "
                f"{sc.micro_batch} per micro-batch x {batches.accum} accumulation x {world} ranks; "
                f"{batches.steps_per_epoch} steps per epoch, {total} steps, {run.warmup} warm-up")

    fingerprint = samples.fingerprint()
    state = run.resume()
    tokens_seen = state["tokens"] if state else 0
    if state:
        dist.print0(f"resumed from {run.resumed} at step {run.start} (epoch {state['data']['epoch']}, "
                    f"batch {state['data']['batch']})")
        if state.get("data_fingerprint") != fingerprint:
            dist.print0("warning: the tokenised data differs from the checkpoint's; the data position is reused")
    run.open()

    for step in run.steps():  # step = optimizer steps done after this one
        t0 = time.time()
        lr = run.optimizer.param_groups[0]["lr"]
        try:
            m = train_step(run.model, run.optimizer, batches.micro_batches(step - 1, rank), device=device,
                           grad_clip=cfg.optim.grad_clip, amp=run.amp)
        except NonFiniteLossError as e:
            run.stop(step, str(e), "before the optimizer step")
        run.scheduler.step()
        dt = time.time() - t0
        tokens_seen += m["n_tokens"]
        row = {"loss": m["loss"], "lr": lr, "grad_norm": m["grad_norm"], "tokens": tokens_seen,
               "targets": m["targets"], "tok_per_s": m["n_tokens"] / dt, "epoch": (step - 1) / batches.steps_per_epoch,
               "dt": dt}
        if device.type == "cuda":
            row["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        run.log(step, row, ("loss", "lr", "grad_norm", "tok_per_s"),
                loss=f"{m['loss']:.3f}", tok_s=f"{row['tok_per_s']:.0f}")
        if run.checkpoint_due(step):
            run.checkpoint(step, tok, {"data": batches.position(step), "tokens": tokens_seen,
                                       "data_fingerprint": fingerprint})
        if on_step is not None:
            on_step(step, run.model)
    run.finish(tok)
    return run.dir
