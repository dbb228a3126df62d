"""Distributed plumbing: process group from torchrun's environment, rank-0 printing, and `parallelize()`.

Policy, in one place:
- No torchrun environment (or WORLD_SIZE=1): one process, no process group needed, model left unsharded.
- torchrun with N > 1 ranks: gloo on CPU, nccl on CUDA (LOCAL_RANK picks the GPU); `parallelize` applies
  activation checkpointing -> torch.compile -> `fully_shard` on each decoder block -> `fully_shard` on the
  root (torchtitan's order), so embeddings, final norm and lm_head (tied or not) form the root's group.
- One rank is never sharded: FSDP2 with a single shard only adds DTensor bookkeeping. The 1-rank run is the
  reference the N-rank run must reproduce (tests/test_dist.py). A bf16 compute dtype is then applied
  with `torch.autocast` (fp32 master weights, CPU or CUDA), under FSDP2 with `MixedPrecisionPolicy`
  (param_dtype for compute, reduce_dtype for gradient reduction, fp32 sharded master weights).

The model code never sees any of this: it is a plain nn.Module before and after.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """-> (rank, world_size, device). Reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun.

    Initialises the default process group only when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA). Calling it
    again is harmless.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return rank, world, device


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity on one process); returns t."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _reduce_numbers(x, op):
    if isinstance(x, dict):
        keys = sorted(x)
        return dict(zip(keys, _reduce_numbers([float(x[k]) for k in keys], op)))
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in x] if isinstance(x, list) else float(x)
    t = torch.tensor(x if isinstance(x, list) else [float(x)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t.tolist() if isinstance(x, list) else float(t.item())


def sum_over_ranks(x):
    """A number (or a tensor holding one), a list of numbers or a dict of them, summed over ranks in float64
    -> Python float(s). One all-reduce; every rank must pass the same keys. Identity (as floats) in one
    process. For host-side numbers: counts, metric sums; use `all_reduce_sum` for tensors that stay."""
    return _reduce_numbers(x, dist.ReduceOp.SUM if dist.is_available() else None)


def max_over_ranks(x):
    """As `sum_over_ranks`, with the maximum."""
    return _reduce_numbers(x, dist.ReduceOp.MAX if dist.is_available() else None)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s python object on every rank (identity on one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj) -> list | None:
    """Every rank's object, as a list on rank 0 (None elsewhere); [obj] on one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_object(obj) -> list:
    """Every rank's object, in rank order, on every rank; [obj] on one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- model parallelisation ----

def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def apply_activation_checkpointing(block: nn.Module):
    """Recompute `block`'s forward in backward. The module is not wrapped, so parameter names (and therefore
    checkpoints and HF exports) are unchanged: only the instance's `forward` is replaced."""
    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def parallelize(model: nn.Module, *, activation_checkpointing: bool = False, compile: bool = False,
                param_dtype: torch.dtype = torch.float32, reduce_dtype: torch.dtype = torch.float32,
                shard: bool | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Activation checkpointing -> torch.compile -> fully_shard per decoder block -> fully_shard(root).

    `model.model.layers[i]` are the blocks. shard=None shards when more than one rank is running. The same
    object is returned (fully_shard changes its class in place). Call it before building the optimizer.
    """
    blocks = model.model.layers
    for block in blocks:
        if activation_checkpointing:
            apply_activation_checkpointing(block)
        if compile:
            block.compile(dynamic=True)  # compiles __call__ in place: names and hooks unchanged
    if shard is None:
        shard = get_world_size() > 1
    if not shard:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for i, block in enumerate(blocks):
        # the last block's params are needed again at the start of backward: keep them gathered
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    # The root (embeddings, final norm, lm_head) stays gathered after forward: backward starts with lm_head,
    # so resharding it would only add an all-gather. (It also lets code apply lm_head after forward.)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    # Gradients are reduced as sums, not averages: each rank's loss is already divided by the token count
    # of the whole global batch, so the sum over ranks is the gradient of the global loss.
    # (A plain SUM: NCCL's PREMUL_SUM, FSDP2's default for a custom factor, does not exist on gloo.)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    model._psyche_reshard_after_forward = reshard_after_forward
    return model


def autocast(model: nn.Module, device: torch.device, compute_dtype: torch.dtype):
    """The context a forward runs in: `torch.autocast` in the compute dtype for an unsharded model whose
    compute dtype is not fp32 (CPU or CUDA; the weights stay fp32); nothing otherwise (FSDP2 already casts
    parameters through its MixedPrecisionPolicy). A fresh context manager object on every call."""
    if compute_dtype != torch.float32 and not is_sharded(model):
        return torch.autocast(device.type, dtype=compute_dtype)
    return contextlib.nullcontext()


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Keep a sharded model's full parameters gathered for the duration of the block (e.g. a rollout of many
    decode steps, where re-gathering every layer at every token would dominate). Parameters are in the
    FSDP param_dtype; use under torch.no_grad(). No-op for an unsharded model.

        with torch.no_grad(), dist.unsharded(policy):
            out = sampler.generate(policy, ...)   # plain forwards, no all-gathers per step
    """
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods:
        yield model
        return
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        rest = getattr(model, "_psyche_reshard_after_forward", True)
        for m in mods:
            m.reshard()
        blocks = [m for m in mods if m is not model]
        for i, m in enumerate(blocks):
            m.set_reshard_after_forward(rest and i < len(blocks) - 1, recurse=False)
        if model in mods:
            model.set_reshard_after_forward(rest, recurse=False)


# ---- gradients ----

@torch.no_grad()
def global_norm(tensors) -> torch.Tensor:
    """L2 norm of a list of tensors in fp32, over every rank's shards: sqrt(Σ_ranks Σ_local t²). A sharded
    (DTensor) tensor contributes its local shard and the squares are summed over ranks; shards are disjoint,
    so every element is counted once."""
    from torch.distributed.tensor import DTensor

    if not tensors:
        return torch.zeros(())
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    sq = torch.stack([torch.linalg.vector_norm(t.float()) ** 2 for t in local]).sum()
    if any(isinstance(t, DTensor) for t in tensors):
        all_reduce_sum(sq)
    return sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Total L2 norm of all gradients (`global_norm`: every rank's shards). Scales the gradients by
    min(1, max_norm / (norm + 1e-6)) when max_norm > 0. Returns the pre-clip norm. Parameters shared by two
    modules are listed once by `parameters()`, so a tied embedding counts once."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = global_norm(grads)
    if grads and max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g = g.to_local() if isinstance(g, DTensor) else g
            g.mul_(coef.to(g.device, g.dtype))
    return norm
