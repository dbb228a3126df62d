"""Checkpoints: exact round trip of model/optimizer/scheduler/RNG/state, keep-last-K, partial writes never count,
HF export loadable by transformers and load_pretrained."""

import random

import pytest
import torch

from helpers import tiny_config
from psyche.checkpoint import (export_hf, latest_checkpoint, list_checkpoints, load_checkpoint, read_safetensors_dir,
                               save_checkpoint)
from psyche.config import OptimSection
from psyche.model import build_model
from psyche.run import build_optimizer, build_scheduler
from psyche.weights import load_pretrained


def _setup(seed):
    cfg = tiny_config(tied=True)
    model = build_model(cfg, seed=seed).train()
    opt = build_optimizer(model, OptimSection(lr=1e-2, weight_decay=0.1))
    sched, _ = build_scheduler(opt, OptimSection(warmup_steps=2), total_steps=10)
    return model, opt, sched


def _step(model, opt, sched, seed):
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    logp, _ = model(x[:, :-1], targets=x[:, 1:])
    loss = -logp.mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    return loss.item()


def test_round_trip_continues_bit_for_bit(tmp_path):
    model, opt, sched = _setup(0)
    for i in range(3):
        _step(model, opt, sched, i)
    extra = torch.nn.Linear(3, 2)
    torch.manual_seed(123)
    random.seed(7)
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, state={"step": 3, "x": [1.5]},
                           extra_models={"head": extra})
    after_save = (torch.rand(3).tolist(), random.random())
    ref = [_step(model, opt, sched, i) for i in range(3, 6)]

    model2, opt2, sched2 = _setup(1)  # different weights, fresh optimizer
    extra2 = torch.nn.Linear(3, 2)
    state = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, extra_models={"head": extra2})
    assert state == {"step": 3, "x": [1.5]}
    assert (torch.rand(3).tolist(), random.random()) == after_save  # RNG restored
    assert torch.equal(extra2.weight, extra.weight)
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == sched2.get_last_lr()[0] != 1e-2
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # still tied
    assert [_step(model2, opt2, sched2, i) for i in range(3, 6)] == ref  # exact, not approximate
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_is_an_hf_model_dir(tmp_path):
    model, opt, sched = _setup(0)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, state={})
    m, _ = load_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))
    assert set(read_safetensors_dir(path)) == set(model.state_dict()) - {"lm_head.weight"}  # tied: stored once


def test_keep_last_and_partial_writes_never_count(tmp_path, monkeypatch):
    model, opt, sched = _setup(0)
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, state={"step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]
    # a directory without meta.json (not written by save_checkpoint) and a temporary are not checkpoints
    (root / "step_00000009").mkdir()
    (root / ".step_00000010.tmp-x").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    # a write that fails half-way leaves no trace and the previous checkpoint intact
    monkeypatch.setenv("PSYCHE_FAULT", "ckpt_write@5:raise")
    with pytest.raises(RuntimeError, match="injected failure"):
        save_checkpoint(tmp_path, 5, model=model, optimizer=opt, scheduler=sched, state={"step": 5})
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert not (root / "step_00000005").exists()
    assert load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=opt, scheduler=sched) == {"step": 4}


def test_pruning_never_removes_the_checkpoint_just_written_nor_a_later_one(tmp_path):
    """Beside later steps' checkpoints (another run's), a new checkpoint is kept, and so are they: only earlier
    steps' are pruned."""
    model, opt, sched = _setup(0)
    for step in (50, 100):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, state={"step": step}, keep_last=2)
    save_checkpoint(tmp_path, 10, model=model, optimizer=opt, scheduler=sched, state={"step": 10}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000010", "step_00000050", "step_00000100"]
    save_checkpoint(tmp_path, 60, model=model, optimizer=opt, scheduler=sched, state={"step": 60}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000050", "step_00000060", "step_00000100"]


@pytest.mark.parametrize("tied", [True, False])
def test_export_hf_loads_in_transformers_and_psyche(tmp_path, tied):
    import transformers

    cfg = tiny_config(tied=tied)
    model = build_model(cfg, seed=2)
    out = export_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    x = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    m, _ = load_pretrained(out, dtype=torch.float32)
    assert next(iter(read_safetensors_dir(out).values())).dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, m(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(m(x), model(x), atol=0.1, rtol=0)  # bf16 rounding only
