"""Model configuration. Field names mirror Hugging Face `config.json` for Qwen2 so that a checkpoint's
config reads straight into `ModelConfig` and writes back out unchanged."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Keys a config.json must have; everything else has a Qwen2 default.
REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
SUPPORTED_MODEL_TYPES = ("qwen2",)


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
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (Qwen2 uses 'silu')")

    @property
    def dtype(self) -> torch.dtype:
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
        model_type = d.get("model_type", "qwen2")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: unsupported model_type {model_type!r} (supported: {SUPPORTED_MODEL_TYPES})")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {missing}")
        d = dict(d)
        # transformers>=5 nests rope_theta in rope_parameters; older files keep it at the top level.
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", cls.rope_theta)
        if "torch_dtype" not in d and isinstance(d.get("dtype"), str):
            d["torch_dtype"] = d["dtype"]
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        f = Path(path) / "config.json"
        if not f.is_file():
            raise ConfigError(f"{f}: config.json not found")
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from None
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
