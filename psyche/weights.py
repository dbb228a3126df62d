"""Hugging Face checkpoints in and out: config.json + model.safetensors, or shards + index.

Loading builds the model on the meta device and assigns each tensor as it is read, so a checkpoint is
never held twice in memory (a 7B bf16 model needs ~15 GB, not ~30). Every tensor is checked against the
model: a missing, unexpected or misshapen tensor is an error that names the tensor and the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from psyche.model_config import ModelConfig
from psyche.hf_checkpoint import (INDEX_NAME, SINGLE_NAME, CheckpointError,  # noqa: F401 (re-exported)
                                  check_checkpoint, checkpoint_files)
from psyche.model import Qwen2


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory PARENT/PREFIX<random>, its mode set by the umask as any directory's is (not
    tempfile.mkdtemp's 0700, which would make every checkpoint and export unreadable to other users)."""
    while True:
        tmp = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Write a directory atomically: yield a temporary sibling, rename it onto `path` on success.

    A crash or exception at any point leaves the previous `path` (if any) untouched. Replacing an existing
    directory takes two renames (old aside, new in); between them a crash leaves `path.old-*` beside it.
    The directory and its files get the modes the umask gives (e.g. 0755 and 0644 under umask 022), so another
    user's process can read a checkpoint or an export as far as the umask allows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(path.parent, prefix=f".{path.name}.tmp-")
    try:
        yield tmp
        file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666  # the umask's, as mkdir applied it to tmp
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, file_mode)  # safetensors creates its files 0600 whatever the umask
                with open(f, "rb") as fh:  # flush file contents before the rename makes them visible
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_state_dict_into(model: Qwen2, path: str | Path, dtype=None, device="cpu") -> Qwen2:
    """Read safetensors from `path` into a (meta or real) model, strictly, assigning tensors."""
    path = Path(path)
    expected = {k: v for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
    loaded: dict[str, torch.Tensor] = {}
    for fname, names in checkpoint_files(path).items():
        f = path / fname
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as st:
                keys = list(st.keys()) if names is None else names
                for name in keys:
                    if tied and name == "lm_head.weight":
                        continue  # some exporters write the tied head anyway; it is the embedding
                    if name not in expected:
                        raise CheckpointError(f"{f}: unexpected tensor {name!r} (not a parameter of the model)")
                    t = st.get_tensor(name)
                    want = tuple(expected[name].shape)
                    if tuple(t.shape) != want:
                        raise CheckpointError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, model expects {want}")
                    loaded[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except SafetensorError as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
        except KeyError as e:  # index names a tensor the shard does not hold
            raise CheckpointError(f"{f}: tensor {e} listed in the index is missing from the shard") from None
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if tied:
        loaded["lm_head.weight"] = loaded["model.embed_tokens.weight"]
    model.load_state_dict(loaded, strict=True, assign=True)
    model.tie_weights()
    return model


def load_pretrained(path: str | Path, dtype=None, device="cpu") -> tuple[Qwen2, ModelConfig]:
    """Load an HF Qwen2 checkpoint directory -> (model in eval mode, config).

    dtype: None keeps the checkpoint's dtype (torch_dtype of config.json decides nothing: the tensors do).
    """
    cfg = ModelConfig.from_dir(path)
    check_checkpoint(cfg, path)  # from the headers, before anything is built
    with torch.device("meta"):
        model = Qwen2(cfg)
    load_state_dict_into(model, path, dtype=dtype, device=device)
    return model.eval(), cfg


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += n
    if cur:
        shards.append(cur)
    return shards


def parse_size(s: int | str) -> int:
    if isinstance(s, int):
        return s
    s = s.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def safetensors_write_error(e: SafetensorError, f: str | Path) -> OSError:
    """The OSError behind safetensors' failure to write `f` (a full disk, a file-size limit), naming the file.

    safetensors reports it as a SafetensorError whose message holds the OS error ("... (os error 28)") but not
    the file; without an error number the message itself is the reason (EIO)."""
    code = re.search(r"os error (\d+)", str(e))
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(f))
    return OSError(errno.EIO, f"safetensors could not write it ({e})", str(f))


def save_safetensors(tensors: dict[str, torch.Tensor], f: str | Path, metadata: dict | None = None):
    """safetensors' save_file; a failed write is an OSError naming the file (see safetensors_write_error)."""
    try:
        save_file(tensors, str(f), metadata=metadata)
    except SafetensorError as e:
        raise safetensors_write_error(e, f) from e


def save_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, max_shard_size="5GB"):
    """Write config.json and safetensors (+ index when sharded) into an existing directory."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # HF ties it from embed_tokens on load
    dtypes = {t.dtype for t in state.values()}
    hf = cfg.to_hf_dict()
    if len(dtypes) == 1:
        hf["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    shards = _shards(state, parse_size(max_shard_size))
    if len(shards) == 1:
        save_safetensors(shards[0], out / SINGLE_NAME, metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, out / fname, metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def save_pretrained(model: Qwen2, path: str | Path, max_shard_size="5GB", tokenizer=None,
                    state_dict: dict | None = None):
    """Write an HF-loadable checkpoint directory atomically (config.json, safetensors, tokenizer files).

    state_dict: pass a gathered full state dict when the model itself is sharded (FSDP2).
    """
    state = state_dict if state_dict is not None else model.state_dict()
    with atomic_dir(path) as tmp:
        save_state_dict(state, model.config, tmp, max_shard_size)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(path)


def init_checkpoint(out: str | Path, preset_name: str = "tiny", seed: int = 0, texts=None, tokenizer_vocab: int = 1024,
                    **overrides) -> Path:
    """Make a random checkpoint directory with a freshly trained byte-level BPE tokenizer.

    The model's vocab_size is the tokenizer's rounded up to a multiple of 64 (as Qwen pads its embedding).
    """
    from psyche.model_config import preset
    from psyche.model import build_model
    from psyche.tokenizer import SAMPLE_CORPUS, train_tokenizer

    tok = train_tokenizer(texts or SAMPLE_CORPUS, vocab_size=tokenizer_vocab)
    if preset_name == "tiny" or "vocab_size" in overrides:
        overrides.setdefault("vocab_size", -(-tok.vocab_size // 64) * 64)
    cfg = preset(preset_name, **overrides)
    cfg.eos_token_id = tok.im_end_id
    cfg.bos_token_id = tok.eot_id
    model = build_model(cfg, seed=seed)
    return save_pretrained(model, out, tokenizer=tok)
