"""HF checkpoints in and out, and clear errors on bad checkpoints."""

import json

import pytest
import torch

from helpers import hf_model, tiny_config
from psyche.config import ConfigError, ModelConfig
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
    with pytest.raises(CheckpointError, match=rf"{fname}.*model.norm.weight.*\(7,\).*\(64,\)"):
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
