"""Hand-computed cases for every advantage estimator, KL estimator, clip setting, ratio level, aggregation."""

import math

import pytest
import torch

from psyche.grpo.kl import exact_kl, kl_estimate
from psyche.grpo.loss import aggregate, compute_advantages, policy_loss, zero_std_groups


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


class TestAdvantages:
    r = t(1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5)  # two groups of 4; the second has zero std

    def test_grpo_ddof1(self):
        # group 1: mean 0.5, sample std sqrt(1/3) = 0.57735
        a = compute_advantages(self.r, 4, estimator="grpo", std_ddof=1, eps=0.0)
        s = math.sqrt(1 / 3)
        torch.testing.assert_close(a[:4], t(0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s))
        assert (a[4:] == 0).all()  # zero-std group with eps = 0: exactly 0, not NaN

    def test_grpo_ddof0_and_eps(self):
        a = compute_advantages(self.r, 4, estimator="grpo", std_ddof=0, eps=1e-6)
        torch.testing.assert_close(a[:4], t(1, -1, -1, 1) * 0.5 / (0.5 + 1e-6))
        assert (a[4:] == 0).all()  # zero-std group: 0 / (0 + eps)

    def test_dr_grpo(self):
        torch.testing.assert_close(compute_advantages(self.r, 4, estimator="dr_grpo"), t(.5, -.5, -.5, .5, 0, 0, 0, 0))

    def test_rloo(self):
        # r_0 = 1, others in the group 0, 0, 1: leave-one-out mean 1/3 -> 2/3
        a = compute_advantages(self.r, 4, estimator="rloo")
        torch.testing.assert_close(a[:4], t(2 / 3, -2 / 3, -2 / 3, 2 / 3))
        assert (a[4:] == 0).all()

    def test_batch_std(self):
        std = self.r.std(correction=1)
        a = compute_advantages(self.r, 4, estimator="batch_std", eps=0.0)
        torch.testing.assert_close(a, t(.5, -.5, -.5, .5, 0, 0, 0, 0) / std)

    def test_errors(self):
        with pytest.raises(ValueError, match="multiple of group_size"):
            compute_advantages(t(1, 2, 3), 2)
        with pytest.raises(ValueError, match="estimator"):
            compute_advantages(self.r, 4, estimator="ppo")
        with pytest.raises(ValueError, match="too small"):
            compute_advantages(t(1, 2), 1)

    def test_zero_std_groups(self):
        assert zero_std_groups(self.r, 4).tolist() == [False, True]


def test_kl_estimators_by_hand():
    lp, ref = t(-1.0, -2.0), t(-1.5, -1.0)  # d = ref - lp = -0.5, 1.0
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), t(0.5, -1.0))
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), t(0.125, 0.5))
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), t(math.exp(-0.5) + 0.5 - 1, math.exp(1) - 2))
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k4")


def test_kl_estimators_are_unbiased_or_not_as_stated():
    """Sampling from p: E[k1] = E[k3] = KL(p||q) exactly in expectation; k2 is biased."""
    p = torch.softmax(t(1.0, 0.2, -0.5, 0.0), 0)
    q = torch.softmax(t(0.3, 0.4, 0.0, -0.2), 0)
    kl = float((p * (p / q).log()).sum())
    lp, lq = p.log(), q.log()
    e = {k: float((p * kl_estimate(lp, lq, k)).sum()) for k in ("k1", "k2", "k3")}  # exact expectations
    assert abs(e["k1"] - kl) < 1e-12 and abs(e["k3"] - kl) < 1e-12 and abs(e["k2"] - kl) > 1e-6
    torch.testing.assert_close(exact_kl(torch.log(p)[None], torch.log(q)[None]), torch.tensor([kl]).float(),
                               atol=1e-6, rtol=0)


def test_aggregations_by_hand():
    v = t(1, 2, 3, 0, 10, 20, 0, 0).view(2, 4)
    m = t(1, 1, 1, 0, 1, 1, 0, 0).view(2, 4)
    assert float(aggregate(v, m, "token-mean")) == pytest.approx(36 / 5)
    assert float(aggregate(v, m, "seq-mean-token-mean")) == pytest.approx((2 + 15) / 2)
    assert float(aggregate(v, m, "seq-mean-token-sum")) == pytest.approx((6 + 30) / 2)
    assert float(aggregate(v, m, "seq-mean-token-sum-norm")) == pytest.approx(36 / (2 * 4))
    assert float(aggregate(v, m, "seq-mean-token-sum-norm", norm_length=10)) == pytest.approx(36 / 20)
    assert float(aggregate(v, m, "token-mean", n_tokens=10)) == pytest.approx(3.6)
    with pytest.raises(ValueError):
        aggregate(v, m, "sum")


class TestPolicyLoss:
    # one sequence of 4 tokens, ratios 0.5, 0.9, 1.1, 1.5
    lp = torch.log(t(0.5, 0.9, 1.1, 1.5))[None]
    old = torch.zeros(1, 4, dtype=torch.float64)
    m = torch.ones(1, 4, dtype=torch.float64)

    def test_positive_advantage_clips_high(self):
        loss, st = policy_loss(self.lp, self.old, t(2.0), self.m, clip_low=0.2, clip_high=0.2)
        # -A * min(ρ, clip(ρ)) for A > 0: ρ clipped to 1.2 at the top only: -2 * (0.5 + 0.9 + 1.1 + 1.2) / 4
        assert float(loss) == pytest.approx(-2 * 3.7 / 4)
        assert st["clip_frac_high"] == 0.25 and st["clip_frac_low"] == 0.0
        assert st["ratio_max"] == pytest.approx(1.5) and st["ratio_min"] == pytest.approx(0.5)
        assert st["ratio_mean"] == pytest.approx(1.0)

    def test_negative_advantage_clips_low(self):
        loss, st = policy_loss(self.lp, self.old, t(-1.0), self.m, clip_low=0.2, clip_high=0.2)
        # A < 0: max(ρ, clip(ρ)) * 1: 0.8 (clipped up from 0.5), 0.9, 1.1, 1.5
        assert float(loss) == pytest.approx((0.8 + 0.9 + 1.1 + 1.5) / 4)
        assert st["clip_frac_low"] == 0.25 and st["clip_frac_high"] == 0.0

    def test_asymmetric_dapo_clip(self):
        loss, st = policy_loss(self.lp, self.old, t(1.0), self.m, clip_low=0.2, clip_high=0.28)
        assert float(loss) == pytest.approx(-(0.5 + 0.9 + 1.1 + 1.28) / 4)

    def test_dual_clip(self):
        lp = torch.log(t(5.0, 1.0))[None]
        loss, st = policy_loss(lp, torch.zeros(1, 2, dtype=torch.float64), t(-1.0), torch.ones(1, 2),
                               dual_clip=3.0)
        # token 0: max(5, 1.2) * 1 = 5 > 3 -> bounded at 3; token 1: 1
        assert float(loss) == pytest.approx((3 + 1) / 2) and st["dual_clip_frac"] == 0.5
        loss_nodual, _ = policy_loss(lp, torch.zeros(1, 2, dtype=torch.float64), t(-1.0), torch.ones(1, 2))
        assert float(loss_nodual) == pytest.approx((5 + 1) / 2)

    def test_sequence_level_ratio(self):
        lp = t(math.log(2.0), 0.0, 0.0, 9.0).view(1, 4)
        m = t(1, 1, 0, 0).view(1, 4)  # masked tokens must not enter the sequence ratio
        loss, st = policy_loss(lp, torch.zeros(1, 4, dtype=torch.float64), t(1.0), m, ratio_level="sequence",
                               clip_high=10.0)
        s = math.exp(math.log(2.0) / 2)
        assert float(loss) == pytest.approx(-s) and st["ratio_max"] == pytest.approx(s)

    def test_ratio_one_gives_policy_gradient(self):
        """At ρ = 1 the gradient is −A ∇lp / n_tokens (the REINFORCE form)."""
        lp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
        m = t(1, 1, 0, 1, 0, 0).view(2, 3)
        loss, _ = policy_loss(lp, lp.detach(), t(1.0, -2.0), m)
        loss.backward()
        torch.testing.assert_close(lp.grad, t(-1, -1, 0, 2, 0, 0).view(2, 3) / 3)

    def test_microbatch_sums_equal_full_batch(self):
        g = torch.Generator().manual_seed(0)
        lp = torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.1
        old = lp + torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.1
        m = (torch.rand(6, 5, generator=g) > 0.3).double()
        A = torch.randn(6, generator=g, dtype=torch.float64)
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            full, _ = policy_loss(lp, old, A, m, agg=agg, norm_length=5)
            parts = sum(policy_loss(lp[i:i + 2], old[i:i + 2], A[i:i + 2], m[i:i + 2], agg=agg, norm_length=5,
                                    n_tokens=m.sum(), n_seqs=6)[0] for i in (0, 2, 4))
            torch.testing.assert_close(parts, full, msg=agg)
