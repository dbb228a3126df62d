"""Run configs: TOML + --set overrides, type checks, clear errors naming file/line and key, round trip."""

import dataclasses
from pathlib import Path

import pytest

from psyche.config import ConfigError, RunConfig, choices, load_run_config, parse_value, to_toml

ROOT = Path(__file__).resolve().parents[1]


def _toml(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_the_lora_presets_load_and_validate():
    from psyche.validate import check_sections

    for name in ("tiny-grpo-lora", "qwen2.5-7b-grpo-lora"):
        cfg = load_run_config(ROOT / "configs" / f"{name}.toml")
        check_sections(cfg)
        assert cfg.lora.rank > 0 and len(cfg.lora.targets) == 7
    full = load_run_config(ROOT / "configs/qwen2.5-7b-grpo.toml")
    lora = load_run_config(ROOT / "configs/qwen2.5-7b-grpo-lora.toml")
    same = lambda g: {k: v for k, v in vars(g).items() if k != "optim"}  # noqa: E731
    assert same(lora.grpo) == same(full.grpo) and lora.grpo.optim.lr == pytest.approx(10 * full.grpo.optim.lr)


def test_shipped_configs_load():
    tiny = load_run_config(ROOT / "configs/tiny-sft.toml")
    assert tiny.model.init == "preset:tiny" and tiny.data.paths == ["configs/data/tiny-sft.jsonl"]
    big = load_run_config(ROOT / "configs/qwen2.5-7b-sft.toml")
    o = big.optim
    assert (o.lr, o.betas, o.eps, o.warmup_ratio, o.schedule) == (1e-5, [0.9, 0.999], 1e-8, 0.1, "cosine")
    assert (big.sft.global_batch, big.sft.epochs, big.model.dtype) == (256, 2.0, "bfloat16")


def test_overrides_parse_toml_literals_and_bare_strings(tmp_path):
    cfg = load_run_config(_toml(tmp_path, "[optim]\nlr = 1e-4\n"), [
        "optim.lr=3e-4", "optim.warmup_steps=7", "model.compile=true", 'data.paths=["a.jsonl", "b.json"]',
        "data.format=alpaca", 'run.name="x y"', "optim.grad_clip=2"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.warmup_steps == 7 and cfg.model.compile is True
    assert cfg.data.paths == ["a.jsonl", "b.json"] and cfg.data.format == "alpaca" and cfg.run.name == "x y"
    assert cfg.optim.grad_clip == 2.0 and isinstance(cfg.optim.grad_clip, float)  # int accepted for float
    assert parse_value("1e-5") == 1e-5 and parse_value("runs/x") == "runs/x"


@pytest.mark.parametrize("text,msg", [
    ("[sft]\nmicro = 3\n", "c.toml:2: unknown key 'micro' in sft; valid: epochs, max_steps, global_batch"),
    ("[optim]\nlr = 1\n[foo]\nx = 1\n", "c.toml:3: unknown section 'foo' in the config; valid: run, model, data"),
    ("[sft]\n\nmax_steps = \"5\"\n", "c.toml:3: sft.max_steps: expected int, got str '5'"),
    ("[model]\ncompile = 1\n", "c.toml:2: model.compile: expected bool, got int 1"),
    ("[optim]\nbetas = [0.9, \"a\"]\n", "optim.betas[1]: expected float, got str 'a'"),
    ("optim = 3\n", "c.toml:1: optim is a section"),
    ("[data]\nformat = \"xml\"\n", "data.format: 'xml' is not one of 'auto', 'messages'"),
    ("[sft\n", "c.toml: invalid TOML"),
])
def test_bad_config_file_errors(tmp_path, text, msg):
    with pytest.raises(ConfigError) as e:
        load_run_config(_toml(tmp_path, text))
    assert msg in str(e.value)


@pytest.mark.parametrize("override,msg", [
    ("optim.lrr=1", "--set optim.lrr=1: unknown key 'lrr' in optim; valid: lr, betas"),
    ("optimm.lr=1", "unknown section 'optimm' in the config; valid: run, model"),
    ("optim.lr=true", "--set optim.lr=true: optim.lr: expected float, got bool True"),
    ("sft.max_steps=1.5", "sft.max_steps: expected int, got float 1.5"),
    ("optim=1", "optim is a section; set one of its keys: lr"),
    ("optim.lr.x=1", "optim.lr is a value, not a section"),
    ("optim.lr", "expected SECTION.KEY=VALUE"),
])
def test_bad_override_errors(override, msg):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [override])
    assert msg in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_run_config("nope.toml")


def test_round_trip_through_toml(tmp_path):
    cfg = load_run_config(ROOT / "configs/qwen2.5-7b-sft.toml", ['run.name="中文 \\"q\\""', "optim.lr=inf"])
    p = _toml(tmp_path, to_toml(cfg))
    assert load_run_config(p) == cfg


def test_adding_a_section_is_one_field():
    """How the GRPO stage extends the run config: a dataclass and one field."""

    @dataclasses.dataclass
    class Inner:
        beta: float = 0.0
        mode: str = choices("a", "a", "b")

    @dataclasses.dataclass
    class Ext(RunConfig):
        grpo: Inner = dataclasses.field(default_factory=Inner)

    cfg = load_run_config(None, ["grpo.beta=0.001", "grpo.mode=b"], cls=Ext)
    assert cfg.grpo == Inner(0.001, "b")
    with pytest.raises(ConfigError, match="'c' is not one of"):
        load_run_config(None, ["grpo.mode=c"], cls=Ext)
