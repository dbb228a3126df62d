"""Logit parity with transformers' Qwen2ForCausalLM, padding invariance, packing."""

import pytest
import torch

from helpers import hf_model, psyche_from_hf, tiny_config
from psyche.model import build_model

GQA = [(4, 4), (4, 2), (7, 1)]  # ratios 1, 2, 7 (7B has 28/4 = 7)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("n_head,n_kv", GQA)
def test_logits_match_transformers_fp32(tied, n_head, n_kv):
    cfg = tiny_config(tied=tied, n_head=n_head, n_kv=n_kv)
    hf = hf_model(cfg, seed=n_head + n_kv)
    m = psyche_from_hf(hf, cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).logits, atol=1e-4, rtol=0)


def test_logits_match_transformers_bf16():
    """bf16 rounds differently along the way (both compute norms in fp32, matmuls in bf16): the logits agree
    to a few bf16 ulps of their magnitude, stated as atol 3e-2 on logits of std ~1."""
    cfg = tiny_config(n_head=4, n_kv=2)
    hf = hf_model(cfg, dtype=torch.bfloat16)
    m = psyche_from_hf(hf, cfg, dtype=torch.bfloat16)
    x = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        a, b = m(x).float(), hf(x).logits.float()
    assert a.dtype == b.dtype
    torch.testing.assert_close(a, b, atol=3e-2, rtol=0)


@pytest.mark.parametrize("n_head,n_kv", GQA)
def test_padded_batches_equal_unpadded(n_head, n_kv):
    cfg = tiny_config(n_head=n_head, n_kv=n_kv)
    m = build_model(cfg, seed=3).eval()
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (9, 5, 12)]
    T = max(len(s) for s in seqs)
    with torch.no_grad():
        ref = [m(s[None])[0] for s in seqs]
        for side in ("left", "right"):
            ids = torch.zeros(len(seqs), T, dtype=torch.long)
            mask = torch.zeros(len(seqs), T, dtype=torch.long)
            for i, s in enumerate(seqs):
                sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
                ids[i, sl], mask[i, sl] = s, 1
            out = m(ids, attention_mask=mask)
            assert torch.isfinite(out).all(), "pad positions must stay finite (NaN * 0 is NaN in a loss)"
            for i, s in enumerate(seqs):
                sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
                torch.testing.assert_close(out[i, sl], ref[i], atol=1e-5, rtol=0, msg=f"{side} row {i}")


def test_packed_rows_equal_separate_runs():
    cfg = tiny_config()
    m = build_model(cfg, seed=4).eval()
    a, b, c = (torch.randint(0, cfg.vocab_size, (n,)) for n in (6, 4, 7))
    ids = torch.cat([a, b, c])[None]
    doc = torch.tensor([0] * 6 + [1] * 4 + [2] * 7)[None]
    with torch.no_grad():
        out = m(ids, doc_ids=doc)[0]
        torch.testing.assert_close(out[:6], m(a[None])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[6:10], m(b[None])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[10:], m(c[None])[0], atol=1e-5, rtol=0)


def test_param_count_matches_presets():
    from psyche.model_config import preset

    assert abs(preset("qwen2.5-7b").num_params() - 7.6156e9) < 1e6
    assert abs(preset("qwen2.5-0.5b").num_params() - 0.4940e9) < 1e6
    m = build_model(preset("tiny"))
    assert sum(p.numel() for p in m.parameters()) == preset("tiny").num_params()


def test_targets_give_logprobs_and_entropy_of_the_logits():
    cfg = tiny_config()
    m = build_model(cfg, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    targets = torch.full_like(ids, -1)
    targets[:, :-1] = ids[:, 1:]  # the logit at t predicts token t+1
    targets[0, :3] = -1  # e.g. prompt tokens carry no target
    lp, ent = m(ids, targets=targets, temperature=0.7)
    full = torch.log_softmax(m(ids).float() / 0.7, -1)
    sel = targets >= 0
    torch.testing.assert_close(lp[sel], full.gather(-1, targets.clamp(min=0)[..., None])[..., 0][sel])
    torch.testing.assert_close(ent[sel], -(full.exp() * full).sum(-1)[sel])
    assert (lp[~sel] == 0).all() and (ent[~sel] == 0).all()
    (lp.sum() + ent.sum()).backward()  # differentiable through both
    assert m.lm_head.weight.grad is not None and m.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_targets_path_runs_the_lm_head_in_the_autocast_dtype(monkeypatch):
    """Under autocast the fused log-prob path gets hidden states and lm_head weight in the autocast dtype, as the
    lm_head Linear of the logits path would (not fp32: on a GPU that would bypass the bf16 tensor cores), and its
    log-probs match the autocast logits path's."""
    from psyche import kernels

    seen = []
    real = kernels.token_logprobs

    def spy(h, w, y, temperature=1.0, uniform_grad=False):
        seen.append((h.dtype, w.dtype))
        return real(h, w, y, temperature, uniform_grad)

    monkeypatch.setattr(kernels, "token_logprobs", spy)
    cfg = tiny_config()
    m = build_model(cfg, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -1)], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = m(ids, targets=targets)
        logits = m(ids)
    assert seen == [(torch.bfloat16, torch.bfloat16)] and logits.dtype == torch.bfloat16
    ref = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    sel = targets >= 0
    torch.testing.assert_close(lp[sel], ref[sel], atol=2e-2, rtol=2e-2)
    m(ids, targets=targets)  # and without autocast: fp32 in
    assert seen[-1] == (torch.float32, torch.float32)
