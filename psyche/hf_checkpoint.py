"""What a Hugging Face checkpoint directory holds, read without torch: which safetensors file holds which
tensor (the index or the single file), each tensor's shape from the files' headers (no tensor data is read),
and whether a config.json describes them.

The safetensors format: 8 bytes, the little-endian length n of a JSON header, the header
{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}, then the data. Reading n and the header
costs a few kilobytes per file however large the checkpoint, so a config.json that does not fit its
checkpoint (10,000 layers, a wrong hidden size, a tied head) is refused in milliseconds, before any model is
built. The tensor data itself is read by safetensors in psyche/weights.py, which checks it again.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from psyche.model_config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


def checkpoint_files(path: Path) -> dict[str, list[str] | None]:
    """file name -> tensor names in it, from the index (None: every tensor of the single file)."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> file name")
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
                raise CheckpointError(f"{index}: tensor {name!r} names {fname!r}, not a file of this directory")
            files.setdefault(fname, []).append(name)
        for fname in files:
            if not (path / fname).is_file():
                raise CheckpointError(f"{index}: shard {fname!r} is listed but {path / fname} does not exist")
        return files
    single = path / SINGLE_NAME
    if single.is_file():
        return {SINGLE_NAME: None}
    raise CheckpointError(f"{path}: neither {SINGLE_NAME} nor {INDEX_NAME} found")


def header_shapes(f: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in one safetensors file, from its header alone."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file (header of {n} bytes in a file of "
                                  f"{size})")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{f}: corrupt safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: corrupt safetensors header (not an object)")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{f}: corrupt safetensors header (tensor {name!r} has no valid shape)")
        out[name] = tuple(shape)
    return out


def checkpoint_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """name -> (shape, file) of every tensor of the checkpoint directory `path`."""
    have = {}
    for fname, names in checkpoint_files(path).items():
        f = path / fname
        shapes = header_shapes(f)
        for name in (shapes if names is None else names):
            if name not in shapes:
                raise CheckpointError(f"{f}: tensor {name!r} listed in the index is missing from the shard")
            have[name] = (shapes[name], f)
    return have


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors an HF Qwen2 checkpoint of `cfg` holds, name -> shape, from the config alone (lm_head left
    out when tied)."""
    C, i, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    layer = {"input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,),
             "self_attn.q_proj.weight": (q, C), "self_attn.q_proj.bias": (q,),
             "self_attn.k_proj.weight": (kv, C), "self_attn.k_proj.bias": (kv,),
             "self_attn.v_proj.weight": (kv, C), "self_attn.v_proj.bias": (kv,),
             "self_attn.o_proj.weight": (C, q), "mlp.gate_proj.weight": (i, C), "mlp.up_proj.weight": (i, C),
             "mlp.down_proj.weight": (C, i)}
    out = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    for n in range(cfg.num_hidden_layers):
        out.update({f"model.layers.{n}.{k}": v for k, v in layer.items()})
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, C)
    return out


# The config.json keys that set a tensor's shape, by the end of its name (for errors that name the key).
SHAPE_KEYS = {"embed_tokens.weight": "vocab_size, hidden_size", "lm_head.weight": "vocab_size, hidden_size",
              "q_proj.weight": "num_attention_heads, head_dim, hidden_size",
              "q_proj.bias": "num_attention_heads, head_dim",
              "k_proj.weight": "num_key_value_heads, head_dim, hidden_size",
              "k_proj.bias": "num_key_value_heads, head_dim",
              "v_proj.weight": "num_key_value_heads, head_dim, hidden_size",
              "v_proj.bias": "num_key_value_heads, head_dim",
              "o_proj.weight": "hidden_size, num_attention_heads, head_dim",
              "gate_proj.weight": "intermediate_size, hidden_size", "up_proj.weight": "intermediate_size, hidden_size",
              "down_proj.weight": "hidden_size, intermediate_size", "norm.weight": "hidden_size"}


def check_checkpoint(cfg: ModelConfig, path: str | Path):
    """The tensors `cfg` implies against those the checkpoint's headers list, before any model is built: a
    config.json that does not describe its checkpoint is a CheckpointError naming config.json and the key."""
    path = Path(path)
    src = path / "config.json"
    have = checkpoint_shapes(path)
    if cfg.tie_word_embeddings:
        have.pop("lm_head.weight", None)  # some exporters write the tied head anyway
    layers = {int(p[2]) for p in (n.split(".") for n in have) if p[:2] == ["model", "layers"] and p[2].isdigit()}
    n_ckpt = max(layers) + 1 if layers else 0
    if n_ckpt != cfg.num_hidden_layers:
        raise CheckpointError(f"{src}: num_hidden_layers is {cfg.num_hidden_layers}, but the checkpoint holds "
                              f"{n_ckpt} layers")
    want = expected_tensors(cfg)
    if "lm_head.weight" in want and "lm_head.weight" not in have:
        raise CheckpointError(f"{src}: tie_word_embeddings is false, but the checkpoint has no lm_head.weight")
    for name, shape in want.items():
        if name in have and have[name][0] != shape:
            keys = next(k for end, k in SHAPE_KEYS.items() if name.endswith(end))
            raise CheckpointError(f"{src}: {keys} give {name!r} the shape {shape}, but {have[name][1]} holds "
                                  f"{have[name][0]} (the config describes {cfg.num_params():,} parameters)")
    missing = sorted(set(want) - set(have))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(f"{have[extra[0]][1]}: unexpected tensor {extra[0]!r} (not a parameter of the model)")
