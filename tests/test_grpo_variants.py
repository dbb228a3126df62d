"""The GRPO variants: policy losses (cispo, gmpo, sapo, clip_cov, kl_cov), advantage estimators (reinforce_pp,
reinforce_pp_baseline, opo, grpo_passk) and rollout correction (tis, seq_tis, mis, seq_mis). Each equals verl
0.9.1 on random tensors (skipped without verl: it is a test-only reference, `pip install --no-deps verl==0.9.1`
and what .ci/run installs beside it), has hand-computed edge cases, gives the same gradient whatever the
micro-batching and of the number of ranks (1 vs 2, torchrun), and runs the tiny GRPO job logging its keys."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from psyche.grpo import (LossConfig, RolloutBatch, compute_advantages, micro_loss, rollout_correction,
                         select_cov_tokens)
from psyche.grpo.advantages import token_whiten
from psyche.grpo.loss import (POLICY_LOSSES, cispo_loss, clip_cov_loss, cov_select, gmpo_loss, kl_cov_loss,
                              policy_loss, sapo_loss, token_covariance)

ROOT = Path(__file__).resolve().parents[1]
NEW_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline", "opo", "grpo_passk")
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}


def _verl():
    try:
        import verl.trainer.ppo.core_algos as ca
        import verl.trainer.ppo.rollout_corr_helper as rch
        from verl.trainer.config import AlgoConfig
        from verl.workers.config import ActorConfig, PolicyLossConfig
    except Exception as e:  # noqa: BLE001 (any import failure of the optional reference)
        pytest.skip(f"verl 0.9.1 (test-only reference) not importable: {type(e).__name__}: {e}")
    return ca, rch, AlgoConfig, ActorConfig, PolicyLossConfig


def _actor(ActorConfig, PolicyLossConfig, mode, **kw):
    pl = {k: kw.pop(k) for k in list(kw) if k in ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio",
                                                  "ppo_kl_coef")}
    return ActorConfig(strategy="fsdp", rollout_n=4, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4,
                       use_dynamic_bsz=False, policy_loss=PolicyLossConfig(loss_mode=mode, **pl), **kw)


def _tensors(dtype, B=6, T=9, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    return logp, old, adv, mask


# ---- parity with verl ----

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_weights", [False, True])
def test_policy_losses_equal_verl(dtype, with_weights):
    ca, _, _, ActorConfig, PolicyLossConfig = _verl()
    logp, old, adv, mask = _tensors(dtype)
    A2 = adv[:, None].expand_as(logp) * mask
    m = mask.to(dtype)
    w = (torch.rand(logp.shape, generator=torch.Generator().manual_seed(3), dtype=dtype) + 0.5) * m \
        if with_weights else None
    clip = dict(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28)
    mine_clip = dict(clip_low=0.15, clip_high=0.28)
    cases = {
        "cispo": (lambda agg: cispo_loss(logp, old, adv, mask, agg=agg, weights=w, **mine_clip),
                  _actor(ActorConfig, PolicyLossConfig, "cispo", **clip)),
        "geo_mean": (lambda agg: gmpo_loss(logp, old, adv, mask, weights=w, **mine_clip),
                     _actor(ActorConfig, PolicyLossConfig, "geo_mean", **clip)),
        "sapo": (lambda agg: sapo_loss(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean",
                                       weights=w),
                 _actor(ActorConfig, PolicyLossConfig, "sapo", tau_pos=1.0, tau_neg=1.05, **clip)),
    }
    for name, (mine, cfg) in cases.items():
        for agg in ("token-mean", "seq-mean-token-mean"):
            ref, _ = ca.get_policy_loss_fn(name)(old, logp, A2, m, loss_agg_mode=agg, config=cfg,
                                                 rollout_is_weights=w)
            got, stats = mine(agg)
            assert torch.allclose(got, ref, atol=TOL[dtype], rtol=TOL[dtype]), (name, agg, got, ref)
            assert all(v.dim() == 0 for v in stats.values())  # statistics stay 0-d tensors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ppo_equals_verl_where_the_log_ratio_is_beyond_its_clamp(dtype):
    """Tokens whose log-ratio is past ±20 (a stale or mismatched old policy): the loss and its gradient equal
    verl's vanilla PPO, which clamps the log-ratio before exp (no inf in fp32, no gradient past the bound)."""
    ca, _, _, ActorConfig, PolicyLossConfig = _verl()
    logp, old, adv, mask = _tensors(dtype)
    logp = logp.clone()
    logp[0, 0], logp[1, 1], logp[2, 0] = old[0, 0] + 25, old[1, 1] - 30, old[2, 0] + 100  # fp32: exp(100) = inf
    adv = adv.clone()
    adv[:3] = torch.tensor([-1.0, 1.0, -0.5], dtype=dtype)
    m = mask.to(dtype)
    cfg = _actor(ActorConfig, PolicyLossConfig, "vanilla", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2,
                 clip_ratio_c=1e12)  # verl's dual clip is always on: here so loose that it never binds
    mine, g_mine = _grad(lambda lp: policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=1e12)[0],
                         logp)
    ref, g_ref = _grad(lambda lp: ca.get_policy_loss_fn("vanilla")(old, lp, adv[:, None].expand_as(lp) * m, m,
                                                                     loss_agg_mode="token-mean", config=cfg)[0], logp)
    assert torch.isfinite(mine) and torch.allclose(mine, ref, rtol=TOL[dtype], atol=TOL[dtype]), (mine, ref)
    assert torch.allclose(g_mine, g_ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert g_mine[0, 0] == 0 and g_mine[2, 0] == 0  # past the bound: no gradient


def _weighted_case(dtype, mode, seed=0):
    """8 rows x 12 tokens in groups of 4: current = old + 0.3·randn, sampler = old + 0.3·randn, and the
    rollout-correction weights of `mode` (token TIS at 1.2 or token MIS in [0.8, 1.2]) with some tokens cut."""
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 12
    lengths = torch.randint(4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    sampler = old + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = compute_advantages(torch.rand(B, generator=g, dtype=dtype), 4)
    w, st = rollout_correction(old, sampler, mask, mode, threshold=1.2, low=0.8)
    assert float(st["rc/truncated_frac"] + st["rc/masked_frac"]) > 0  # the weights bite
    return logp, old, adv, mask, w


def _grad(fn, logp):
    lp = logp.clone().requires_grad_(True)
    loss = fn(lp)
    loss.backward()
    return loss.detach(), lp.grad


@pytest.mark.parametrize("mode", ["tis", "mis"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gspo_with_token_weights_has_verls_gradient(mode, agg, dtype):
    """GSPO (ratio_level = sequence) under a per-token rollout correction: the loss and its gradient with
    respect to the current log-probs equal verl's GSPO-token form, and a token masked IS set to 0 gets none."""
    ca, _, _, ActorConfig, PolicyLossConfig = _verl()
    logp, old, adv, mask, w = _weighted_case(dtype, mode)
    m = mask.to(dtype)
    cfg = _actor(ActorConfig, PolicyLossConfig, "gspo", clip_ratio=0.05, clip_ratio_low=0.05, clip_ratio_high=0.08)
    A2 = adv[:, None].expand_as(logp) * m
    ref, ref_g = _grad(lambda lp: ca.get_policy_loss_fn("gspo")(old, lp, A2, m, loss_agg_mode=agg, config=cfg,
                                                                  rollout_is_weights=w)[0], logp)
    got, got_g = _grad(lambda lp: policy_loss(lp, old, adv, mask, clip_low=0.05, clip_high=0.08,
                                              ratio_level="sequence", agg=agg, weights=w)[0], logp)
    assert torch.allclose(got, ref, atol=TOL[dtype], rtol=TOL[dtype]), (got, ref)
    assert torch.allclose(got_g, ref_g, atol=TOL[dtype], rtol=TOL[dtype]), float((got_g - ref_g).abs().max())
    cut = mask & (w == 0)
    assert torch.equal(got_g[cut], torch.zeros_like(got_g[cut])) and got_g[mask & (w > 0)].abs().sum() > 0
    if mode == "mis":
        assert cut.any()
    # without weights, GSPO-token and the broadcast sequence ratio have the same gradient
    plain, plain_g = _grad(lambda lp: policy_loss(lp, old, adv, mask, clip_low=0.05, clip_high=0.08,
                                                  ratio_level="sequence", agg=agg)[0], logp)

    def broadcast(lp):
        s = (((lp - old) * m).sum(-1) / m.sum(-1)).exp()[:, None].expand_as(lp)
        tok = torch.maximum(-adv[:, None] * s, -adv[:, None] * s.clamp(0.95, 1.08))
        return (tok * m).sum() / m.sum() if agg == "token-mean" else ((tok * m).sum(-1) / m.sum(-1)).mean()
    by_hand, by_hand_g = _grad(broadcast, logp)
    assert torch.allclose(plain, by_hand, atol=TOL[dtype]) and torch.allclose(plain_g, by_hand_g, atol=TOL[dtype])


@pytest.mark.parametrize("mode", ["tis", "mis"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gmpo_with_token_weights_keeps_each_tokens_weight_in_its_gradient(mode, dtype):
    """GMPO's value with per-token weights is verl's (the row scaled by its weights' geometric mean w_i); its
    gradient at token t is verl's times w_t / w_i: each token learns by its own weight, a masked one not at all."""
    ca, _, _, ActorConfig, PolicyLossConfig = _verl()
    logp, old, adv, mask, w = _weighted_case(dtype, mode, seed=1)
    m = mask.to(dtype)
    cfg = _actor(ActorConfig, PolicyLossConfig, "geo_mean", clip_ratio=0.4, clip_ratio_low=0.4, clip_ratio_high=0.4)
    A2 = adv[:, None].expand_as(logp) * m
    ref, ref_g = _grad(lambda lp: ca.get_policy_loss_fn("geo_mean")(old, lp, A2, m, loss_agg_mode="token-mean",
                                                                      config=cfg, rollout_is_weights=w)[0], logp)
    got, got_g = _grad(lambda lp: gmpo_loss(lp, old, adv, mask, clip_low=0.4, clip_high=0.4, weights=w)[0], logp)
    assert torch.allclose(got, ref, atol=TOL[dtype], rtol=TOL[dtype]), (got, ref)
    w_seq = torch.exp((torch.log(w + 1e-10) * m).sum(-1) / (m.sum(-1) + 1e-8))
    want = ref_g * w / w_seq[:, None] * m
    assert torch.allclose(got_g, want, atol=TOL[dtype], rtol=TOL[dtype]), float((got_g - want).abs().max())
    assert torch.equal(got_g[mask & (w == 0)], torch.zeros_like(got_g[mask & (w == 0)]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clip_cov_and_kl_cov_equal_verl_on_the_same_tokens(dtype):
    """verl chooses the tokens from the micro-batch's current log-probs; given the same log-probs (and the same
    random draw for Clip-Cov) psyche's cov_select chooses the same tokens and the losses agree."""
    ca, _, _, ActorConfig, PolicyLossConfig = _verl()
    logp, old, adv, mask = _tensors(dtype, B=8, T=12, seed=1, spread=0.4)
    A2 = adv[:, None].expand_as(logp) * mask
    m = mask.to(dtype)
    cov = token_covariance(adv, logp.detach(), mask)
    ratio = torch.exp(logp - old)
    by_clip = (-A2 * torch.clamp(ratio, 0.8, 1.2) > -A2 * ratio) & mask  # tokens the PPO clip already cuts
    cfg = _actor(ActorConfig, PolicyLossConfig, "clip_cov", clip_ratio=0.2, clip_cov_ratio=0.1, clip_cov_lb=0.05,
                 clip_cov_ub=5.0)
    torch.manual_seed(7)
    ref, _ = ca.get_policy_loss_fn("clip_cov")(old, logp, A2, m, loss_agg_mode="token-mean", config=cfg)
    sel = cov_select("clip_cov", cov.to(dtype), mask, ratio=0.1, lb=0.05, ub=5.0, excluded=by_clip,
                     generator=torch.Generator().manual_seed(7))
    assert 0 < int(sel.sum()) <= max(int(0.1 * int(mask.sum())), 1)
    got, stats = clip_cov_loss(logp, old, adv, mask, sel, clip_low=0.2, clip_high=0.2)
    assert torch.allclose(got, ref, atol=TOL[dtype], rtol=TOL[dtype]), (got, ref)

    cfg = _actor(ActorConfig, PolicyLossConfig, "kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=0.3)
    ref, _ = ca.get_policy_loss_fn("kl_cov")(old, logp, A2, m, loss_agg_mode="token-mean", config=cfg)
    sel = cov_select("kl_cov", cov, mask, ratio=0.1)
    assert int(sel.sum()) == max(1, int(int(mask.sum()) * 0.1))
    got, _ = kl_cov_loss(logp, old, adv, mask, sel, coef=0.3)
    assert torch.allclose(got, ref, atol=TOL[dtype], rtol=TOL[dtype]), (got, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_advantage_estimators_equal_verl(dtype):
    ca, _, AlgoConfig, _, _ = _verl()
    G, P, L = 4, 5, 7
    g = torch.Generator().manual_seed(2)
    rewards = torch.rand(P * G, generator=g, dtype=dtype) * 2 - 0.5  # continuous: no ties for pass@k
    lengths = torch.randint(1, L + 1, (P * G,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).to(dtype)
    tok = torch.zeros(P * G, L, dtype=dtype)
    tok[torch.arange(P * G), lengths - 1] = rewards  # the outcome reward on the last token
    index = np.repeat(np.arange(P), G)
    verl_name = {"reinforce_pp": "reinforce_plus_plus", "reinforce_pp_baseline": "reinforce_plus_plus_baseline",
                 "opo": "opo", "grpo_passk": "grpo_passk"}
    for est in NEW_ESTIMATORS:
        ref, _ = ca.get_adv_estimator_fn(verl_name[est])(token_level_rewards=tok.clone(), response_mask=mask,
                                                          index=index, config=AlgoConfig(gamma=1.0))
        got = compute_advantages(rewards, G, estimator=est, lengths=lengths)
        want = ref[torch.arange(P * G), lengths - 1]  # constant over each row's tokens
        assert torch.allclose(ref * mask, want[:, None] * mask, atol=TOL[dtype])
        assert torch.allclose(got, want, atol=TOL[dtype], rtol=TOL[dtype]), (est, got, want)


@pytest.mark.parametrize("mode,level,spec", [("tis", "token", 1.3), ("seq_tis", "sequence", 1.5),
                                             ("mis", "token", "0.8_1.25"), ("seq_mis", "sequence", "0.5_2.0")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rollout_correction_weights_equal_verl(mode, level, spec, dtype):
    _, rch, _, _, _ = _verl()
    trainer, sampler, _, mask = _tensors(dtype, B=8, T=10, seed=4, spread=0.25)
    m = mask.to(dtype)
    ref, _ = rch.compute_rollout_correction_weights((trainer - sampler) * m, m, rollout_is=level,
                                                    rollout_is_threshold=spec)
    hi, lo = (float(spec), 0.5) if not isinstance(spec, str) else (float(spec.split("_")[1]), float(spec.split("_")[0]))
    w, stats = rollout_correction(trainer, sampler, mask, mode, threshold=hi, low=lo)
    assert w.dtype == dtype and torch.allclose(w, ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert 0 < float(stats["rc/truncated_frac"] + stats["rc/masked_frac"]) < 1  # the thresholds bite here


# ---- hand-computed edge cases ----

def test_all_equal_groups_give_zero_advantages_and_whitening_is_by_tokens():
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    L = torch.tensor([3, 1, 2, 2, 5, 1, 1, 1])
    for est in ("reinforce_pp_baseline", "opo", "grpo_passk"):
        assert torch.equal(compute_advantages(r, 4, estimator=est, lengths=L), torch.zeros(8))
    # reinforce_pp: no group baseline. Tokens: 8 of reward 1, 8 of reward 0 -> mean 1/2, var 16/15 * 1/4
    a = compute_advantages(r, 4, estimator="reinforce_pp", lengths=L)
    sd = (16 / 15 * 0.25 + 1e-8) ** 0.5
    assert torch.allclose(a, torch.where(r > 0, 0.5 / sd, -0.5 / sd))
    # opo's baseline weights rewards by length: group (1, 0, 0, 0) with lengths (1, 3, 0+1, 1+1)
    a = compute_advantages(torch.tensor([1.0, 0, 0, 0]), 4, estimator="opo", lengths=torch.tensor([1, 3, 1, 2]))
    assert torch.allclose(a, torch.tensor([1.0, 0, 0, 0]) - 1 / 7)
    # pass@k: only the best learns, by its margin over the second best (over the group's std)
    a = compute_advantages(torch.tensor([0.0, 3.0, 1.0, 1.0]), 4, estimator="grpo_passk", eps=0.0)
    assert torch.allclose(a, torch.tensor([0.0, 2.0 / torch.tensor([0.0, 3.0, 1.0, 1.0]).std(), 0.0, 0.0]))
    assert torch.allclose(token_whiten(torch.tensor([2.0, 2.0]), torch.tensor([1, 1])), torch.zeros(2))
    # eps = 0 (accepted by validation): an all-equal group, or a whole all-equal batch, gives 0, never NaN
    for est in ("grpo", "batch_std", "grpo_passk"):
        for rewards in (r, torch.ones(8)):
            a = compute_advantages(rewards, 4, estimator=est, eps=0.0)
            assert torch.isfinite(a).all() and (a[4:] == 0).all(), (est, a)


def test_batch_std_uses_the_whole_batch_over_ranks():
    """batch_std's std is the global batch's: two ranks with half the groups each, summing through `reduce`,
    give the one-rank advantages (as verl computes them on the whole batch)."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.2], dtype=torch.float64)
    one = compute_advantages(r, 4, estimator="batch_std")
    halves, mean = [r[:4], r[4:]], r.mean()
    # what the other rank adds at each of batch_std's two sums: (count, Σr), then Σ(r − global mean)²
    theirs = {k: iter([[4, halves[1 - k].sum()], [((halves[1 - k] - mean) ** 2).sum()]]) for k in (0, 1)}

    def reduce_for(rank):  # sums each entry over both ranks, as psyche.dist.sum_over_ranks does
        return lambda xs: [float(a) + float(b) for a, b in zip(xs, next(theirs[rank]))]

    two = torch.cat([compute_advantages(halves[k], 4, estimator="batch_std", reduce=reduce_for(k)) for k in (0, 1)])
    assert torch.allclose(one, two, rtol=1e-12, atol=0)


def test_ratios_at_the_clip_bounds_and_an_empty_mask():
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.zeros(1, 2, dtype=torch.float64)
    for sign in (1.0, -1.0):  # ρ exactly at 1 + clip_high / 1 − clip_low: CISPO keeps the gradient, weight ρ
        for rho in (1.2, 0.8):
            lp = torch.full((1, 2), float(np.log(rho)), dtype=torch.float64, requires_grad=True)
            loss, st = cispo_loss(lp, old, torch.tensor([sign], dtype=torch.float64), mask)
            loss.backward()
            assert torch.allclose(lp.grad, torch.full((1, 2), -sign * rho / 2, dtype=torch.float64))
            assert float(st["clip_frac_high"]) == 0 and float(st["clip_frac_low"]) == 0  # at, not beyond
    # GMPO clips the log-ratio on the side the advantage pushes: beyond +clip_high for A > 0 no gradient
    lp = torch.full((1, 2), 0.5, dtype=torch.float64, requires_grad=True)
    loss, st = gmpo_loss(lp, old, torch.tensor([1.0], dtype=torch.float64), mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(1, 2, dtype=torch.float64)) and float(st["clip_frac_high"]) == 1
    assert torch.allclose(loss, -torch.exp(torch.tensor(0.2, dtype=torch.float64)))
    # SAPO's gate at ρ = 1 is σ(0)·4/τ = 2/τ
    loss, _ = sapo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), mask, tau_pos=2.0)
    assert torch.allclose(loss, torch.tensor(-1.0))
    empty = torch.zeros(2, 3, dtype=torch.bool)
    lp, o, a = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2)
    for name, (loss, st) in {"ppo": policy_loss(lp, o, a, empty), "cispo": cispo_loss(lp, o, a, empty),
                             "gmpo": gmpo_loss(lp, o, a, empty), "sapo": sapo_loss(lp, o, a, empty),
                             "clip_cov": clip_cov_loss(lp, o, a, empty, empty),
                             "kl_cov": kl_cov_loss(lp, o, a, empty, empty)}.items():
        assert float(loss) == 0.0, name
        assert float(st["ratio_mean"]) == 1.0 and float(st["clip_frac_high"]) == 0.0, name
    assert not cov_select("clip_cov", torch.zeros(2, 3, dtype=torch.float64), empty, ratio=0.5).any()
    assert not cov_select("kl_cov", torch.zeros(2, 3, dtype=torch.float64), empty, ratio=0.5).any()


def test_identical_log_probs_give_weights_of_exactly_one_and_the_same_update():
    trainer, _, adv, mask = _tensors(torch.float32, seed=5)
    for mode in ("tis", "seq_tis", "mis", "seq_mis"):
        w, st = rollout_correction(trainer, trainer.clone(), mask, mode)
        assert torch.equal(w, mask.float()) and float(st["rc/masked_frac"]) == 0
    b = _batch(seed=5)
    b.sampler_logp = b.old_logp.clone()
    model = _model()
    grads = {}
    for mode in ("none", "tis", "mis"):
        model.zero_grad()
        loss, _, _ = micro_loss(model, b, LossConfig(rollout_correction=mode), float(b.mask.sum()), len(b.lengths))
        loss.backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for mode in ("tis", "mis"):
        assert all(torch.equal(x, y) for x, y in zip(grads["none"], grads[mode]))


def test_rollout_correction_moves_the_update_the_expected_way():
    """Tokens the sampler over-weighted (π_old/π_sampler < 1) count less, tokens outside the MIS band count
    nothing: the gradient equals the uncorrected one computed with those weights by hand."""
    b = _batch(seed=6)
    g = torch.Generator().manual_seed(1)
    b.sampler_logp = b.old_logp + 0.6 * torch.randn(b.mask.shape, generator=g) * b.mask
    model = _model()

    def grad(lc, weights=None):
        model.zero_grad()
        if weights is None:
            loss, _, _ = micro_loss(model, b, lc, float(b.mask.sum()), len(b.lengths))
        else:  # by hand: the uncorrected per-token loss times the weights
            lp, ent = model(b.input_ids, targets=b.targets, temperature=1.0)
            ratio = torch.exp((lp - b.old_logp) * b.mask)
            A = b.advantages[:, None]
            tok = torch.maximum(-A * ratio, -A * ratio.clamp(0.8, 1.2)) * weights
            loss = (tok * b.mask).sum() / b.mask.sum()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    plain = grad(LossConfig())
    for mode, lo, hi in (("tis", 0.5, 1.3), ("mis", 0.7, 1.3)):
        w, st = rollout_correction(b.old_logp, b.sampler_logp, b.mask, mode, threshold=hi, low=lo)
        assert float(st["rc/truncated_frac"] + st["rc/masked_frac"]) > 0
        corrected = grad(LossConfig(rollout_correction=mode, rc_threshold=hi, rc_low=lo))
        assert torch.allclose(corrected, grad(LossConfig(), weights=w), atol=1e-6)
        assert not torch.allclose(corrected, plain, atol=1e-6)


# ---- invariance: 1 vs 4 micro-batches ----

def _model():
    from helpers import tiny_config
    from psyche.model import build_model

    return build_model(tiny_config(vocab=40), seed=3)


def _batch(seed=0, N=8, T=14, P=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (N, T), generator=g)
    lengths = torch.randint(3, T - P, (N,), generator=g)
    mask = torch.zeros(N, T, dtype=torch.bool)
    for i, n in enumerate(lengths.tolist()):
        mask[i, P - 1:P - 1 + n] = True
    targets = torch.where(mask, torch.roll(ids, -1, 1), -1)
    with torch.no_grad():
        lp, _ = _model()(ids, targets=targets, temperature=1.0)
    old = (lp + 0.1 * torch.randn(N, T, generator=g)) * mask
    b = RolloutBatch(ids, targets, mask, old.clone(), lengths, torch.ones(N, dtype=torch.bool), 4,
                     rewards=torch.rand(N, generator=g), old_logp=old)
    b.advantages = torch.randn(N, generator=g)
    return b


@pytest.mark.parametrize("policy", [*POLICY_LOSSES, "gspo"])
def test_every_policy_loss_gives_the_same_gradient_for_1_or_4_micro_batches(policy):
    b = _batch(seed=8)
    level = "sequence" if policy == "gspo" else "token"
    policy = "ppo" if policy == "gspo" else policy
    lc = LossConfig(policy_loss=policy, agg="seq-mean-token-mean" if policy == "sapo" else "token-mean",
                    clip_cov_ratio=0.2, clip_cov_lb=0.0, kl_cov_ratio=0.2, rollout_correction="tis",
                    ratio_level=level)
    rows = list(range(8))
    if policy in ("clip_cov", "kl_cov"):
        select_cov_tokens(b, rows, lc, [policy], seed=11)
        assert b.cov_selected[policy].any()
    grads = []
    for micro in (8, 2):
        model = _model()
        for s in range(0, 8, micro):
            loss, _, _ = micro_loss(model, b.rows(rows[s:s + micro]), lc, float(b.mask.sum()), 8.0)
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5), policy


# ---- end to end ----

KEYS = {"cispo": {"clip_frac_high", "ratio_mean"}, "gmpo": {"clip_frac_high"}, "sapo": {"ratio_mean"},
        "clip_cov": {"cov_frac"}, "kl_cov": {"cov_frac"}}


@pytest.mark.slow  # 10 tiny GRPO runs (~8 s each)
def test_each_variant_runs_the_tiny_job_and_logs_its_keys(tmp_path):
    runs = [("grpo.policy_loss", v) for v in KEYS] + [("grpo.advantage", v) for v in NEW_ESTIMATORS] + \
        [("grpo.rollout_correction", "mis")]
    for key, value in runs:
        out = tmp_path / f"{key}={value}"
        sets = [f"{key}={value}", "grpo.steps=2", "log.progress=false", "checkpoint.export=false"]
        if key == "grpo.rollout_correction":
            sets += ["grpo.sampler_dtype=bfloat16", "grpo.rc_low=0.999", "grpo.rc_threshold=1.001"]
        r = subprocess.run([sys.executable, "train.py", "--stage", "grpo", "--config", "configs/tiny-grpo.toml",
                            "--out", str(out), *[a for s in sets for a in ("--set", s)]], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (key, value, r.stderr[-2000:])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        want = KEYS.get(value, set()) | ({"rc/weight_mean", "rc/masked_frac", "rc/seq_masked_frac"}
                                         if key == "grpo.rollout_correction" else set())
        assert want <= set(rows[-1]), (value, want - set(rows[-1]))
        if key == "grpo.rollout_correction":  # a bf16 sampler against the fp32 trainer: a real gap, and the
            assert rows[-1]["logprob_gap"] > 1e-5  # narrow band masks some of it
            assert rows[-1]["rc/masked_frac"] > 0


# ---- invariance: 1 vs 2 ranks ----

RANK_CASES = [dict(policy_loss=p, clip_cov_ratio=0.2, clip_cov_lb=0.0, kl_cov_ratio=0.2) for p in POLICY_LOSSES] + \
    [dict(advantage=a) for a in NEW_ESTIMATORS] + [dict(rollout_correction=m, rc_threshold=1.1, rc_low=0.9)
                                                   for m in ("tis", "seq_tis", "mis", "seq_mis")] + \
    [dict(ratio_level="sequence", rollout_correction="mis", rc_threshold=1.1, rc_low=0.9)]  # GSPO, token weights


def rank_gradient(case, rows):
    """The gradient of the GRPO loss over an 8-row global batch (2 prompts x 4), this process holding `rows`,
    summed over ranks: advantages, token selections and loss normalisers all come from the global batch."""
    from psyche import dist
    from psyche.grpo import selecting_losses

    b = _batch(seed=9)
    b.sampler_logp = b.old_logp + 0.1 * torch.randn(b.mask.shape, generator=torch.Generator().manual_seed(2)) * b.mask
    sub = b.rows(rows)
    case = dict(case)
    est = case.pop("advantage", "grpo")
    lc = LossConfig(**case)
    sub.advantages = compute_advantages(sub.rewards, 4, estimator=est, lengths=sub.lengths,
                                        reduce=dist.sum_over_ranks)
    local = list(range(len(rows)))
    if lc.policy_loss in selecting_losses():
        select_cov_tokens(sub, local, lc, [lc.policy_loss], seed=5)
    model = _model()
    n_tok, n_seq = dist.sum_over_ranks(sub.mask.sum()), dist.sum_over_ranks(len(rows))
    for s in range(0, len(local), 2):
        loss, _, _ = micro_loss(model, sub.rows(local[s:s + 2]), lc, n_tok, n_seq)
        loss.backward()
    return dist.all_reduce_sum(torch.cat([p.grad.flatten() for p in model.parameters()]))


RANKS_SCRIPT = r'''
import sys
import torch
sys.path.insert(0, sys.argv[1])
from psyche import dist
from test_grpo_variants import RANK_CASES, rank_gradient

rank, world, _ = dist.init_distributed()
two = [rank_gradient(c, list(range(4 * rank, 4 * rank + 4))) for c in RANK_CASES]  # rank r: prompt r's group
if rank == 0:
    torch.save(two, sys.argv[2])
dist.barrier()
dist.cleanup()
'''


@pytest.mark.dist
def test_every_variant_gives_the_same_gradient_on_1_or_2_ranks(tmp_path):
    import os

    script, out = tmp_path / "ranks.py", tmp_path / "two.pt"
    script.write_text(RANKS_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(Path(__file__).parent), str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    assert len(two) == len(RANK_CASES) == 15
    for case, g2 in zip(RANK_CASES, two):  # the same batch held whole by this one process
        g1 = rank_gradient(case, list(range(8)))
        assert torch.allclose(g1, g2, atol=1e-6, rtol=1e-5), (case, float((g1 - g2).abs().max()))


def test_rollout_correction_statistics_do_not_depend_on_micro_batching():
    """The update's rc/* statistics over 3 uneven micro-batches equal those of one: the largest weight is the
    maximum (not a mean of maxima), the sequence fractions are over sequences (not weighted by tokens)."""
    import copy

    from psyche.grpo import UpdatePlan, update_policy

    b = _batch(seed=7)
    g = torch.Generator().manual_seed(2)
    b.sampler_logp = b.old_logp + 0.8 * torch.randn(b.mask.shape, generator=g) * b.mask
    b.advantages = compute_advantages(b.rewards, 4)
    lc = LossConfig(rollout_correction="seq_tis", rc_threshold=1.5)
    stats = []
    for micro in (8, 3):
        m = _model()
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        stats.append(update_policy(m, opt, copy.deepcopy(b), lc, UpdatePlan(8, micro)))
    one, three = stats
    assert 0 < one["rc/seq_truncated_frac"] < 1  # some sequences truncated, not all
    for k in ("rc/weight_max", "rc/seq_truncated_frac", "rc/seq_masked_frac", "rc/weight_mean"):
        assert three[k] == pytest.approx(one[k], rel=1e-12, abs=1e-15), (k, one[k], three[k])
