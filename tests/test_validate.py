"""psyche.validate: the whole config checked before a stage starts; each rule a one-line ConfigError naming keys."""

from pathlib import Path

import pytest

from psyche.config import ConfigError, RunConfig, load_run_config
from psyche.validate import check_grpo, check_settings, check_sft, check_stage

ROOT = Path(__file__).resolve().parents[1]
SFT, GRPO = ROOT / "configs/tiny-sft.toml", ROOT / "configs/tiny-grpo.toml"


def _cfg(path, *sets):
    return load_run_config(path, list(sets))


def test_shipped_configs_and_the_embedded_default_pass(monkeypatch):
    from psyche.recipe import embedded_config

    monkeypatch.chdir(ROOT)
    check_sft(_cfg(SFT), world=1)
    check_grpo(_cfg(GRPO), world=1)
    check_sft(_cfg(ROOT / "configs/qwen2.5-7b-sft.toml"), world=8, files=False)
    check_grpo(_cfg(ROOT / "configs/qwen2.5-7b-grpo.toml"), world=8, files=False)
    check_settings(embedded_config())
    check_settings(RunConfig())


RULES = [
    (SFT, "sft", 1, ["optim.lr=-1"], "optim.lr=-1.0: the learning rate must be > 0"),
    (SFT, "sft", 1, ["optim.lr=inf"], "optim.lr=inf: must be a finite number"),
    (SFT, "sft", 1, ["optim.betas=[0.9, 1.0]"], "optim.betas[1]=1.0: must be in [0, 1)"),
    (SFT, "sft", 1, ["optim.eps=0"], "optim.eps=0.0: must be > 0"),
    (SFT, "sft", 1, ["optim.warmup_ratio=1.5"], "optim.warmup_ratio=1.5: must be in [0, 1]"),
    (SFT, "sft", 1, ["optim.grad_clip=-1"], "optim.grad_clip=-1.0: the gradient-norm limit must be >= 0"),
    (SFT, "sft", 1, ["sft.micro_batch=3"], "sft.global_batch=4, sft.micro_batch=3: the global batch must be a "
                                           "multiple of micro_batch x ranks (3 x 1 = 3)"),
    (SFT, "sft", 4, [], "sft.global_batch=4, sft.micro_batch=2: the global batch must be a multiple of micro_batch "
                        "x ranks (2 x 4 = 8)"),
    (SFT, "sft", 1, ["sft.global_batch_tokens=100"], "sft.global_batch_tokens=100: less than one row of "
                                                     "data.max_length=128 tokens"),
    (SFT, "sft", 1, ["data.max_length=1"], "data.max_length=1: must be >= 2"),
    (SFT, "sft", 1, ["checkpoint.every=-1"], "checkpoint.every=-1: must be >= 0"),
    (SFT, "sft", 1, ["run.seed=4294967296"], "run.seed=4294967296: must be in [0, 2**32)"),
    (SFT, "sft", 1, ['run.out=" "'], "run.out=' ': the run directory must not be empty"),
    (SFT, "sft", 1, ['model.init=""'], "model.init='': give an HF checkpoint directory or 'preset:NAME'"),
    (GRPO, "grpo", 1, ["grpo.group_size=1"], "grpo.group_size=1: estimator 'grpo' with std_ddof=1 needs >= 2 "
                                             "samples per prompt"),
    (GRPO, "grpo", 1, ["grpo.group_size=1", "grpo.std_ddof=0"], "grpo.group_size=1: estimator 'grpo' with "
                                                                "std_ddof=0 needs >= 2"),
    (GRPO, "grpo", 1, ["grpo.group_size=2", "grpo.std_ddof=2"], "grpo.group_size=2: estimator 'grpo' with "
                                                                "std_ddof=2 needs >= 3"),
    (GRPO, "grpo", 1, ["grpo.group_size=1", 'grpo.advantage="dr_grpo"'], "estimator 'dr_grpo' needs >= 2"),
    (GRPO, "grpo", 1, ["grpo.top_p=0"], "grpo.top_p=0.0: must be in (0, 1]"),
    (GRPO, "grpo", 1, ['grpo.policy_loss="cispo"', 'grpo.ratio_level="sequence"'],
     "grpo.ratio_level='sequence': the sequence ratio (GSPO) belongs to policy_loss 'ppo', not 'cispo'"),
    (GRPO, "grpo", 1, ['grpo.policy_loss="gmpo"', "grpo.dual_clip=3"], "grpo.dual_clip=3.0: dual clip belongs to"),
    (GRPO, "grpo", 1, ["grpo.sapo_tau_neg=0"], "grpo.sapo_tau_neg=0.0: must be > 0"),
    (GRPO, "grpo", 1, ["grpo.clip_cov_ratio=1.5"], "grpo.clip_cov_ratio=1.5: must be in (0, 1]"),
    (GRPO, "grpo", 1, ["grpo.clip_cov_lb=6"], "grpo.clip_cov_lb=6.0: must be below grpo.clip_cov_ub=5.0"),
    (GRPO, "grpo", 1, ['grpo.rollout_correction="tis"', "grpo.rc_threshold=0.5"],
     "grpo.rc_threshold=0.5: must be >= 1 for TIS"),
    (GRPO, "grpo", 1, ['grpo.rollout_correction="seq_mis"', "grpo.rc_low=1.2"], "grpo.rc_low=1.2: MIS keeps"),
    (GRPO, "grpo", 1, ['grpo.rollout_correction="mis"', 'grpo.old_logprobs="sampler"'],
     "grpo.rollout_correction='mis': corrects the trainer's old log-probs against the sampler's"),
    (GRPO, "grpo", 1, ["grpo.group_size=1", 'grpo.advantage="grpo_passk"'], "estimator 'grpo_passk' needs >= 2"),
    (GRPO, "grpo", 1, ["grpo.temperature=-0.5"], "grpo.temperature=-0.5: must be > 0"),
    (GRPO, "grpo", 1, ["grpo.temperature=1e-6"], "grpo.temperature=1e-06: must be > 0, at least 1e-05"),
    (GRPO, "grpo", 1, ["grpo.clip_high=-0.1"], "grpo.clip_high=-0.1: must be >= 0"),
    (GRPO, "grpo", 1, ["grpo.kl_coef=-1"], "grpo.kl_coef=-1.0: must be >= 0"),
    (GRPO, "grpo", 1, ['grpo.truncation="penalty"', "grpo.overlong_buffer=100"],
     "grpo.overlong_buffer=100: the soft zone cannot be longer than grpo.max_new_tokens=24"),
    (GRPO, "grpo", 1, ['grpo.rewards=["format", "format"]', "grpo.reward_weights=[1.0, 1.0]"],
     "['format'] named twice"),
    (GRPO, "grpo", 1, ["grpo.rewards=[]", "grpo.reward_weights=[]"], "grpo.rewards=[]: name at least one of"),
    (GRPO, "grpo", 1, ["grpo.reward_weights=[1.0, nan]"], "grpo.reward_weights[1]=nan: must be a finite number"),
    (GRPO, "grpo", 1, ["grpo.replay_steps=[0, 3]"], "grpo.replay_steps=[0, 3]: steps count from 1"),
    (GRPO, "grpo", 1, ["grpo.steps=0", "grpo.epochs=0"], "grpo.epochs=0.0: with grpo.steps=0 there is nothing"),
    (GRPO, "grpo", 3, ["grpo.mini_batch=0"], "grpo.prompts_per_step=8: must be a multiple of the number of ranks (3)"),
    (GRPO, "grpo", 8, [], "grpo.mini_batch=4: must be a multiple of the number of ranks (8)"),
    (GRPO, "grpo", 1, ["grpo.optim.betas=[0.9]"], "grpo.optim.betas=[0.9]: AdamW takes two betas"),
    (GRPO, "grpo", 1, ['grpo.init="preset:nope"'], "grpo.init='preset:nope': unknown preset 'nope'"),
]


@pytest.mark.parametrize("path,stage,world,sets,msg", RULES, ids=[r[4][:64] for r in RULES])
def test_each_rule_is_one_line_naming_the_keys(monkeypatch, path, stage, world, sets, msg):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as e:
        check_stage(_cfg(path, *sets), stage, world=world)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_inputs_are_checked_without_building_anything(monkeypatch, tmp_path, tiny_ckpt):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"data.paths\[1\] = 'nope.jsonl': data file not found"):
        check_sft(_cfg(SFT, 'data.paths=["configs/data/tiny-sft.jsonl", "nope.jsonl"]'), world=1)
    init = f'model.init="{tiny_ckpt}"'
    check_grpo(_cfg(GRPO, init), world=1)  # the checkpoint's config.json: 2048 positions for 512 + 24
    with pytest.raises(ConfigError, match=r"grpo.max_prompt_length=2000 \+ grpo.max_new_tokens=100 = 2100: longer "
                                          rf"than the model's max_position_embeddings \(2048, {tiny_ckpt}\)"):
        check_grpo(_cfg(GRPO, init, "grpo.max_prompt_length=2000", "grpo.max_new_tokens=100"), world=1)
    with pytest.raises(ConfigError, match=rf"grpo.init = '{tmp_path}': no config.json there"):
        check_grpo(_cfg(GRPO, f'grpo.init="{tmp_path}"'), world=1)
    missing = _cfg(GRPO, 'grpo.paths=["nope.jsonl"]')
    check_grpo(missing, world=1, files=False)  # the settings alone are fine
    with pytest.raises(ConfigError, match=r"grpo.paths\[0\] = 'nope.jsonl': data file not found"):
        check_grpo(missing, world=1)


def test_world_size_comes_from_torchrun(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"x ranks \(2 x 4 = 8\)"):
        check_sft(_cfg(SFT))
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_sft(_cfg(SFT))


def test_embedded_settings_are_checked_against_the_base_model(tiny_ckpt):
    from psyche.recipe import embedded_config

    cfg = embedded_config()
    check_settings(cfg, base=tiny_ckpt)
    cfg.grpo.max_new_tokens = 2048
    n = cfg.grpo.max_prompt_length + 2048
    with pytest.raises(ConfigError, match=rf"grpo.max_new_tokens=2048 = {n}: longer than the model's "
                                          rf"max_position_embeddings \(2048, {tiny_ckpt}\)"):
        check_settings(cfg, base=tiny_ckpt)
    check_settings(cfg)  # without a base model there is nothing to compare the lengths with
