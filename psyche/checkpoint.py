"""Training checkpoints: atomic save, resume, keep-last-K, and the final Hugging Face export.

Layout of RUN_DIR/checkpoints/step_00000012/ (a full fine-tuning's checkpoint is also an HF model directory;
a LoRA run's holds the base and its adapters unmerged, under psyche's names, for resume alone: its hf/ and
adapter/ exports are what other tools load):
    config.json, model.safetensors (or shards + index), tokenizer files   the model, loadable by
                                                                          transformers and load_pretrained
    <name>.safetensors      each extra model (e.g. a value head), full state dict
    optimizer.pt            full optimizer state keyed by parameter name (torch.save; read weights_only)
    trainer_state.pt        caller's `state` (step, data position, ...), scheduler state, RNG of every rank
    meta.json               step, world size, time; written last

Design: full (unsharded) state dicts gathered to rank 0 on CPU, written by rank 0 alone, rather than sharded
DCP files. Why: a checkpoint is then plain safetensors that any tool reads, independent of the number of
ranks (resume on a different world size works unchanged), and atomicity is one directory rename. The cost is
rank-0 CPU memory and gather time, ~16 bytes per parameter with AdamW (about 120 GB for 7B): fine on one
8-GPU node; for larger models switch `_full_*_state` to torch.distributed.checkpoint (each rank writes its
shard) keeping this API.

Atomicity: rank 0 writes into a hidden temporary directory beside the final one and renames it into place
(psyche.weights.atomic_dir); only `step_XXXXXXXX` directories holding meta.json count as checkpoints, so a
process killed mid-write leaves the previous checkpoint as the latest. Leftover temporaries are removed by
the next save. Loading never unpickles arbitrary objects: torch.load(weights_only=True).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint.state_dict as sd_api  # full (unsharded) state dicts under FSDP2
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from psyche import dist
from psyche.weights import (INDEX_NAME, SINGLE_NAME, CheckpointError, atomic_dir, safetensors_write_error,
                            save_safetensors, save_state_dict)

CKPT_DIR = "checkpoints"
STEP_RE = re.compile(r"^step_(\d{8})$")


# ---- test hook ----

def fault(point: str, step: int):
    """Test hook: PSYCHE_FAULT="point@step[@rank]:action" makes this process `sleep` (to be killed from
    outside), `raise`, `exit`, or fail a write as a full disk does (`enospc`: OSError ENOSPC) when it reaches
    `point` at `step`. Points: ckpt_write (inside a checkpoint write, after the weights, before the rename),
    step_start, step_end. Unset: does nothing."""
    spec = os.environ.get("PSYCHE_FAULT")
    if not spec:
        return
    where, _, action = spec.partition(":")
    name, at, *rank = where.split("@")
    if name != point or int(at) != step or (rank and int(rank[0]) != dist.get_rank()):
        return
    print(f"PSYCHE_FAULT {point} step {step} rank {dist.get_rank()}: {action}", flush=True)
    if action == "sleep":
        time.sleep(3600)
    elif action == "exit":
        os._exit(3)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    raise RuntimeError(f"PSYCHE_FAULT: injected failure at {point} step {step} on rank {dist.get_rank()}")


# ---- finding checkpoints ----

def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}"


def _step_of(ckpt: Path) -> int:
    return int(STEP_RE.match(ckpt.name).group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


# ---- gathering state ----

def _options(**kw):
    return sd_api.StateDictOptions(full_state_dict=True, **kw)


def _multi() -> bool:
    return dist.get_world_size() > 1


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU, on rank 0 (an empty dict on other ranks). Collective under FSDP."""
    if not _multi():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return sd_api.get_model_state_dict(model, options=_options(cpu_offload=True))


def _full_optim_state(model: nn.Module, optimizer) -> dict:
    return sd_api.get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=_multi()))


def load_full_model_state(model: nn.Module, sd: dict):
    """Load a full state dict (on rank 0; {} elsewhere) into a possibly sharded model. Collective."""
    if not _multi():
        model.load_state_dict(sd, strict=True)
        return
    sd_api.set_model_state_dict(model, sd, options=_options(broadcast_from_rank0=True))


def _set_optim_state(model: nn.Module, optimizer, sd: dict):
    sd_api.set_optimizer_state_dict(model, optimizer, sd, options=_options(broadcast_from_rank0=_multi()))


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(_as_tuple(s["python"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _distinct_storage(sd: dict) -> dict:
    """safetensors refuses tensors sharing memory (tied weights): give each its own copy."""
    seen, out = set(), {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        out[k] = v.clone() if ptr in seen else v.contiguous()
        seen.add(ptr)
    return out


def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors' own errors, and a missing file
        raise CheckpointError(f"{f}: cannot be read ({type(e).__name__}: {e})") from None


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF-layout directory (single file or shards listed in the index)."""
    index = path / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE_NAME]
    sd = {}
    for f in files:
        sd.update(_read_safetensors(path / f))
    return sd


def _os_reason(e: OSError) -> str:
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


def _save_pt(obj, f: Path):
    """torch.save; a failed write (a full disk, a file-size limit) comes back from torch as a RuntimeError that
    names neither the file nor the cause ("unexpected pos ..."): an OSError naming the file instead."""
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # torch may append a C++ stack
        raise OSError(errno.EIO, f"torch.save could not write it ({first}; a full disk or a file-size limit?)",
                      str(f)) from e


def _load_pt(f: Path):
    """A torch.save file of plain tensors and containers (weights_only: never unpickles arbitrary objects)."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not written by save_checkpoint
        raise CheckpointError(f"{f}: cannot be read ({type(e).__name__}: {e})") from None


def _load_into(model: nn.Module, sd: dict, source: Path):
    try:
        load_full_model_state(model, sd)
    except RuntimeError as e:  # missing, unexpected or misshapen tensors: another model's checkpoint
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{source}: does not fit the model ({' '.join(x.strip() for x in first[:3])})") from None


# ---- save / load ----

def save_checkpoint(run_dir: str | Path, step: int, *, model: nn.Module, optimizer=None, scheduler=None,
                    state: dict | None = None, extra_models: dict[str, nn.Module] | None = None,
                    keep_last: int = 2, tokenizer=None) -> Path:
    """Write RUN_DIR/checkpoints/step_XXXXXXXX atomically; keep it and the newest `keep_last` - 1 of the earlier
    steps' (later steps' are another run's: left alone). Call on every rank (the state is gathered
    collectively); rank 0 writes. Returns the checkpoint path."""
    model_sd = full_model_state(model)
    extra_sd = {name: full_model_state(m) for name, m in (extra_models or {}).items()}
    optim_sd = _full_optim_state(model, optimizer) if optimizer is not None else None
    rngs = dist.gather_object(rng_state())
    final = checkpoint_path(run_dir, step)
    if dist.is_main():
        root = final.parent
        root.mkdir(parents=True, exist_ok=True)
        for p in root.glob(".step_*"):  # temporaries of writes that were killed
            shutil.rmtree(p, ignore_errors=True)
        try:
            with atomic_dir(final) as tmp:
                save_state_dict(model_sd, model.config, tmp)
                if tokenizer is not None:
                    tokenizer.save(tmp)
                for name, sd in extra_sd.items():
                    save_safetensors(_distinct_storage(sd), tmp / f"{name}.safetensors")
                if optim_sd is not None:
                    _save_pt(optim_sd, tmp / "optimizer.pt")
                trainer = {"state": state or {}, "rng": rngs, "world_size": dist.get_world_size(),
                           "scheduler": scheduler.state_dict() if scheduler is not None else None}
                _save_pt(trainer, tmp / "trainer_state.pt")
                fault("ckpt_write", step)
                meta = {"step": step, "world_size": dist.get_world_size(),
                        "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}
                (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
        except OSError as e:  # disk full, quota, permissions: atomic_dir has removed the partial write
            raise CheckpointError(f"{final}: writing the checkpoint failed ({_os_reason(e)}); nothing was replaced "
                                  f"or deleted, the last good checkpoint is {latest_checkpoint(run_dir) or 'none'}"
                                  ) from e
        earlier = [c for c in list_checkpoints(run_dir) if _step_of(c) < step]  # never this one, nor a later one
        for old in earlier[:max(0, len(earlier) - (max(1, keep_last) - 1))]:
            trash = old.with_name(f".step_trash_{old.name}")
            os.replace(old, trash)  # out of sight first, so a half-deleted directory is never a checkpoint
            shutil.rmtree(trash, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer=None, scheduler=None,
                    extra_models: dict[str, nn.Module] | None = None, restore_rng: bool = True) -> dict:
    """Load a checkpoint written by save_checkpoint into (possibly sharded) model, optimizer, scheduler and
    extra models, restore this rank's RNG state, and return the caller's `state` dict. Call on every rank."""
    path = Path(path)
    main = dist.is_main()
    model_sd = read_safetensors_dir(path) if main else {}
    if main and getattr(model.config, "tie_word_embeddings", False):
        model_sd.setdefault("lm_head.weight", model_sd["model.embed_tokens.weight"])
    _load_into(model, model_sd, path)
    for name, m in (extra_models or {}).items():
        f = path / f"{name}.safetensors"
        _load_into(m, _read_safetensors(f) if main else {}, f)
    if optimizer is not None:
        osd = _load_pt(path / "optimizer.pt") if main else {}
        _set_optim_state(model, optimizer, osd)
    trainer = _load_pt(path / "trainer_state.pt") if main else None
    trainer = dist.broadcast_object(trainer)
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    if restore_rng:
        rngs = trainer["rng"]
        if len(rngs) == dist.get_world_size():
            set_rng_state(rngs[dist.get_rank()])
        else:
            dist.print0(f"warning: {path} was written by {len(rngs)} ranks, now {dist.get_world_size()}: "
                        "RNG states are not restored")
    return trainer["state"]


def export_hf(model: nn.Module, path: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
              max_shard_size="5GB") -> Path:
    """The final model as an HF checkpoint directory (config.json, safetensors, tokenizer), gathered from
    the shards to rank 0 and written atomically; `dtype` casts floating tensors (e.g. bf16 for release).
    Call on every rank."""
    from psyche.weights import save_pretrained

    from psyche.lora import has_lora, merged_state_dict

    sd = full_model_state(model)
    if dist.is_main():
        if has_lora(model):  # a plain checkpoint: the adapters folded into the weights
            sd = merged_state_dict(sd, model)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        try:
            save_pretrained(model, path, max_shard_size=max_shard_size, tokenizer=tokenizer, state_dict=sd)
        except OSError as e:  # written atomically: a previous export at `path` is still whole
            raise CheckpointError(f"{path}: writing the exported model failed ({_os_reason(e)})") from e
    dist.barrier()
    return Path(path)


def export_adapter(model: nn.Module, path: str | Path, lora, base: str) -> Path:
    """A LoRA run's adapters alone (adapter_model.safetensors + adapter_config.json, as PEFT writes them),
    gathered to rank 0 and written atomically. Call on every rank."""
    from psyche.lora import ADAPTER_WEIGHTS, adapter_config, save_adapter, settings

    sd = full_model_state(model)
    if dist.is_main():
        try:
            try:
                save_adapter(path, sd, adapter_config(**settings(lora), base=base))
            except SafetensorError as e:  # the weights file is the one safetensors writes
                raise safetensors_write_error(e, Path(path) / ADAPTER_WEIGHTS) from e
        except OSError as e:  # written atomically: a previous export at `path` is still whole
            raise CheckpointError(f"{path}: writing the adapters failed ({_os_reason(e)})") from e
    dist.barrier()
    return Path(path)
