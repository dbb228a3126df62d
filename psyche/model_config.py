"""The config.json of a Qwen2 checkpoint: `ModelConfig`, whose field names mirror Hugging Face's so that a
checkpoint's config reads straight into it and writes back out unchanged, every key checked on load
(`ModelConfig.check`); `preset(name)` gives the Qwen2.5 shapes and a tiny one."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

# Keys a config.json must have; everything else has a Qwen2 default.
REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
SUPPORTED_MODEL_TYPES = ("qwen2",)
# What config.json's integer sizes may be: far beyond any Qwen2 (7B: hidden 3,584, 28 layers, vocab 152,064,
# context 131,072), and small enough that a typo cannot ask for a model no machine holds.
SIZE_RANGES = {"hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 18), "num_hidden_layers": (1, 1024),
               "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "head_dim": (2, 1024),
               "vocab_size": (1, 1 << 22), "max_position_embeddings": (1, 1 << 22)}
DTYPES = ("float32", "bfloat16", "float16", "float64")  # torch_dtype


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class ConfigError(ValueError):
    """A config.json (or a run config) that cannot be used; the message names the file and key."""


@dataclass
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None  # None -> equal to num_attention_heads (no GQA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    model_type: str = "qwen2"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if (self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_attention_heads)
                and self.num_attention_heads > 0):
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                                  f"({self.num_attention_heads}) and no head_dim is given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.check()

    def check(self):
        """Every field in range, and the rules between them; a ConfigError naming the key. Arithmetic only: it
        runs in microseconds whatever size the config describes (the model is never built here)."""
        for key, (lo, hi) in SIZE_RANGES.items():
            v = getattr(self, key)
            if not _is_int(v) or not lo <= v <= hi:
                raise ConfigError(f"{key} must be an integer in [{lo}, {hi}], got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for key, lo, hi in (("rope_theta", 0.0, math.inf), ("rms_norm_eps", 0.0, 1.0)):
            v = getattr(self, key)
            if not _is_number(v) or not (lo < v < hi):
                raise ConfigError(f"{key} must be a finite number in ({lo:g}, {hi:g}), got {v!r}")
        for key in ("attention_dropout", "initializer_range"):
            v = getattr(self, key)
            if not _is_number(v) or not 0 <= v < (1 if key == "attention_dropout" else math.inf):
                raise ConfigError(f"{key} must be a finite number >= 0{' and < 1' if key == 'attention_dropout' else ''}"
                                  f", got {v!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (Qwen2 uses 'silu')")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype must be one of {DTYPES}, got {self.torch_dtype!r}")
        for key in ("bos_token_id", "eos_token_id"):
            v = getattr(self, key)
            if v is not None and (not _is_int(v) or not 0 <= v < self.vocab_size):
                raise ConfigError(f"{key} must be a token id in [0, vocab_size = {self.vocab_size}), got {v!r}")

    @property
    def dtype(self):
        """The torch dtype of `torch_dtype` (torch is imported here only: reading a config needs no torch)."""
        import torch

        return getattr(torch, self.torch_dtype)

    def num_params(self) -> int:
        """Parameter count implied by the shapes (lm_head counted once when tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + q + 2 * (h * kv + kv) + q * h
        layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h

    # ---- config.json in and out ----
    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: a config.json must hold a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "qwen2")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: unsupported model_type {model_type!r} (supported: {SUPPORTED_MODEL_TYPES})")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {missing}")
        d = dict(d)
        # transformers>=5 nests rope_theta in rope_parameters; older files keep it at the top level.
        for key in ("rope_scaling", "rope_parameters"):
            rope = d.get(key)
            if rope is None:
                continue
            if not isinstance(rope, dict):
                raise ConfigError(f"{source}: {key} must be an object or null, got {rope!r}")
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                raise ConfigError(f"{source}: {key} rope_type {kind!r} is not supported (psyche implements the "
                                  "default rotary embedding; remove the key to run without the scaling)")
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", cls.rope_theta)
        if "torch_dtype" not in d and isinstance(d.get("dtype"), str):
            d["torch_dtype"] = d["dtype"]
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0] if d["eos_token_id"] else None
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kwargs)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        f = Path(path) / "config.json"
        if not f.is_file():
            raise ConfigError(f"{f}: config.json not found")
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from None
        except (UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{f}: not readable as JSON ({type(e).__name__})") from None
        return cls.from_dict(d, source=str(f))

    def to_hf_dict(self) -> dict:
        """The config.json that transformers' Qwen2ForCausalLM reads."""
        d = dataclasses.asdict(self)
        d.update(
            architectures=["Qwen2ForCausalLM"],
            use_cache=True,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=self.num_hidden_layers,
        )
        return d


def _preset(**kw) -> ModelConfig:
    return ModelConfig(**kw)


# Shapes of the official Qwen2.5 checkpoints (config.json of each Instruct model).
PRESETS = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    # Tiny shapes for tests and the CPU demo; vocab_size is set from the tokenizer when one is made.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=2048,
                 torch_dtype="float32"),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return _preset(**{**PRESETS[name], **overrides})
