"""LoRA: parity with PEFT on transformers' Qwen2 (logits, files both ways, the merged export), exact training
mechanics (micro-batches, ranks, frozen base, resume after SIGKILL), GRPO with the adapters-off reference, and
one-line errors for bad settings and adapters."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import hf_model, psyche_from_hf, tiny_config
from psyche.lora import (LoRAError, LoRALinear, TARGETS, adapter_config, adapters_off, add_lora, load_adapter,
                         merged_state_dict, save_adapter)

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("PSYCHE_DEBUG", "PSYCHE_FAULT")}


def _peft():
    try:
        import peft
    except Exception as e:  # noqa: BLE001 (the optional reference)
        pytest.skip(f"peft (test-only reference, tests/references.txt) not importable: {e}")
    return peft


def _randomise_b(model, seed=1):
    """Non-zero B everywhere (fresh adapters start at B = 0, where every parity would hold trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def _x(cfg):
    return torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rslora", [False, True])
def test_psyche_and_peft_adapters_give_the_same_logits_both_ways(tmp_path, rslora):
    peft = _peft()
    cfg = tiny_config(tied=False)
    hf = hf_model(cfg, seed=3)
    ours = psyche_from_hf(hf, cfg)
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    # psyche writes, PEFT reads
    add_lora(ours, 4, 8.0, targets, rslora=rslora, seed=0)
    _randomise_b(ours)
    save_adapter(tmp_path / "ours", ours.state_dict(), adapter_config(4, 8.0, targets, 0.0, rslora))
    theirs = peft.PeftModel.from_pretrained(hf_model(cfg, seed=3), str(tmp_path / "ours")).eval()
    x = _x(cfg)
    with torch.no_grad():
        want, got = theirs(input_ids=x).logits, ours(x)
    assert (want - got).abs().max() <= 1e-5
    with adapters_off(ours), torch.no_grad():  # adapters off: the base model's logits
        assert (ours(x) - hf(input_ids=x).logits).abs().max() <= 1e-5
    # PEFT writes, psyche reads
    lc = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "up_proj"], lora_dropout=0.0, use_rslora=rslora,
                         init_lora_weights=False)  # random B: a non-trivial adapter
    pm = peft.get_peft_model(hf_model(cfg, seed=3), lc).eval()
    pm.save_pretrained(str(tmp_path / "theirs"))
    mine = psyche_from_hf(hf_model(cfg, seed=3), cfg)
    load_adapter(mine, tmp_path / "theirs")
    with torch.no_grad():
        assert (pm(input_ids=x).logits - mine(x)).abs().max() <= 1e-5


def test_the_merged_export_equals_the_unmerged_model(tmp_path):
    from psyche.model import Qwen2

    cfg = tiny_config()
    model = psyche_from_hf(hf_model(cfg, seed=2), cfg)
    add_lora(model, 3, 6.0, TARGETS, seed=4)
    _randomise_b(model)
    merged = merged_state_dict(model.state_dict(), model)
    assert not any("lora_" in k for k in merged)
    with torch.device("meta"):
        plain = Qwen2(cfg)
    plain.load_state_dict(merged, strict=True, assign=True)
    plain.tie_weights()
    x = _x(cfg)
    with torch.no_grad():
        assert (plain.eval()(x) - model.eval()(x)).abs().max() <= 1e-5


def _sft_step_grads(micro: int, rank: int = 4):
    """The adapters' gradient of one SFT step over 8 rows split into micro-batches of `micro`."""
    from psyche.data import Batch
    from psyche.sft import train_step

    cfg = tiny_config(vocab=64)
    model = psyche_from_hf(hf_model(cfg, seed=5), cfg).train()
    add_lora(model, rank, 8.0, TARGETS, seed=0)
    _randomise_b(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (8, 12), generator=g)
    labels = torch.where(torch.rand(8, 12, generator=g) < 0.7, torch.roll(ids, -1, 1), -100)
    batches = [Batch(ids[s:s + micro], labels[s:s + micro], None, micro * 12) for s in range(0, 8, micro)]
    grads = {}

    class Keep(torch.optim.SGD):  # lr 0: read the gradient before it is cleared
        def step(self, closure=None):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_step(model, Keep([p for p in model.parameters() if p.requires_grad], lr=0.0), batches,
               device=torch.device("cpu"), grad_clip=0.0, amp=torch.autocast("cpu", enabled=False))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    return grads


def test_only_the_adapters_learn_and_micro_batching_does_not_change_their_gradient():
    one, four = _sft_step_grads(8), _sft_step_grads(2)
    assert one and set(one) == set(four) and all("lora_" in n for n in one)
    for n in one:
        assert torch.allclose(one[n], four[n], atol=1e-6, rtol=1e-5), n


def _train(out, *sets, stage="sft", env=None):
    config = {"sft": "configs/tiny-sft.toml", "grpo": "configs/tiny-grpo.toml"}[stage]
    cmd = [sys.executable, "train.py", "--stage", stage, "--config", config, "--out", str(out), "--set",
           "log.progress=false", "--set", "lora.rank=4", "--set", "lora.alpha=8.0", *[a for s in sets for a in
                                                                                        ("--set", s)]]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**ENV, **(env or {})})


def test_sft_with_lora_keeps_the_base_and_exports_adapter_and_merged_model(tmp_path):
    peft = _peft()
    r = _train(tmp_path / "run", "sft.max_steps=3")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    from safetensors.torch import load_file

    from psyche.checkpoint import latest_checkpoint
    from psyche.weights import load_pretrained

    init = load_file(tmp_path / "run" / "init" / "model.safetensors")
    ckpt = load_file(latest_checkpoint(tmp_path / "run") / "model.safetensors")
    assert all(torch.equal(init[k], ckpt[k]) for k in init), "the base weights changed"
    assert any("lora_B" in k and ckpt[k].abs().sum() > 0 for k in ckpt), "the adapters did not learn"
    # the exports: a plain merged model, and the adapters alone, which PEFT puts on transformers' Qwen2
    import transformers

    merged, _ = load_pretrained(tmp_path / "run" / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "init"))
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    x = torch.randint(0, merged.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (pm(input_ids=x).logits - merged(x)).abs().max() <= 1e-4


@pytest.mark.slow
def test_lora_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    sets = ("sft.max_steps=4", "checkpoint.every=1", "checkpoint.keep_last=2")
    assert _train(tmp_path / "ref", *sets).returncode == 0
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--stage", "sft", "--config", "configs/tiny-sft.toml", "--out", str(out),
           "--set", "log.progress=false", "--set", "lora.rank=4", "--set", "lora.alpha=8.0",
           *[a for s in sets for a in ("--set", s)]]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "PSYCHE_FAULT": "step_start@3:sleep"}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("PSYCHE_FAULT"):
            os.kill(p.pid, signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL
    r = _train(out, *sets)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-2000:]
    from psyche.metrics import read_metrics

    strip = lambda rows: [{k: v for k, v in x.items() if k not in ("dt", "tok_per_s")} for x in rows]  # noqa: E731
    assert strip(read_metrics(out)) == strip(read_metrics(tmp_path / "ref"))


def test_dropout_acts_only_where_gradients_are_taken():
    """A rollout (no_grad) sees the adapters without dropout, even with the model in train mode; a step with
    gradients draws the dropout mask."""
    cfg = tiny_config()
    m = psyche_from_hf(hf_model(cfg, seed=0), cfg)
    add_lora(m, 4, 8.0, dropout=0.5)
    _randomise_b(m)
    x = _x(cfg)
    with torch.no_grad():
        want = m.eval()(x)
        m.train()
        assert torch.equal(m(x), want) and torch.equal(m(x), want)
    assert not torch.allclose(m(x), want, atol=1e-4)  # with gradients: dropout on


def test_grpo_with_lora_uses_the_base_as_its_reference_and_replays_exactly(tmp_path):
    """No reference copy: the KL to the reference starts at 0 (adapters at B = 0 are the base), grows as the
    adapters learn, and the run exports its adapters; `psyche replay` rebuilds a LoRA run's step bit for bit."""
    r = _train(tmp_path / "run", "grpo.steps=2", "checkpoint.every=0", "grpo.replay_steps=[2]", stage="grpo")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "reference the policy with its adapters off" in r.stdout
    assert "trainable (the adapters; the base frozen)" in r.stdout
    from psyche.metrics import read_metrics

    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and abs(rows[0]["kl_exact"]) < 1e-7 and rows[1]["kl_exact"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    from psyche.analysis import replay

    rep = replay(tmp_path / "run" / "replay" / "step_0002")["replayed"]
    assert rep["loss"] == rows[1]["loss"] and rep["grad_norm"] == rows[1]["grad_norm"]


@pytest.mark.dist
def test_lora_on_two_ranks_equals_one_rank(tmp_path):
    sets = ("sft.max_steps=3", "checkpoint.every=0")
    one = _train(tmp_path / "one", *sets)
    assert one.returncode == 0, one.stderr[-2000:]
    init = json.dumps(str(tmp_path / "one" / "init"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--stage",
           "sft", "--config", "configs/tiny-sft.toml", "--out", str(tmp_path / "two"), "--set", "log.progress=false",
           "--set", "lora.rank=4", "--set", "lora.alpha=8.0", "--set", f"model.init={init}",
           *[a for s in sets for a in ("--set", s)]]
    two = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    from psyche.metrics import read_metrics

    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4, (a, b)
    from safetensors.torch import load_file

    w1 = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    w2 = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys() and all((w1[k] - w2[k]).abs().max() <= 1e-5 for k in w1)


def test_bad_settings_and_adapters_are_one_line_errors(tmp_path):
    cfg = tiny_config()
    m = psyche_from_hf(hf_model(cfg, seed=0), cfg)
    with pytest.raises(LoRAError, match=r"lora.rank=0: the adapters' rank must be an integer >= 1"):
        add_lora(m, 0, 8.0)
    with pytest.raises(LoRAError, match=r"lora.targets=\['q_proj', 'qkv'\].*only the decoder's projections can be "
                                        r"adapted, not \['qkv'\]"):
        add_lora(m, 4, 8.0, ["q_proj", "qkv"])
    add_lora(m, 4, 8.0, ["q_proj"])
    save_adapter(tmp_path / "a", m.state_dict(), adapter_config(4, 8.0, ["q_proj"], 0.0, False))
    other = tiny_config(n_head=2, head_dim=16)  # a base of another width
    o = psyche_from_hf(hf_model(other, seed=0), other)
    with pytest.raises(LoRAError, match=r"adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_attn"
                                        r".q_proj.lora_A.weight' has shape \(4, 64\), the model's layer expects"):
        load_adapter(o, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                      "target_modules": "q_proj|v_proj"}))
    with pytest.raises(LoRAError, match="target_modules must be a list"):
        load_adapter(psyche_from_hf(hf_model(cfg, seed=0), cfg), tmp_path / "a")
    c = adapter_config(4, 8.0, ["q_proj"], 0.0, False)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**c, "layers_to_transform": [0]}))
    with pytest.raises(LoRAError, match="layers_to_transform is not supported"):
        load_adapter(psyche_from_hf(hf_model(cfg, seed=0), cfg), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**c, "lora_alpha": 0}))
    with pytest.raises(LoRAError, match=r"adapter_config.json: lora_alpha=0: must be a finite number > 0"):
        load_adapter(psyche_from_hf(hf_model(cfg, seed=0), cfg), tmp_path / "a")


def test_an_adapter_to_start_from_is_checked_on_one_rank_and_on_several(tmp_path):
    """lora.init: its rank, alpha, rsLoRA and targets must be the config's (one line naming the key); GRPO refuses
    it (the reference would not be the starting policy); the multi-rank loader checks its tensors as one rank."""
    from psyche.config import ConfigError, load_run_config
    from psyche.run import _adapter_values
    from psyche.validate import check_sections, check_stage

    cfg = tiny_config()
    m = psyche_from_hf(hf_model(cfg, seed=0), cfg)
    add_lora(m, 4, 8.0, ["q_proj", "v_proj"])
    save_adapter(tmp_path / "a", m.state_dict(), adapter_config(4, 8.0, ["q_proj", "v_proj"], 0.0, False))
    init = json.dumps(str(tmp_path / "a"))
    base = ["lora.rank=4", "lora.alpha=8.0", 'lora.targets=["q_proj", "v_proj"]', f"lora.init={init}"]
    check_sections(load_run_config("configs/tiny-sft.toml", base))  # the adapter the config describes: fine
    for bad, msg in [("lora.alpha=16.0", r"lora.alpha=16.0, but lora.init's adapter has lora_alpha 8.0"),
                     ("lora.rslora=true", r"lora.rslora=True, but lora.init's adapter has use_rslora False"),
                     ('lora.targets=["q_proj"]', r"lora.targets=\['q_proj'\], but lora.init's adapter has "
                                                 r"target_modules \['q_proj', 'v_proj'\]")]:
        with pytest.raises(ConfigError, match=msg):
            check_sections(load_run_config("configs/tiny-sft.toml", base + [bad]))
    with pytest.raises(ConfigError, match=r"lora.init=.*GRPO's reference would be the base without this adapter"):
        check_stage(load_run_config("configs/tiny-grpo.toml", base), "grpo", world=1, files=False)
    # several ranks: rank 0 reads the adapter's tensors through the same checks (here: one is missing)
    from safetensors.torch import load_file, save_file

    f = tmp_path / "a" / "adapter_model.safetensors"
    t = load_file(f)
    save_file({k: v for k, v in t.items() if "layers.0.self_attn.v_proj" not in k}, f)
    lo = load_run_config("configs/tiny-sft.toml", base).lora
    fresh = psyche_from_hf(hf_model(cfg, seed=0), cfg)
    add_lora(fresh, 4, 8.0, ["q_proj", "v_proj"])
    with pytest.raises(LoRAError, match=r"adapter_model.safetensors: missing adapter tensor\(s\) "
                                        r"\['model.layers.0.self_attn.v_proj.lora_A.weight'"):
        _adapter_values(fresh, lo, seed=0)


def test_a_non_finite_adapter_to_start_from_is_refused_naming_lora_init(tmp_path, tiny_ckpt):
    """On one rank as on several, lora.init's tensors are checked for NaN and inf once the adapters are in the
    model, and the error names lora.init (not the base checkpoint) and the tensor."""
    from psyche.config import LoraSection
    from psyche.run import build_model_for_training
    from psyche.weights import CheckpointError, load_pretrained

    m, _ = load_pretrained(tiny_ckpt)
    add_lora(m, 2, 4.0, ["q_proj"])
    with torch.no_grad():
        m.model.layers[1].self_attn.q_proj.lora_B.weight[0, 0] = float("inf")
    save_adapter(tmp_path / "a", m.state_dict(), adapter_config(2, 4.0, ["q_proj"], 0.0, False))
    lora = LoraSection(rank=2, alpha=4.0, targets=["q_proj"], init=str(tmp_path / "a"))
    with pytest.raises(CheckpointError) as e:
        build_model_for_training(tiny_ckpt, torch.device("cpu"), lora=lora)
    assert str(e.value) == (f"lora.init = {tmp_path / 'a'}: adapter tensor 'model.layers.1.self_attn.q_proj.lora_B."
                            "weight' holds NaN or inf: the adapter is broken (a run that diverged?); nothing was written")
    # the check that both paths share: a base tensor's NaN names the base checkpoint, even with lora.init set
    from psyche.run import check_finite_weights

    with torch.no_grad():
        m.model.layers[1].self_attn.q_proj.lora_B.weight.zero_()
        m.model.norm.weight[0] = float("nan")
    with pytest.raises(CheckpointError, match=rf"^{tiny_ckpt}: tensor 'model.norm.weight' holds NaN or inf"):
        check_finite_weights(m, tiny_ckpt, str(tmp_path / "a"))
