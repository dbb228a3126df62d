"""The run configuration of `train.py`: `RunConfig`, nested dataclasses (one per TOML section) read from a TOML
file and overridden with `--set section.key=value` (see `load_run_config`); `SamplingParams`, how a token is
drawn. A checkpoint's own config.json is psyche.model_config.ModelConfig."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from psyche.model_config import ConfigError


class SamplingError(ValueError):
    """A SamplingParams field out of range; `key` names the field and the message says what it must be."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}")
        self.key = key


@dataclass(frozen=True)
class SamplingParams:
    """How a token is drawn from the logits (psyche.sampler.sample): one value for the sampler, the engine,
    evaluation and GRPO alike. Every field is checked when it is made: a value out of range is a SamplingError
    naming the field."""

    temperature: float = 1.0  # 0: greedy; else at least MIN_TEMPERATURE
    top_p: float = 1.0  # in (0, 1]; the most probable token is always kept
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # in [0, 1]

    # A temperature above 0 and below this is refused: logits / temperature overflow fp32 to inf from about 1e-37
    # on (which reads as broken weights), and one this small already samples as greedy but for near-ties.
    MIN_TEMPERATURE: typing.ClassVar[float] = 1e-5

    def __post_init__(self):
        t = self.temperature
        if not (t == 0 or self.MIN_TEMPERATURE <= t < float("inf")):  # (NaN fails both)
            raise SamplingError("temperature", f"must be 0 (greedy) or at least {self.MIN_TEMPERATURE} and finite, "
                                               f"got {t}")
        if not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not self.top_k >= 0:
            raise SamplingError("top_k", f"must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise SamplingError("min_p", f"must be in [0, 1], got {self.min_p}")


# ============================================================================================================
# Run configuration: nested dataclasses, read from TOML, overridden with `--set section.key=value`.
#
# A section is a dataclass; RunConfig holds one field per section. Adding a stage's settings (e.g. `grpo`) is
# adding one dataclass and one field to RunConfig. Loading checks every key and type against the dataclasses
# (and `choices(...)` where a field lists them), so a typo or a wrong type is an error naming the file (or the
# --set) and the key, never a silent default. Supported field types: bool, int, float, str, list[...], a
# nested dataclass (a sub-table), and `X | None` (None only as a Python default: TOML has no null).
# ============================================================================================================


def choices(default, *allowed):
    """A field whose value must be one of `allowed` (checked on load and on --set)."""
    return field(default=default, metadata={"choices": allowed})


def variant(default: str):
    """A grpo field whose value names a registered variant (psyche/grpo/loss.py REGISTRIES, under the field's
    own name): checked against the registry when a value is given, so a variant registered in code is valid."""
    return field(default=default, metadata={"registry": True})


def allowed_values(section, f) -> tuple | None:
    """The values field `f` of `section` may take (None: any of its type)."""
    if f.metadata.get("registry"):
        from psyche.grpo.loss import registered  # imported only when a variant is named

        return tuple(registered(f.name))
    return f.metadata.get("choices")


@dataclass
class RunSection:
    name: str = "psyche"
    seed: int = 0
    out: str = "runs/psyche"  # run directory: config.toml, metrics.jsonl, checkpoints/, hf/


@dataclass
class ModelSection:
    init: str = "preset:tiny"  # HF checkpoint dir, or "preset:NAME": random init + a BPE trained on the data
    dtype: str = choices("auto", "auto", "float32", "bfloat16")  # compute dtype; auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile each decoder block
    activation_checkpointing: bool = False  # recompute each decoder block in backward


@dataclass
class DataSection:
    paths: list[str] = field(default_factory=list)  # JSONL / JSON files, relative to the working directory
    format: str = choices("auto", "auto", "messages", "alpaca", "sharegpt", "pceb")  # auto: decided per record
    max_length: int = 2048  # tokens per sample (and per packed row)
    packing: bool = True  # pack samples into rows (block-diagonal attention); else length-grouped padding
    truncation: str = choices("drop", "drop", "right")  # drop longer samples | cut the end, keep the prompt
    system: str = "default"  # system prompt for samples without one; "default": the tokenizer's own


@dataclass
class OptimSection:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices only (not to biases and norm weights)
    warmup_ratio: float = 0.1  # fraction of the total steps
    warmup_steps: int = 0  # > 0: overrides warmup_ratio
    schedule: str = choices("cosine", "cosine", "linear", "constant")  # the decay after the linear warm-up
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of lr
    grad_clip: float = 1.0  # max total gradient norm; 0 disables clipping


@dataclass
class SFTSection:
    epochs: float = 2.0
    max_steps: int = 0  # > 0: stop after this many optimizer steps, whatever `epochs` says
    global_batch: int = 256  # rows per optimizer step, all ranks together (samples, or packed rows)
    global_batch_tokens: int = 0  # > 0: overrides global_batch with global_batch_tokens // max_length rows
    micro_batch: int = 4  # rows per forward/backward on one rank; accumulation = global / (micro * ranks)


@dataclass
class CheckpointSection:
    every: int = 500  # optimizer steps between checkpoints (the last step is always saved); 0: only the last
    keep_last: int = 2  # older checkpoints are deleted
    resume: bool = True  # continue from the latest checkpoint in the run directory when there is one (its
    #                      LR schedule and AdamW settings must be the config's); false over checkpoints: an error
    export: bool = True  # write an HF-format model to RUN_DIR/hf at the end


@dataclass
class LogSection:
    every: int = 1  # steps between step lines (metrics.jsonl gets every step)
    tensorboard: bool = False  # also write TensorBoard scalars to RUN_DIR/tb
    progress: bool = True  # tqdm bar on rank 0


def _grpo_optim():
    # Psyche-R1's GRPO: lr 1e-6, 10 warm-up steps, then constant (verl's default schedule)
    return OptimSection(lr=1e-6, warmup_steps=10, warmup_ratio=0.0, schedule="constant")


@dataclass
class GRPOSection:
    """GRPO knobs (see psyche/grpo/ for the formulas). Defaults: Psyche-R1's recipe where it states one
    (total batch 128, mini-batch 32, KL loss 0.001, lr 1e-6, 10 warm-up steps, 2 epochs)."""

    paths: list[str] = field(default_factory=list)  # JSONL/JSON: MC items {question, options, answer}, or
    #                                                  {messages: [...prompt turns], answer} with the prompt given
    init: str = ""  # policy (and reference) start; "": model.init
    prompt_style: str = choices("plain", "plain", "psyche")  # MC items -> prompt: as SFT formats them, or
    #                                                          Psyche-R1's system prompt + user prefix
    steps: int = 0  # > 0: stop after this many GRPO steps, whatever `epochs` says
    epochs: float = 2.0  # passes over the prompts
    prompts_per_step: int = 128  # prompts per step, all ranks together (each sampled group_size times)
    group_size: int = 8
    mini_batch: int = 32  # prompts per optimizer step (prompts_per_step / mini_batch updates per pass); 0: all
    micro_batch: int = 16  # sequences per forward/backward on one rank
    ppo_epochs: int = 1  # μ: passes over each step's rollouts
    temperature: float = 1.0  # sampling temperature; log-probs are recomputed at the same temperature
    top_p: float = 1.0  # truncation only chooses what can be sampled; reported log-probs are untruncated
    top_k: int = 0
    min_p: float = 0.0
    max_prompt_length: int = 1024  # longer prompts are dropped (and counted) at load time
    max_new_tokens: int = 1024
    advantage: str = variant("grpo")  # psyche/grpo/advantages.py ESTIMATORS
    std_ddof: int = 1
    adv_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low: DAPO's clip-higher
    dual_clip: float = 0.0  # c > 1 enables dual clip; 0 disables
    ratio_level: str = choices("token", "token", "sequence")  # sequence: GSPO (policy_loss = ppo)
    policy_loss: str = variant("ppo")  # psyche/grpo/loss.py POLICY_LOSSES
    sapo_tau_pos: float = 1.0  # SAPO's gate temperatures for A > 0 / A <= 0
    sapo_tau_neg: float = 1.05
    clip_cov_ratio: float = 0.0002  # Clip-Cov: share of tokens whose gradient is cut ...
    clip_cov_lb: float = 1.0  # ... drawn among those with lb < covariance < ub
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002  # KL-Cov: share of tokens (largest covariance) penalised ...
    kl_cov_coef: float = 0.1  # ... by coef * |log ratio|
    rollout_correction: str = variant("none")  # sampler-trainer
    rc_threshold: float = 2.0  # TIS: weights truncated at this; MIS: the band's upper end
    rc_low: float = 0.5  # MIS: the band's lower end
    sampler_dtype: str = choices("auto", "auto", "float32", "bfloat16", "float16")  # rollouts' compute dtype;
    #                                                    auto: model.dtype's. bfloat16 vs an fp32 trainer makes a real gap
    loss_agg: str = variant("token-mean")  # psyche/grpo/loss.py AGGS
    norm_length: int = 0  # seq-mean-token-sum-norm's constant; 0: max_new_tokens
    kl_coef: float = 0.001
    kl_kind: str = variant("k3")  # psyche/grpo/kl.py KL_KINDS
    kl_mode: str = choices("loss", "loss", "reward")  # β·KL in the loss, or −β·Σ_t KL_t in the reward
    ref_offload: bool = False  # keep the reference model on the CPU between uses
    ref_reset_every: int = 0  # > 0: copy the policy into the reference every N steps
    entropy_coef: float = 0.0  # > 0: entropy bonus
    truncation: str = choices("zero", "zero", "keep", "mask", "penalty")  # see grpo.shape_rewards
    overlong_buffer: int = 0  # penalty: the soft zone before max_new_tokens
    overlong_penalty: float = 1.0
    dynamic_sampling: bool = False  # drop zero-std groups and refill from new prompts
    shuffle_rewards: bool = False  # a negative control: rewards permuted within each step's batch before the
    #                                advantages (accuracy is still logged as scored)
    max_refill: int = 4  # refill rounds per step before giving up (and keeping zero-std groups)
    old_logprobs: str = choices("recompute", "recompute", "sampler")  # π_old: recomputed by the trainer, or
    #                                                                   the sampler's own log-probs
    rewards: list[str] = field(default_factory=lambda: ["format", "accuracy"])  # psyche.rewards.REGISTRY names
    reward_weights: list[float] = field(default_factory=lambda: [0.1, 1.0])
    exact_kl: bool = True  # log the full-vocabulary KL to the reference (one extra forward of each model)
    exact_kl_rows: int = 0  # > 0: compute it on the first N rows of each step only (a cheaper sample); 0: all
    dump_every: int = 10  # steps between dumps of prompts/completions/rewards to rollouts.jsonl; 0: never
    # psyche/grpo/diagnostics.py states what each of these costs
    diagnostics: bool = False  # loss under every aggregation, entropy by position/advantage sign, KL estimators
    #                            vs exact KL, RUN_DIR/pass_rates.jsonl
    grad_split: bool = False  # gradient norm by loss term and by advantage sign (extra forward+backward passes)
    replay_steps: list[int] = field(default_factory=list)  # dump these steps to RUN_DIR/replay/ (psyche replay)
    replay_every: int = 0  # > 0: also dump every N steps
    optim: OptimSection = field(default_factory=_grpo_optim)

    @property
    def sampling(self) -> SamplingParams:
        """The rollouts' sampling settings (temperature, top_p, top_k, min_p)."""
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.min_p)


@dataclass
class RecipeSection:
    """The embedded default (`python train.py`): the Psyche-R1 recipe in miniature on generated exam items.
    See psyche/recipe.py for the stages."""

    base: str = ""  # the model SFT starts from: an HF checkpoint dir; "": the shipped one (psyche/assets/base)
    n_train: int = 4000  # generated training items (the four types in equal parts): the teachers' SFT data and
    #                      the GRPO pool
    n_test_challenge: int = 200  # held-out challenge items (the teachers' slip changes their answer)
    n_test_other: int = 600  # held-out items of the kind the SFT data holds (no fact combination is in training)
    teacher_confusion: float = 0.7  # share of teacher rationales that score a 3-12 month course as under 3 months
    sft_steps: int = 300  # SFT steps from the base model on the teachers' data, at optim.lr
    control_steps: int = 500  # extra SFT steps of the control, from the SFT model: about GRPO's wall time
    control_lr: float = 3e-4  # peak lr of the control (it continues from trained weights)
    grpo_mix: float = 0.5  # fraction of GRPO prompts drawn from the SFT data's items: they keep GRPO from
    #                      pushing neighbouring durations ("1个月") into the middle bin with the 3-12 month ones
    eval_batch: int = 200
    max_new_tokens: int = 64
    samples: int = 4  # sampled replies per challenge test item (T 1.0) for the report's "right reading" rate
    curve_every: int = 0  # > 0: SFT's learning curve every N steps (RUN_DIR/sft/curve.jsonl); costs eval time
    curve_items: int = 150  # held-out items of the SFT data's kind in each curve point (and a third as many
    #                         challenge items, sampled twice at T 1.0 for the right-reading rate)


@dataclass
class LoraSection:
    """LoRA (psyche/lora.py): rank > 0 trains low-rank adapters on the `targets` layers only, in SFT and GRPO
    alike; the base weights stay frozen, GRPO's reference is the policy with its adapters off, and a run exports
    its adapters (RUN_DIR/adapter, PEFT's format) beside the merged model (RUN_DIR/hf)."""

    rank: int = 0  # 0: off (full fine-tuning)
    alpha: float = 16.0  # scaling alpha / rank (rslora: alpha / sqrt(rank))
    dropout: float = 0.0
    rslora: bool = False
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    init: str = ""  # an adapter directory (PEFT format) to start from; "": fresh adapters (B = 0)


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    sft: SFTSection = field(default_factory=SFTSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    lora: LoraSection = field(default_factory=LoraSection)
    recipe: RecipeSection = field(default_factory=RecipeSection)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """`value` (from TOML) as type `tp`, or a ConfigError naming `where`, the expected and the given type.
    An int is accepted where a float is expected; a bool is never an int."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            if alt is type(None):
                continue
            try:
                return _coerce(value, alt, where)
            except ConfigError:
                pass
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (bool, str):
        if isinstance(value, tp):
            return value
    elif dataclasses.is_dataclass(tp):
        raise ConfigError(f"{where} is a section: expected a table, got {type(value).__name__} {value!r}")
    else:
        raise ConfigError(f"{where}: unsupported field type {tp}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _set_field(obj, name: str, value, where: str):
    f = next(f for f in dataclasses.fields(obj) if f.name == name)
    value = _coerce(value, typing.get_type_hints(type(obj))[name], where)
    allowed = allowed_values(obj, f)
    if allowed and value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
    setattr(obj, name, value)


def _unknown(name: str, obj, where: str, scope: str):
    names = [f.name for f in dataclasses.fields(obj)]
    kind = "section" if all(dataclasses.is_dataclass(getattr(obj, n)) for n in names) else "key"
    return ConfigError(f"{where}: unknown {kind} {name!r} in {scope}; valid: {', '.join(names)}")


def _line_of(lines: list[str], path: str) -> int | None:
    """Best-effort line number of `a.b.key = ...` (or of the table header `[a.b.key]`) in TOML text."""
    section, _, key = path.rpartition(".")
    current = ""
    for i, line in enumerate(lines, 1):
        s = line.strip()
        if s.startswith("["):
            current = s.strip("[] ")
            if current == path or current.startswith(path + "."):
                return i
        elif current == section and s.split("=", 1)[0].strip().strip('"') == key:
            return i
    return None


def _fill(obj, d: dict, source: str, lines: list[str], prefix: str = ""):
    """Set obj's fields (recursively into sections) from a TOML table; errors name `source:line`."""
    for key, value in d.items():
        path = prefix + key
        line = _line_of(lines, path)
        where = f"{source}:{line}" if line else source
        if key not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown(key, obj, where, prefix.rstrip(".") or "the config")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {path} is a section: expected a table [{path}], "
                                  f"got {type(value).__name__} {value!r}")
            _fill(current, value, source, lines, path + ".")
        else:
            _set_field(obj, key, value, f"{where}: {path}")


def parse_value(text: str):
    """A --set value as a TOML literal (`3`, `1e-5`, `true`, `"x"`, `[1, 2]`); anything that is not a TOML
    literal is taken as a bare string (`--set data.format=alpaca`)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(cfg, assignment: str):
    """Apply one `section.key=value` (any depth) to a config object in place."""
    where = f"--set {assignment}"
    if "=" not in assignment:
        raise ConfigError(f"{where}: expected SECTION.KEY=VALUE")
    path, text = (s.strip() for s in assignment.split("=", 1))
    parts = path.split(".")
    obj = cfg
    for depth, name in enumerate(parts):
        if name not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown(name, obj, where, ".".join(parts[:depth]) or "the config")
        current = getattr(obj, name)
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(current) and last:
            raise ConfigError(f"{where}: {path} is a section; set one of its keys: "
                              f"{', '.join(f.name for f in dataclasses.fields(current))}")
        if not dataclasses.is_dataclass(current) and not last:
            raise ConfigError(f"{where}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        if last:
            _set_field(obj, name, parse_value(text), f"{where}: {path}")
        obj = current
    return cfg


def load_run_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (), cls=None):
    """Defaults <- TOML file (when given) <- each `--set section.key=value` in order -> a RunConfig (or `cls`)."""
    cfg = (cls or RunConfig)()
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
            d = tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        _fill(cfg, d, str(path), text.splitlines())
    for o in overrides:
        apply_override(cfg, o)
    return cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # 1e-05, inf and nan are all valid TOML
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg) -> str:
    """A config object as TOML text that `load_run_config` reads back to an equal object (None values, which
    TOML cannot express, are left out and so fall back to their defaults)."""
    lines: list[str] = []

    def section(obj, prefix):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
        values = [(k, v) for k, v in items if not dataclasses.is_dataclass(v) and v is not None]
        if prefix and values:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values)
        if values:
            lines.append("")
        for k, v in items:
            if dataclasses.is_dataclass(v):
                section(v, f"{prefix}.{k}" if prefix else k)

    section(cfg, "")
    return "\n".join(lines)


def config_diff(a, b, prefix: str = "") -> list[str]:
    """`section.key: old -> new` for every value that differs between two config objects."""
    out = []
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(va):
            out += config_diff(va, vb, f"{prefix}{f.name}.")
        elif va != vb:
            out.append(f"{prefix}{f.name}: {va!r} -> {vb!r}")
    return out
