"""Adding a GRPO variant is one decorated function: the config accepts its name, validation applies its
registry entry's rules, `objective` dispatches to it, and the README's table is the registries'."""

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registries():
    """The registries as they were, restored after the test (a test's variants do not leak)."""
    from psyche.grpo.advantages import ESTIMATORS
    from psyche.grpo.loss import POLICY_LOSSES

    saved = dict(ESTIMATORS), dict(POLICY_LOSSES)
    yield
    for reg, old in zip((ESTIMATORS, POLICY_LOSSES), saved):
        reg.clear()
        reg.update(old)


def test_a_new_estimator_and_policy_loss_run_a_grpo_step_through_the_config(tmp_path, registries):
    from psyche.config import ConfigError, load_run_config
    from psyche.grpo.advantages import estimator
    from psyche.grpo.loop import run_grpo
    from psyche.grpo.loss import policy_loss, policy_loss_variant
    from psyche.validate import check_grpo

    calls = {"estimator": 0, "loss": 0}

    @estimator("median_baseline", min_group=3)
    def median_baseline(r, ctx):
        """A_i = r_i − median_g r"""
        calls["estimator"] += 1
        return r - r.median(dim=1, keepdim=True).values

    @policy_loss_variant("ppo_half", params=("clip_low", "clip_high"))
    def ppo_half(logp, old_logp, advantages, mask, *, clip_low, clip_high, **agg):
        """PPO with half the advantage"""
        calls["loss"] += 1
        return policy_loss(logp, old_logp, 0.5 * advantages, mask, clip_low=clip_low, clip_high=clip_high, **agg)

    sets = ["grpo.advantage=median_baseline", "grpo.policy_loss=ppo_half", "grpo.steps=1", "log.progress=false",
            "checkpoint.export=false", f"run.out={json.dumps(str(tmp_path / 'run'))}"]
    small = load_run_config(ROOT / "configs" / "tiny-grpo.toml", sets + ["grpo.group_size=2"])
    with pytest.raises(ConfigError, match="grpo.group_size=2: estimator 'median_baseline' needs >= 3"):
        check_grpo(small)
    with pytest.raises(ConfigError, match="'ppo_half' .*GSPO|ratio_level='sequence'"):
        check_grpo(load_run_config(ROOT / "configs" / "tiny-grpo.toml", sets + ['grpo.ratio_level="sequence"']))
    with pytest.raises(ConfigError, match="'nope' is not one of .*median_baseline"):
        load_run_config(ROOT / "configs" / "tiny-grpo.toml", ["grpo.advantage=nope"])
    cwd = Path.cwd()
    try:
        import os

        os.chdir(ROOT)
        run_grpo(load_run_config(ROOT / "configs" / "tiny-grpo.toml", sets))
    finally:
        os.chdir(cwd)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["pg_loss"]))
    assert calls["estimator"] >= 1 and calls["loss"] >= 2  # one estimate per step, a loss per micro-batch


def test_the_readme_table_is_the_registries():
    from psyche.cli import variants_table

    table = variants_table()
    assert table in (ROOT / "README.md").read_text(), "README's variants table: paste `psyche variants`"
    assert table.count("(default)") == 5


def test_validation_and_dispatch_read_the_registry_entries():
    """The group-size rule, the length requirement and the parameters come from the entries, so validation and
    compute_advantages agree (dr_grpo and opo need a group of 2 in both)."""
    from psyche.grpo.advantages import ESTIMATORS, compute_advantages

    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    for name, est in ESTIMATORS.items():
        need = est.min_group(1)
        if need > 1:
            with pytest.raises(ValueError, match=f"needs >= {need}"):
                compute_advantages(r[:need - 1] if need - 1 > 0 else r[:1], need - 1 or 1, estimator=name,
                                   lengths=torch.ones(max(need - 1, 1)))
    assert {n for n, e in ESTIMATORS.items() if e.needs_lengths} == {"reinforce_pp", "reinforce_pp_baseline", "opo"}
