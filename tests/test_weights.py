"""HF checkpoints in and out, and clear errors on bad checkpoints."""

import json

import pytest
import torch

from helpers import hf_model, tiny_config
from psyche.config import ConfigError
from psyche.model_config import ModelConfig
from psyche.model import build_model
from psyche.weights import CheckpointError, load_pretrained, save_pretrained


def _x(cfg):
    return torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_hf_saved_loads_in_psyche(tmp_path, tied, shard):
    cfg = tiny_config(tied=tied)
    hf = hf_model(cfg)
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, **kw)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    m, c = load_pretrained(tmp_path)
    assert c.tie_word_embeddings == tied
    if tied:
        assert m.lm_head.weight is m.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(m(_x(cfg)), hf(_x(cfg)).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shard", ["5GB", "20KB"])
def test_psyche_saved_loads_in_transformers(tmp_path, tied, shard):
    import transformers

    cfg = tiny_config(tied=tied)
    m = build_model(cfg, seed=1).eval()
    save_pretrained(m, tmp_path / "ck", max_shard_size=shard)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32,
                                                                 output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(hf(_x(cfg)).logits, m(_x(cfg)), atol=1e-4, rtol=0)
    m2, _ = load_pretrained(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(m2(_x(cfg)), m(_x(cfg)), atol=0, rtol=0)


def test_load_with_dtype(tmp_path):
    cfg = tiny_config()
    save_pretrained(build_model(cfg), tmp_path / "ck")
    m, _ = load_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


@pytest.fixture
def saved(tmp_path):
    cfg = tiny_config(tied=False)
    return save_pretrained(build_model(cfg), tmp_path / "ck", max_shard_size="20KB")


def _rewrite_shard(path, fn):
    from safetensors.torch import load_file, save_file

    index = json.loads((path / "model.safetensors.index.json").read_text())
    fname = index["weight_map"]["model.norm.weight"]
    sd = load_file(path / fname)
    fn(sd)
    save_file(sd, path / fname, metadata={"format": "pt"})
    return fname


def test_error_missing_shard(saved):
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    fname = index["weight_map"]["lm_head.weight"]
    (saved / fname).unlink()
    with pytest.raises(CheckpointError, match=fname):
        load_pretrained(saved)


def test_error_missing_tensor(saved):
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing tensor.*model.norm.weight"):
        load_pretrained(saved)


def test_error_tensor_listed_but_absent(saved):
    _rewrite_shard(saved, lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_pretrained(saved)


def test_error_unexpected_tensor(tmp_path):
    cfg = tiny_config()
    save_pretrained(build_model(cfg), tmp_path / "ck")
    from safetensors.torch import load_file, save_file

    f = tmp_path / "ck" / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unexpected tensor 'model.layers.0.extra.weight'"):
        load_pretrained(tmp_path / "ck")


def test_error_wrong_shape(saved):
    fname = _rewrite_shard(saved, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(7)))
    with pytest.raises(CheckpointError, match=rf"config.json: hidden_size give 'model.norm.weight' the shape \(64,\), "
                                              rf"but .*{fname} holds \(7,\)"):
        load_pretrained(saved)


@pytest.mark.parametrize("how", ["truncated", "garbage-header"])
def test_error_corrupt_safetensors(tmp_path, how):
    cfg = tiny_config()
    save_pretrained(build_model(cfg), tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\xff" * 8 + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt or truncated"):
        load_pretrained(tmp_path / "ck")


def test_error_config_missing_key(tmp_path):
    save_pretrained(build_model(tiny_config()), tmp_path / "ck")
    d = json.loads((tmp_path / "ck" / "config.json").read_text())
    del d["hidden_size"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json.*hidden_size"):
        load_pretrained(tmp_path / "ck")


def test_error_unsupported_model_type(tmp_path):
    save_pretrained(build_model(tiny_config()), tmp_path / "ck")
    d = json.loads((tmp_path / "ck" / "config.json").read_text())
    d["model_type"] = "llama4"
    (tmp_path / "ck" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json.*unsupported model_type 'llama4'"):
        ModelConfig.from_dir(tmp_path / "ck")


def test_error_config_absent(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        load_pretrained(tmp_path)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous checkpoint intact and no stray temp dir."""
    cfg = tiny_config()
    m = build_model(cfg, seed=0)
    save_pretrained(m, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    import psyche.weights as w

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(w, "save_file", boom)
    with pytest.raises(OSError):
        save_pretrained(build_model(cfg, seed=1), tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_checkpoints_and_exports_are_as_readable_as_the_umask_allows(tmp_path):
    """Directories written atomically (checkpoints, hf/, adapter/) get the umask's mode, as any directory does,
    not the private 0700 of a temporary directory: another user's process can load an export."""
    import os
    import stat

    from psyche.checkpoint import export_adapter, export_hf, save_checkpoint
    from psyche.config import LoraSection
    from psyche.lora import add_lora, settings

    model = build_model(tiny_config(), seed=0)
    lora = LoraSection(rank=2)
    add_lora(model, **settings(lora), seed=0)
    old = os.umask(0o022)
    try:
        written = [save_checkpoint(tmp_path / "run", 1, model=model, state={}), export_hf(model, tmp_path / "hf"),
                   export_adapter(model, tmp_path / "adapter", lora, "base"), save_pretrained(model, tmp_path / "m")]
        os.umask(0o077)
        private = save_pretrained(model, tmp_path / "private")
    finally:
        os.umask(old)
    for d in written:
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in d.iterdir()), d
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


@pytest.mark.parametrize("kw", [dict(tied=True), dict(tied=False), dict(n_head=4, n_kv=1, head_dim=8)])
def test_expected_tensors_are_the_models(kw):
    """The shapes read off config.json (checked against a checkpoint's headers before anything is built) are
    exactly those of the model psyche builds."""
    from psyche.hf_checkpoint import expected_tensors
    from psyche.model import Qwen2

    cfg = tiny_config(**kw)
    with torch.device("meta"):
        sd = Qwen2(cfg).state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    assert expected_tensors(cfg) == {k: tuple(v.shape) for k, v in sd.items()}


BAD_FIELDS = [({"num_attention_heads": 0}, "num_attention_heads must be an integer in [1, 1024], got 0"),
              ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer in [1, 1024], got 0"),
              ({"num_attention_heads": 0, "head_dim": 16}, "num_attention_heads must be an integer"),
              ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads (3)"),
              ({"hidden_size": 66}, "hidden_size (66) is not a multiple of num_attention_heads (4)"),
              ({"head_dim": 15}, "head_dim must be even"),
              ({"hidden_size": 64.0}, "hidden_size must be an integer"),
              ({"num_hidden_layers": True}, "num_hidden_layers must be an integer"),
              ({"intermediate_size": -1}, "intermediate_size must be an integer in [1, "),
              ({"vocab_size": 10 ** 9}, "vocab_size must be an integer in [1, 4194304]"),
              ({"max_position_embeddings": 0}, "max_position_embeddings must be an integer"),
              ({"rope_theta": -1}, "rope_theta must be a finite number in (0, inf), got -1"),
              ({"rope_theta": float("inf")}, "rope_theta must be a finite number"),
              ({"rope_theta": "1e6"}, "rope_theta must be a finite number"),
              ({"rms_norm_eps": 0}, "rms_norm_eps must be a finite number in (0, 1)"),
              ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number"),
              ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling rope_type 'yarn' is not supported"),
              ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6}}, "rope_type 'llama3' is not supported"),
              ({"rope_scaling": 4}, "rope_scaling must be an object or null"),
              ({"torch_dtype": "int8"}, "torch_dtype must be one of"),
              ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
              ({"eos_token_id": 96}, "eos_token_id must be a token id in [0, vocab_size = 96)"),
              ({"bos_token_id": -1}, "bos_token_id must be a token id"),
              ({"attention_dropout": 1.5}, "attention_dropout must be a finite number >= 0 and < 1"),
              ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported")]


@pytest.mark.parametrize("change,msg", BAD_FIELDS, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(BAD_FIELDS)])
def test_config_json_is_checked_key_by_key(tmp_path, change, msg):
    d = {**tiny_config(vocab=96).to_hf_dict(), **change}
    if "head_dim" not in change:
        d.pop("head_dim")
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dir(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: ") and msg in str(e.value), str(e.value)


@pytest.mark.parametrize("change,msg", [
    ({"num_hidden_layers": 1000, "hidden_size": 65536}, "num_hidden_layers is 1000, but the checkpoint holds 2"),
    ({"intermediate_size": 1 << 18}, "intermediate_size, hidden_size give 'model.layers.0.mlp.gate_proj.weight'"),
    ({"vocab_size": 4096}, "vocab_size, hidden_size give 'model.embed_tokens.weight' the shape (4096, 64)"),
    ({"num_key_value_heads": 4}, "num_key_value_heads, head_dim, hidden_size give"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings is false, but the checkpoint has no lm_head.weight")])
def test_a_config_that_does_not_fit_its_checkpoint_is_refused_before_a_model_is_built(tmp_path, monkeypatch,
                                                                                     change, msg):
    """The sizes config.json describes are compared with the safetensors headers (no tensor read) before any
    model is built, even on the meta device: a config of 1,000 layers of width 65,536 costs nothing to refuse."""
    import psyche.model
    from psyche.weights import CheckpointError

    save_pretrained(build_model(tiny_config()), tmp_path / "ck")
    d = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**d, **change}))

    def never(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(psyche.model.Qwen2, "__init__", never)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "ck")
    assert str(e.value).startswith(str(tmp_path / "ck")) and msg in str(e.value), str(e.value)
