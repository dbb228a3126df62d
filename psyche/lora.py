"""LoRA, written out: low-rank adapters on named linear layers, with the base weights frozen.

A target layer y = x Wᵀ + b becomes

    y = x Wᵀ + b + s · B A dropout(x),     A (r, in), B (out, r),   s = alpha / r  (rsLoRA: alpha / √r)

A starts as nn.Linear's default (Kaiming uniform) and B at 0, so training starts from the base model exactly.
Only A and B get gradients and optimizer state. The layer stays an nn.Linear (its class is swapped to
`LoRALinear`), so the base weights keep their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`)
and the adapters sit beside them (`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`), as PEFT names them.

- GRPO's reference is the policy with its adapters off (`adapters_off`): no second model in memory.
- Rollouts run the adapters unmerged, the function the trainer differentiates: merging in place and back
  would not restore the base weights bit for bit, and at rank 8 the unmerged decode costs a few percent
  (bench/lora.py).
- Files: `save_adapter` writes adapter_model.safetensors + adapter_config.json as PEFT does, so
  `peft.PeftModel.from_pretrained` loads them onto transformers' Qwen2; `load_adapter` reads such a directory
  (PEFT's or psyche's) onto a psyche model; `merged_state_dict` folds the adapters into plain weights for an
  HF export.
- Dropout acts only where gradients are taken: rollouts and the old and reference log-probs (all under
  no_grad) see the adapters without it. With dropout 0 the adapters' gradients do not depend on
  micro-batching or the number of ranks; dropout draws from torch's RNG, which they do change.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # what can be adapted
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's name for the wrapped model in adapter files


class LoRAError(ValueError):
    """A LoRA setting or adapter that cannot be used; the message names the key, file or tensor."""


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank adapter beside its frozen weight (made by `add_lora`, never directly)."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    scaling: float
    lora_enabled: bool

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_enabled:
            h = self.lora_dropout(x) if torch.is_grad_enabled() else x  # no dropout in a sampled rollout
            y = y + self.lora_B(self.lora_A(h)) * self.scaling
        return y


def scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


CONFIG_KEYS = {"rank": "lora.rank", "alpha": "lora.alpha", "dropout": "lora.dropout", "targets": "lora.targets"}
PEFT_KEYS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules"}


def check_settings(rank: int, alpha: float, dropout: float, targets, where: str = "", keys=CONFIG_KEYS):
    """One-line errors for settings that cannot make adapters, naming `keys`' name for each (the run config's,
    or adapter_config.json's with PEFT_KEYS), after `where` (a file) if given."""
    at = f"{where}: " if where else ""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise LoRAError(f"{at}{keys['rank']}={rank!r}: the adapters' rank must be an integer >= 1")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise LoRAError(f"{at}{keys['alpha']}={alpha!r}: must be a finite number > 0")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise LoRAError(f"{at}{keys['dropout']}={dropout!r}: must be in [0, 1)")
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown or len(set(targets)) != len(targets):
        raise LoRAError(f"{at}{keys['targets']}={list(targets)!r}: name each of {', '.join(TARGETS)} at most once"
                        + (f" (only the decoder's projections can be adapted, not {unknown})" if unknown else ""))


def add_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS, *, dropout: float = 0.0,
             rslora: bool = False, seed: int = 0) -> list[str]:
    """Turn every linear layer named in `targets` into a LoRALinear in place, freeze every other parameter,
    and initialise the adapters from `seed` (on the CPU, in name order: the same numbers on any device and
    world size; on the meta device only shapes are made). -> the adapted layers' names."""
    check_settings(rank, alpha, dropout, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, mod in list(model.named_modules()):  # a list: adapters are added as it goes
        if name.rsplit(".", 1)[-1] in targets and type(mod) is nn.Linear:
            dev, dt = mod.weight.device, mod.weight.dtype
            mod.__class__ = LoRALinear
            mod.lora_A = nn.Linear(mod.in_features, rank, bias=False, device=dev, dtype=dt)
            mod.lora_B = nn.Linear(rank, mod.out_features, bias=False, device=dev, dtype=dt)
            mod.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            mod.scaling, mod.lora_enabled = scaling(alpha, rank, rslora), True
            names.append(name)
    if not names:
        raise LoRAError(f"lora.targets={list(targets)!r}: no such linear layer in the model")
    if model.lm_head.weight.device.type != "meta":
        with torch.no_grad():
            for name, t in init_state(model, seed).items():
                model.get_parameter(name).copy_(t)
    return names


def init_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The adapters' initial values {param name: tensor} (CPU, fp32): A as nn.Linear initialises its weight
    (Kaiming uniform, a = √5), drawn from one generator seeded `seed` in name order; B zero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            r, n_in = mod.lora_A.weight.shape
            bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform_(a=√5) on a (r, in) weight
            out[f"{name}.lora_A.weight"] = torch.empty(r, n_in).uniform_(-bound, bound, generator=g)
            out[f"{name}.lora_B.weight"] = torch.zeros(mod.lora_B.weight.shape)
    return out


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model for the duration of the block (GRPO's reference): every adapter skipped."""
    layers = list(lora_layers(model).values())
    before = [m.lora_enabled for m in layers]
    for m in layers:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m, on in zip(layers, before):
            m.lora_enabled = on


class Reference:
    """The policy with its adapters off, standing in for a reference model (a LoRA run's GRPO keeps no copy):
    calls, parameters and lm_head go to the policy, every forward runs with `adapters_off`."""

    def __init__(self, policy: nn.Module):
        self.policy = policy

    def __call__(self, *args, **kw):
        with adapters_off(self.policy):
            return self.policy(*args, **kw)

    def parameters(self):
        return self.policy.parameters()

    @property
    def lm_head(self):
        return self.policy.lm_head


# ---- files: PEFT's format ----

def adapter_config(rank: int, alpha: float, targets, dropout: float, rslora: bool, base: str = "") -> dict:
    """adapter_config.json as PEFT writes it for a LoRA on a causal LM."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
            "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(set(targets)), "use_rslora": rslora,
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "use_dora": False, "revision": None}


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a full model state dict, under the names PEFT's files use."""
    return {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()
            if k.endswith((".lora_A.weight", ".lora_B.weight"))}


def save_adapter(path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """adapter_model.safetensors + adapter_config.json into `path`, atomically (PEFT's format)."""
    from safetensors.torch import save_file

    from psyche.weights import atomic_dir

    with atomic_dir(path) as tmp:
        save_file(adapter_tensors(state), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def read_adapter_config(path) -> dict:
    """An adapter directory's adapter_config.json, checked: a LoRA psyche can build."""
    f = Path(path) / ADAPTER_CONFIG
    if not f.is_file():
        raise LoRAError(f"{f}: not found (an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        c = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise LoRAError(f"{f}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(c, dict) or c.get("peft_type") != "LORA":
        raise LoRAError(f"{f}: peft_type must be \"LORA\"")
    targets = c.get("target_modules")
    if not isinstance(targets, list):
        raise LoRAError(f"{f}: target_modules must be a list of layer names ({', '.join(TARGETS)}), got {targets!r}")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules"):
        if c.get(key):
            raise LoRAError(f"{f}: {key} is not supported (psyche adapts every layer named in target_modules, "
                            "with one rank and alpha)")
    if c.get("use_dora") or c.get("modules_to_save") or c.get("bias", "none") != "none":
        raise LoRAError(f"{f}: only plain LoRA (no DoRA, no modules_to_save, bias \"none\") is supported")
    check_settings(c.get("r"), c.get("lora_alpha"), c.get("lora_dropout", 0.0), targets, where=str(f), keys=PEFT_KEYS)
    return c


def check_init_matches(lora):
    """lora.init's adapter must be the one the config describes (rank, alpha, rsLoRA, targets), else a
    LoRAError naming the key; dropout is the run's own (a training setting, not part of the adapter)."""
    c = read_adapter_config(lora.init)
    pairs = (("lora.rank", lora.rank, "r", c["r"]), ("lora.alpha", float(lora.alpha), "lora_alpha", float(c["lora_alpha"])),
             ("lora.rslora", bool(lora.rslora), "use_rslora", bool(c.get("use_rslora"))),
             ("lora.targets", sorted(lora.targets), "target_modules", sorted(c["target_modules"])))
    for key, ours, theirs_key, theirs in pairs:
        if ours != theirs:
            raise LoRAError(f"{key}={ours!r}, but lora.init's adapter has {theirs_key} {theirs!r} "
                            f"({Path(lora.init) / ADAPTER_CONFIG}); set {key} to match")


def settings(lora) -> dict:
    """add_lora's arguments for a LoraSection (check_init_matches holds a lora.init adapter to them)."""
    return dict(rank=lora.rank, alpha=lora.alpha, targets=lora.targets, dropout=lora.dropout, rslora=lora.rslora)


def load_adapter(model: nn.Module, path, *, seed: int = 0) -> list[str]:
    """Put the adapters of `path` (PEFT's format, from PEFT or psyche) onto `model`: every tensor checked
    against the layer it belongs to. -> the adapted layers' names."""
    c = read_adapter_config(path)
    names = add_lora(model, c["r"], c["lora_alpha"], c["target_modules"], dropout=c.get("lora_dropout", 0.0),
                     rslora=bool(c.get("use_rslora")), seed=seed)
    load_adapter_tensors(model, path)
    return names


def load_adapter_tensors(model: nn.Module, path):
    """Copy the adapter tensors of `path` into the model's LoRA layers (read_adapter_tensors checks them)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in read_adapter_tensors(path, {n: p.shape for n, p in params.items()}).items():
            params[name].copy_(t.to(params[name].dtype))


def read_adapter_tensors(path, shapes: dict) -> dict[str, torch.Tensor]:
    """The adapter tensors of `path` under the model's parameter names, each checked against `shapes` (the
    model's {parameter name: global shape}): no unknown tensor, no wrong shape, none missing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = Path(path) / ADAPTER_WEIGHTS
    if not f.is_file():
        raise LoRAError(f"{f}: not found")
    try:
        tensors = load_file(str(f))
    except SafetensorError as e:
        raise LoRAError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    want = {n: tuple(s) for n, s in shapes.items() if n.endswith((".lora_A.weight", ".lora_B.weight"))}
    out = {}
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX).replace(".lora_A.default.", ".lora_A.").replace(
            ".lora_B.default.", ".lora_B.")
        if name not in want:
            raise LoRAError(f"{f}: tensor {key!r} is not an adapter of this model's adapted layers")
        if tuple(t.shape) != want[name]:
            raise LoRAError(f"{f}: tensor {key!r} has shape {tuple(t.shape)}, the model's layer expects "
                            f"{want[name]} (an adapter of another base model?)")
        out[name] = t
    missing = sorted(set(want) - set(out))
    if missing:
        raise LoRAError(f"{f}: missing adapter tensor(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return out


def merged_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A full state dict with every adapter folded into its weight (W + s·B A, in fp32) and the adapter tensors
    dropped: a plain checkpoint of the adapted model. `model` gives each layer's scaling."""
    out = {k: v for k, v in state.items() if not k.endswith((".lora_A.weight", ".lora_B.weight"))}
    for name, m in lora_layers(model).items():
        w = out[f"{name}.weight"]
        a, b = state[f"{name}.lora_A.weight"].float(), state[f"{name}.lora_B.weight"].float()
        out[f"{name}.weight"] = (w.float() + (b @ a) * m.scaling).to(w.dtype)
    return out
