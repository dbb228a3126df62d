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

What both stages do around their loop (the model to start from, the optimizer and LR schedule, config,
precision, resume, logging, checkpoints, export) is psyche/run.py.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from psyche import dist
from psyche.config import RunConfig
from psyche.data import Batch, SFTBatches, load_messages, tokenize
from psyche.run import NonFiniteLossError, Run, begin, prepare_init


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
    dist.print0(f"model: {run.params} from {init_dir}; {run.precision}\n"
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
