"""Per-step GRPO diagnostics: counterfactual losses = policy_loss per mode, the gradient split sums to the total
gradient, diagnostics leave the update unchanged, KL estimators against the exact KL, entropy buckets, pass
rates."""

import copy
import json

import pytest
import torch

from helpers import tiny_config
from psyche.grpo.diagnostics import (StepDiagnostics, completion_positions, kl_check, part_gradients, pass_counts,
                                position_buckets, read_pass_rates, record_pass_rates, split_parts)
from psyche.grpo import (AGGS, LossConfig, UpdatePlan, build_batch, completion_kl, kl_estimate, micro_loss, policy_loss,
                         sequence_logprobs, update_policy)
from psyche.model import build_model
from psyche.sampler import generate

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(vocab=40), seed=1)


@pytest.fixture(scope="module")
def batch(model):
    """12 rows of uneven lengths; old log-probs off by noise (ratios ≠ 1, some clipped); a reference model;
    advantages of every sign (the middle group's rewards are all equal)."""
    r = generate(model, PROMPTS, n=4, max_new_tokens=10, temperature=1.3, stop_token_ids=[1, 2, 3, 4], seed=0,
                 pad_id=0)
    b = build_batch(PROMPTS, r, 0)
    g = torch.Generator().manual_seed(0)
    b.rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 0])
    b.advantages = torch.tensor([1.0, -1, -1, 1, 0, 0, 0, 0, -0.5, -0.5, 1.5, -0.5])
    with torch.no_grad():
        lp = sequence_logprobs(model, b, 1.3)[0]
        b.old_logp = lp + 0.3 * torch.randn(lp.shape, generator=g) * b.mask
        b.ref_logp = sequence_logprobs(build_model(tiny_config(vocab=40), seed=7), b, 1.3)[0]
    assert b.lengths.unique().numel() > 1
    return b


def _lc(agg="token-mean", **kw):
    return LossConfig(temperature=1.3, agg=agg, kl_coef=0.1, entropy_coef=0.01, norm_length=10, clip_low=0.1,
                      clip_high=0.2, **kw)


@pytest.mark.parametrize("chosen", ["token-mean", "seq-mean-token-sum-norm"])
def test_counterfactual_losses_equal_policy_loss_per_mode(model, batch, chosen):
    lc = _lc(chosen)
    N = batch.mask.shape[0]
    with torch.no_grad():
        lp, ent = sequence_logprobs(model, batch, lc.temperature)
    # one micro-batch holding the whole batch: the very same tensors, so exactly policy_loss's value
    d = StepDiagnostics(lc)
    d.observe(lp, ent, batch, float(batch.mask.sum()), N)
    one = d.result(1)
    want = {}
    for mode in AGGS:
        pg, st = policy_loss(lp, batch.old_logp, batch.advantages, batch.mask, clip_low=0.1, clip_high=0.2,
                             agg=mode, norm_length=10)
        want[mode] = float(pg)
        assert one[f"pg_loss/{mode}"] == want[mode], mode
    assert st["clip_frac_low"] + st["clip_frac_high"] > 0  # the clip is exercised
    assert len({round(v, 6) for v in want.values()}) == len(AGGS)  # the modes really differ on this batch
    # through the update, micro-batched (3 uneven micro-batches) with global counts: the same, up to rounding
    m = copy.deepcopy(model)
    d = StepDiagnostics(lc)
    upd = update_policy(m, torch.optim.SGD(m.parameters(), lr=0.0), batch, lc, UpdatePlan(N, 5), diag=d)
    for mode in AGGS:
        assert upd[f"pg_loss/{mode}"] == pytest.approx(want[mode], rel=1e-5, abs=1e-7), mode
    assert upd[f"pg_loss/{chosen}"] == upd["pg_loss"]  # the chosen mode is the logged loss, bit for bit
    assert upd[f"loss/{chosen}"] == upd["loss"]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gradient_split_sums_to_total_gradient(model, batch, agg):
    lc = _lc(agg)
    rows = list(range(batch.mask.shape[0]))
    n_tok, n_seq = float(batch.mask.sum()), float(len(rows))
    m = copy.deepcopy(model)
    params = [p for p in m.parameters() if p.requires_grad]
    for s in range(0, len(rows), 5):  # the total, accumulated exactly as update_policy does
        loss, *_ = micro_loss(m, batch.rows(rows[s:s + 5]), lc, n_tok, n_seq)
        loss.backward()
    total = torch.cat([p.grad.flatten() for p in params])
    parts = split_parts(lc, has_ref=True)
    assert parts == {"term": ["policy", "kl", "entropy"], "sign": ["adv_pos", "adv_neg", "adv_zero"]}
    for names in parts.values():
        vecs = {name: torch.cat([g.flatten() for g in grads]).clone()
                for name, grads in part_gradients(m, batch, rows, lc, names, micro_batch=5, n_tokens=n_tok,
                                                  n_seqs=n_seq)}
        assert all(v.abs().max() > 0 for v in vecs.values())  # every part carries gradient (adv_zero: KL, H)
        summed = torch.stack(list(vecs.values())).sum(0)
        assert (summed - total).abs().max() <= 1e-5 * max(1.0, float(total.abs().max()))
        assert float((summed - total).norm() / total.norm()) <= 1e-5


def test_diagnostics_leave_the_update_unchanged(model, batch):
    lc = _lc()
    N = batch.mask.shape[0]
    out = []
    for diag in (None, StepDiagnostics(lc, grad_split=True)):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        st = update_policy(m, opt, batch, lc, UpdatePlan(6, 4, epochs=2), diag=diag)
        out.append((st, [p.detach().clone() for p in m.parameters()]))
    (plain, p0), (diagd, p1) = out
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert {k: v for k, v in diagd.items() if k in plain} == plain
    assert diagd["grad_split_residual"] < 1e-5
    for k in ("grad_norm/policy", "grad_norm/kl", "grad_norm/entropy", "grad_norm/adv_pos", "grad_norm/adv_neg",
              "grad_norm/adv_zero"):
        assert diagd[k] > 0, k
    # the loss per mode is averaged over optimizer steps exactly like `loss`
    assert diagd["loss/token-mean"] == plain["loss"] and diagd["optimizer_steps"] == 4 == N // 6 * 2


def test_the_sign_split_adds_up_under_kl_cov(model, batch):
    """KL-Cov penalises its selected tokens whatever their advantage: rows at A = 0 learn, and the split by
    advantage sign includes them, so the parts still add up to the whole gradient."""
    b = copy.deepcopy(batch)
    b.advantages[:4] = 0
    lc = LossConfig(policy_loss="kl_cov", kl_cov_ratio=0.5, kl_cov_coef=1.0)
    m = copy.deepcopy(model)
    st = update_policy(m, torch.optim.AdamW(m.parameters(), lr=1e-2), b, lc, UpdatePlan(6, 4, epochs=2),
                       diag=StepDiagnostics(lc, grad_split=True))
    assert st["grad_norm/adv_zero"] > 0 and st["grad_split_residual"] < 1e-5, st


def test_split_parts_follow_the_config():
    assert split_parts(LossConfig(), has_ref=False) == {"term": [], "sign": ["adv_pos", "adv_neg"]}
    assert split_parts(LossConfig(kl_coef=0.1, kl_in_loss=False), has_ref=True)["term"] == []
    assert split_parts(LossConfig(kl_coef=0.1), has_ref=True) == \
        {"term": ["policy", "kl"], "sign": ["adv_pos", "adv_neg", "adv_zero"]}


def test_kl_check_against_estimators_and_exact_kl(model, batch):
    ref = build_model(tiny_config(vocab=40), seed=7)
    st = kl_check(model, ref, batch, 1.3, chunk=7)  # chunked over positions
    exact = completion_kl(model, ref, batch, 1.3)[0]
    assert st["kl_exact"] == pytest.approx(float(exact.mean()), rel=1e-5)
    by_row = completion_kl(model, ref, batch, 1.3, rows=1)  # one row per forward: the same positions, in order
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(by_row, completion_kl(model, ref, batch, 1.3)))
    with torch.no_grad():
        lp = sequence_logprobs(model, batch, 1.3)[0]
    for k in ("k1", "k2", "k3"):
        est = kl_estimate(lp[batch.mask], batch.ref_logp[batch.mask], k)
        assert st[f"kl_{k}"] == pytest.approx(float(est.mean()), rel=1e-4, abs=1e-6)
        assert st[f"kl_bias/{k}"] == pytest.approx(st[f"kl_{k}"] - st["kl_exact"], abs=1e-6)
        assert st[f"kl_abs_err/{k}"] >= abs(st[f"kl_bias/{k}"]) - 1e-7
    assert st["kl_exact"] > 0 and st["kl_k2"] >= 0 and st["kl_k3"] >= 0


def test_kl_estimators_unbiasedness_on_many_samples():
    """k1 and k3 average to the exact KL over samples of π; k2 does not (here: a fixed pair of distributions)."""
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(50, generator=g), -1)
    lq = torch.log_softmax(torch.randn(50, generator=g), -1)
    kl = float((lp.exp() * (lp - lq)).sum())
    y = torch.multinomial(lp.exp(), 200_000, replacement=True, generator=g)
    m = {k: float(kl_estimate(lp[y], lq[y], k).mean()) for k in ("k1", "k2", "k3")}
    assert m["k1"] == pytest.approx(kl, rel=0.03) and m["k3"] == pytest.approx(kl, rel=0.03)
    assert abs(m["k2"] - kl) > 0.05 * kl


def test_entropy_by_position_and_advantage_sign(model, batch):
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert completion_positions(mask).tolist() == [[-1, 0, 1, 2, -1], [0, 1, -1, -1, -1]]
    assert [n for n, *_ in position_buckets((0, 2, 8))] == ["pos_0-1", "pos_2-7", "pos_8+"]
    lc = _lc()
    with torch.no_grad():
        lp, ent = sequence_logprobs(model, batch, lc.temperature)
    d = StepDiagnostics(lc, pos_edges=(0, 2, 5))
    d.observe(lp, ent, batch, float(batch.mask.sum()), 12)
    r = d.result(1)
    e, m = ent[batch.mask], batch.mask
    pos = completion_positions(m)
    assert r["entropy/pos_0-1"] == pytest.approx(float(ent[m & (pos < 2)].mean()), rel=1e-6)
    assert r["entropy/pos_5+"] == pytest.approx(float(ent[m & (pos >= 5)].mean()), rel=1e-6)
    neg = m & (batch.advantages < 0)[:, None]
    assert r["entropy/adv_neg"] == pytest.approx(float(ent[neg].mean()), rel=1e-6)
    # the buckets partition the tokens: their token-weighted means give the overall mean
    n = {k: int((m & (pos >= lo) & (pos < hi)).sum()) for k, lo, hi in position_buckets((0, 2, 5))}
    overall = sum(r[f"entropy/{k}"] * c for k, c in n.items()) / sum(n.values())
    assert overall == pytest.approx(float(e.mean()), rel=1e-6)


def test_pass_rates_file(tmp_path, batch):
    b = copy.copy(batch)
    b.reward_parts = {"accuracy": torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0])}
    b.items = [{"id": "a"}] * 4 + [{"id": "b"}] * 4 + [{}] * 4
    b.prompt_ids = [10] * 4 + [11] * 4 + [12] * 4  # per row
    assert pass_counts(b) == {"a": [2, 4], "b": [4, 4], "#12": [0, 4]}
    record_pass_rates(tmp_path, 1, b)
    record_pass_rates(tmp_path, 2, b)
    record_pass_rates(tmp_path, 2, b)  # a resumed run redoing step 2: read back once
    rows = read_pass_rates(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["pass_rate"] == {"a": 0.5, "b": 1.0, "#12": 0.0}
    assert all(json.loads(line) for line in (tmp_path / "pass_rates.jsonl").read_text().splitlines())
    b.reward_parts = {"format": torch.zeros(12)}
    assert pass_counts(b) == {}


@pytest.mark.dist
@pytest.mark.slow
def test_diagnostics_and_replay_two_ranks_equal_one_rank(tmp_path, tiny_ckpt):
    """Under torchrun (2 ranks, FSDP2, gloo) the diagnostics are the global ones: equal to a 1-rank run of the same
    global batch; a 2-rank step dump replays in one process up to summation order."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from psyche.analysis import replay
    from psyche.metrics import read_metrics

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    root = Path(__file__).resolve().parents[1]
    sets = ["log.progress=false", "grpo.steps=2", "grpo.prompts_per_step=4", "grpo.mini_batch=2", "grpo.micro_batch=4",
            "grpo.max_new_tokens=8", "grpo.entropy_coef=0.01", "grpo.diagnostics=true", "grpo.grad_split=true",
            "grpo.replay_steps=[2]", "checkpoint.every=0", "checkpoint.export=false", f'model.init="{tiny_ckpt}"']
    args = ["train.py", "--stage", "grpo", "--config", str(root / "configs" / "tiny-grpo.toml"),
            *[a for s in sets for a in ("--set", s)]]
    for out, launcher in (("one", [sys.executable]), ("two", ["torchrun", "--nproc_per_node=2", "--master_port=29541"])):
        r = subprocess.run(launcher + args + ["--out", str(tmp_path / out)], cwd=root, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    keys = [k for k in one[0] if k.startswith(("loss/", "pg_loss/", "grad_norm/", "entropy/", "kl_"))]
    assert len(keys) > 20
    for a, b in zip(one, two):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
        assert b["grad_split_residual"] < 1e-5
    assert (tmp_path / "one" / "pass_rates.jsonl").read_text() == (tmp_path / "two" / "pass_rates.jsonl").read_text()
    rep = replay(tmp_path / "two" / "replay" / "step_0002")
    assert rep["world_size"] == 2 and rep["rows"] == 16
    assert rep["replayed"]["loss"] == pytest.approx(two[1]["loss"], rel=1e-5, abs=1e-7)
    assert rep["replayed"]["grad_norm"] == pytest.approx(two[1]["grad_norm"], rel=1e-4)
