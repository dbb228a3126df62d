"""GRPO, in seven files, from the math outwards:

    advantages.py   the advantage estimators, one registered function each (ESTIMATORS)
    kl.py           the KL estimators k1/k2/k3 (KL_KINDS) and the exact KL from logits
    correction.py   rollout corrections: importance weights for the sampler-trainer gap (ROLLOUT_CORRECTIONS)
    loss.py         the policy losses and aggregations as tensor functions (a registry each), and `objective`,
                    which puts them together with the KL and the correction into the loss that trains
    step.py         one update: the rollout batch (RolloutBatch), its log-probs, rewards shaping, the
                    micro-batched update with global normalisation, and how each logged metric combines
    loop.py         the stage (`python train.py --stage grpo`): prompts, rollouts, dynamic sampling, the
                    reference and old log-probs, then per step update -> log -> checkpoint
    diagnostics.py  what a researcher measures beside the loss: counterfactual losses, gradient split,
                    exact KL against the estimators, entropy by position, pass rates, step dumps for replay

`from psyche.grpo import ...` gives step.py's names (and the loss functions it re-exports).
"""

from psyche.grpo.step import (AGGS, ESTIMATORS, KL_KINDS, METRICS, POLICY_LOSSES,  # noqa: F401
                              ROLLOUT_CORRECTIONS, LossConfig, RolloutBatch, aggregate, apply_truncation_mask,
                              batched_logprobs, build_batch, combine, combine_kind, completion_kl,
                              compute_advantages, cov_select, exact_kl, kl_estimate, logprob_gap, micro_loss,
                              objective, policy_loss, rollout_correction, rollout_stats, select_cov_tokens,
                              selecting_losses, sequence_logprobs, shape_rewards, surrogate, token_covariance,
                              UpdatePlan, update_policy, zero_std_groups)
