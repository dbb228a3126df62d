"""GRPO step mechanics: alignment, masks, invariance, the classic GRPO bugs each test names, and a learning test."""

import copy

import pytest
import torch

from helpers import tiny_config
from psyche.grpo import (LossConfig, UpdatePlan, apply_truncation_mask, build_batch, compute_advantages,
                         completion_kl, micro_loss, sequence_logprobs, shape_rewards, update_policy)
from psyche.model import build_model
from psyche.sampler import generate

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
STOP = 3


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(vocab=40), seed=1)


def rollout_batch(model, temperature=1.0, n=4, seed=0, pad_id=0, max_new=12):
    r = generate(model, PROMPTS, n=n, max_new_tokens=max_new, temperature=temperature, stop_token_ids=[STOP],
                 seed=seed, pad_id=pad_id)
    return r, build_batch(PROMPTS, r, pad_id)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.6])
def test_recomputed_logprobs_match_sampler_at_same_temperature(model, temperature):
    """Logit t scores token t + 1 (an off-by-one here trains on the wrong tokens), and the trainer's
    temperature is the sampler's (else the ratio compares two different distributions)."""
    r, b = rollout_batch(model, temperature)
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, b, temperature)
    assert int(b.mask.sum()) == int(r.lengths.sum())
    torch.testing.assert_close(lp[b.mask], b.sampler_logp[b.mask], atol=1e-4, rtol=0)
    if temperature != 1.0:  # the same check at the wrong temperature fails: the test can see a temperature mismatch
        with torch.no_grad():
            lp1, _ = sequence_logprobs(model, b, 1.0)
        assert (lp1[b.mask] - b.sampler_logp[b.mask]).abs().max() > 1e-2


def test_sequences_hold_prompt_then_completion(model):
    r, b = rollout_batch(model)
    for i in range(len(r.lengths)):
        p = PROMPTS[int(r.prompt_index[i])]
        L = int(r.lengths[i])
        assert b.input_ids[i, : len(p)].tolist() == p
        assert b.input_ids[i, len(p): len(p) + L].tolist() == r.tokens[i, :L].tolist()
        assert b.targets[i, len(p) - 1: len(p) - 1 + L].tolist() == r.tokens[i, :L].tolist()


def test_stop_token_keeps_its_gradient_when_pad_equals_stop(model):
    """With pad == EOS (as in Qwen), `token != pad` would drop the EOS from the mask."""
    r, b = rollout_batch(model, temperature=1.5, pad_id=STOP, max_new=20, n=8)
    assert r.finished.any()
    for i in torch.nonzero(r.finished).flatten().tolist():
        L = int(r.lengths[i])
        p = len(PROMPTS[int(r.prompt_index[i])])
        assert b.mask[i, p - 1 + L - 1] and b.targets[i, p - 1 + L - 1] == STOP
    b.advantages = torch.ones(len(r.lengths))
    m = copy.deepcopy(model)
    loss, *_ = micro_loss(m, b, LossConfig(temperature=1.5), float(b.mask.sum()), len(r.lengths))
    loss.backward()
    stop_row = m.lm_head.weight.grad[STOP]
    assert stop_row.abs().sum() > 0


def test_zero_std_groups_give_zero_policy_gradient(model):
    """A group whose rewards are all equal has A = 0 and contributes exactly nothing."""
    r, b = rollout_batch(model, n=4)
    b.rewards = torch.tensor([1.0] * 4 + [0, 1, 0, 1] + [0.0] * 4)
    b.advantages = compute_advantages(b.rewards, 4)
    assert (b.advantages[:4] == 0).all() and (b.advantages[8:] == 0).all()
    grads = []
    for rows in ([0, 1, 2, 3, 8, 9, 10, 11], list(range(12))):
        m = copy.deepcopy(model)
        sub = b.rows(rows)
        loss, *_ = micro_loss(m, sub, LossConfig(), float(b.mask.sum()), 12)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None] or [torch.zeros(1)]))
    assert grads[0].abs().max() == 0  # only zero-std groups: exactly zero gradient
    assert grads[1].abs().max() > 0


def _grads_after(model, b, micro, lc, **kw):
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: keep the weights, read the gradient
    update_policy(m, opt, b, lc, UpdatePlan(len(b.lengths), micro, **kw))
    return torch.cat([p.grad.flatten() for p in m.parameters()])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_invariant_to_micro_batches(model, agg):
    """Normalising by the mini-batch's global counts makes 1 or 4 micro-batches identical."""
    r, b = rollout_batch(model, n=4)
    b.rewards = torch.rand(12, generator=torch.Generator().manual_seed(0))
    b.advantages = compute_advantages(b.rewards, 4)
    with torch.no_grad():
        b.ref_logp = sequence_logprobs(build_model(tiny_config(vocab=40), seed=9), b, 1.0)[0]
        b.old_logp = sequence_logprobs(model, b, 1.0)[0] + 0.05 * torch.randn(b.mask.shape) * b.mask
    lc = LossConfig(agg=agg, kl_coef=0.1, entropy_coef=0.01, norm_length=12)
    g1 = _grads_after(model, b, 12, lc, grad_clip=0)
    g4 = _grads_after(model, b, 3, lc, grad_clip=0)
    torch.testing.assert_close(g4, g1, atol=1e-5, rtol=0)


def test_kl_step_lowers_exact_kl(model):
    """A gradient step on the KL term alone must move the policy towards the reference."""
    ref = build_model(tiny_config(vocab=40), seed=4).eval()
    policy = copy.deepcopy(model)
    r, b = rollout_batch(policy, n=4)
    b.advantages = torch.zeros(12)  # no policy-gradient signal at all
    with torch.no_grad():
        b.ref_logp = sequence_logprobs(ref, b, 1.0)[0]
    before = completion_kl(policy, ref, b, 1.0)[0].mean()
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    for kind in ("k3",):
        update_policy(policy, opt, b, LossConfig(kl_coef=1.0, kl_kind=kind), UpdatePlan(12, 12))
    after = completion_kl(policy, ref, b, 1.0)[0].mean()
    assert after < before, (before, after)


def test_truncation_policies(model):
    r, b = rollout_batch(model, temperature=1.5, max_new=6, n=4)
    raw = torch.ones(12)
    trunc = ~b.finished
    assert trunc.any()
    assert (shape_rewards(raw, b, truncation="zero", max_new_tokens=6)[trunc] == 0).all()
    assert (shape_rewards(raw, b, truncation="keep", max_new_tokens=6) == 1).all()
    pen = shape_rewards(raw, b, truncation="penalty", max_new_tokens=6, overlong_buffer=4, overlong_penalty=0.5)
    assert (pen[trunc] == 0.5).all()
    c = copy.copy(b)
    apply_truncation_mask(c)
    assert not c.mask[trunc].any() and (c.mask[~trunc].sum(1) == b.mask[~trunc].sum(1)).all()


def test_grpo_learns_a_toy_task():
    """A tiny model learns to start its answer with token 7 from the reward alone (fixed seed, CPU)."""
    torch.manual_seed(0)
    m = build_model(tiny_config(vocab=24), seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    prompts = [[1, 2, 3], [4, 5], [6, 8, 9], [10]]
    lc = LossConfig(temperature=1.0)
    history = []
    for step in range(30):
        r = generate(m, prompts, n=8, max_new_tokens=3, temperature=1.0, seed=step)
        b = build_batch(prompts, r, 0)
        b.rewards = (r.tokens[:, 0] == 7).float()
        b.advantages = compute_advantages(b.rewards, 8)
        history.append(float(b.rewards.mean()))
        update_policy(m, opt, b, lc, UpdatePlan(32, 32))
    assert sum(history[:3]) / 3 < 0.2 and sum(history[-3:]) / 3 > 0.8, history


def test_the_first_draws_statistics_combine_over_ranks_unweighted():
    """accuracy_sampled and zero_std_frac_sampled describe each rank's first draw (the same number of prompts on
    every rank): their mean over ranks is plain, not weighted by the tokens of the batch each rank kept."""
    from psyche.grpo import combine, combine_kind

    for k in ("accuracy_sampled", "zero_std_frac_sampled"):
        assert combine([0.5, 1.0], [10, 30], combine_kind(k)) == 0.75
    assert combine([0.5, 1.0], [10, 30], combine_kind("entropy")) == 0.875  # a token mean stays weighted
