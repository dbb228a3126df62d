"""The GRPO stage end to end on the tiny config: artefacts, logged quantities, exact resume after SIGKILL,
dynamic sampling, prompt loading errors, and 1 rank = 2 ranks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from psyche.checkpoint import latest_checkpoint, list_checkpoints
from psyche.data import DataError
from psyche.grpo.loop import PromptStream, load_prompts
from psyche.metrics import read_metrics
from psyche.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-grpo.toml"
VOLATILE = ("time_", "tok_per_s", "dt")  # wall-clock quantities differ between runs
REQUIRED = {"step", "loss", "reward_mean", "reward_std", "kl", "kl_exact", "entropy", "response_length_mean",
            "clip_frac_low", "clip_frac_high", "grad_norm", "zero_std_frac", "logprob_gap", "logprob_gap_kl",
            "adv_mean", "adv_std", "adv_min", "adv_max", "ratio_mean", "ratio_max", "truncation_rate",
            "format_rate", "accuracy", "reward/format", "reward/accuracy", "response_length_max", "lr",
            "time_rollout", "time_reference", "time_old_logprob", "time_update", "tok_per_s"}


def _cmd(out, *sets):
    return [sys.executable, "train.py", "--stage", "grpo", "--config", str(TINY), "--out", str(out),
            "--set", "log.progress=false", *[a for s in sets for a in ("--set", s)]]


def _run(out, *sets, timeout=300):
    r = subprocess.run(_cmd(out, *sets), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "run"
    return out, _run(out)


def test_artefacts_and_logged_quantities(reference_run):
    out, log = reference_run
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    missing = REQUIRED - set(rows[0])
    assert not missing, missing
    assert "step 4/4 | loss" in log and "reward_mean" in log
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002", "step_00000004"]
    assert (latest_checkpoint(out) / "reference.safetensors").is_file()
    assert (out / "hf" / "config.json").is_file() and (out / "config.toml").is_file()
    dumps = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert {d["step"] for d in dumps} == {1, 2, 4} and len(dumps) == 3 * 8 * 4
    assert {"prompt", "completion", "reward", "advantage", "parts", "finished", "length"} <= set(dumps[0])
    for r in rows:  # the sampler and the trainer agree on log-probs for the same weights (fp32, CPU)
        assert r["logprob_gap"] < 1e-4
        assert 0 <= r["zero_std_frac"] <= 1 and r["optimizer_steps"] == 2


def test_sigkill_then_resume_gives_identical_metrics(reference_run, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "run"
    env = {**os.environ, "PSYCHE_FAULT": "step_end@3:sleep"}
    p = subprocess.Popen(_cmd(out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(300, p.kill)
    timer.start()
    try:
        for line in p.stdout:
            if line.startswith("PSYCHE_FAULT"):
                os.kill(p.pid, signal.SIGKILL)
                break
    finally:
        timer.cancel()
        p.wait()
    assert p.returncode == -signal.SIGKILL
    assert latest_checkpoint(out).name == "step_00000002"
    log = _run(out)
    assert "resumed from" in log
    got, want = read_metrics(out), read_metrics(ref_out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert _stable(got) == _stable(want)


def test_dynamic_sampling_replaces_zero_std_groups(tmp_path):
    out = tmp_path / "run"
    _run(out, "grpo.steps=2", "grpo.dynamic_sampling=true", "grpo.max_refill=3", "checkpoint.every=0",
         "checkpoint.export=false", "grpo.exact_kl=false")
    for r in read_metrics(out):
        assert r["zero_std_frac"] <= r["zero_std_frac_sampled"]
        assert r["prompts_drawn"] >= 8 and "refill_rounds" in r
        if r["zero_std_frac_sampled"] > 0 and r["groups_padded"] == 0:
            assert r["zero_std_frac"] == 0


def test_load_prompts_errors_and_limits(tmp_path, tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"question": "q?", "options": {"A": "x", "B": "y"}}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: missing or empty 'answer'"):
        load_prompts([f], tok)
    f.write_text(json.dumps({"answer": "A", "messages": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: 'messages' must be a list"):
        load_prompts([f], tok)
    f.write_text(json.dumps({"answer": "A", "text": "hi"}) + "\n")
    with pytest.raises(DataError, match="expected 'question' \\+ 'options' or 'messages'"):
        load_prompts([f], tok)
    f.write_text("")
    with pytest.raises(DataError, match="empty dataset"):
        load_prompts([f], tok)
    f.write_text(json.dumps({"question": "长" * 400, "options": {"A": "x"}, "answer": "A"}) + "\n" +
                 json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}],
                             "answer": "A"}) + "\n")
    prompts, dropped = load_prompts([f], tok, max_prompt_length=64)
    assert dropped == 1 and len(prompts) == 1
    assert prompts[0]["text"].endswith("<|im_start|>assistant\n") and "A<|im_end|>" not in prompts[0]["text"]
    psy, _ = load_prompts([f], tok, style="psyche", max_prompt_length=10_000)
    assert "你是一名心理学专家" in psy[0]["text"]


def test_prompt_stream_is_a_resumable_shuffle():
    a = PromptStream(5, seed=1)
    first = a.take(7)
    assert sorted(first[:5]) == [0, 1, 2, 3, 4]  # an epoch is a permutation
    b = PromptStream(5, seed=1, position=3)
    assert b.take(4) == first[3:7]


@pytest.mark.dist
@pytest.mark.parametrize("variant", [[], ['grpo.policy_loss="clip_cov"', "grpo.clip_cov_ratio=0.02",
                                          "grpo.clip_cov_lb=0.0"]], ids=["ppo", "clip_cov"])
def test_two_ranks_equal_one_rank(tmp_path, variant):
    """Same global batch on 1 and 2 ranks (FSDP2, gloo): identical rollouts, and losses/gradients equal; with
    Clip-Cov, every mini-batch's random draw of tokens is the same on both (seeded by the mini-batch's index)."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    sets = ["grpo.steps=2", "checkpoint.every=0", "checkpoint.export=false", "grpo.exact_kl=false",
            "grpo.micro_batch=4", *variant]
    _run(tmp_path / "one", *sets)
    cmd = ["torchrun", "--nproc_per_node=2", "--master_port=29533", *_cmd(tmp_path / "two", *sets)[1:]]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for a, b in zip(one, two):
        assert a["reward_mean"] == b["reward_mean"] and a["response_length_mean"] == b["response_length_mean"]
        for k in ("accuracy_sampled", "zero_std_frac_sampled"):  # over every rank's first draw, unweighted
            assert a[k] == pytest.approx(b[k], abs=1e-12), (k, a[k], b[k])
        for k in ("loss", "grad_norm", "kl"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])


def test_bf16_compute_runs_grpo_under_the_same_autocast_as_sft(tmp_path, monkeypatch):
    """model.dtype = bfloat16 on one unsharded process (CPU here; CUDA where there is one): every forward of SFT's step and of GRPO's rollouts,
    reference / old log-probs and update runs under bf16 autocast (the shared run skeleton's `amp`), while the
    master weights and the optimizer state stay fp32."""
    import torch

    from psyche.config import load_run_config
    from psyche.grpo.loop import run_grpo
    from psyche.model import Qwen2
    from psyche.sft import run_sft

    seen = []

    def spy(module, args):  # (on a CUDA machine the stages run there: the same check, CUDA autocast)
        if isinstance(module, Qwen2):
            dev = module.model.embed_tokens.weight.device.type
            seen.append((torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev),
                         module.model.embed_tokens.weight.dtype, torch.is_grad_enabled()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(spy)
    try:
        sets = ["model.dtype=bfloat16", "log.progress=false", "checkpoint.export=false"]
        sft = load_run_config(ROOT / "configs" / "tiny-sft.toml",
                              sets + [f"run.out={tmp_path / 'sft'}", "sft.max_steps=2",
                                      f"data.paths=['{ROOT / 'configs/data/tiny-sft.jsonl'}']"])
        run_sft(sft)
        n_sft = len(seen)
        grpo = load_run_config(TINY, sets + [f"run.out={tmp_path / 'grpo'}", "grpo.steps=2",
                                             f"grpo.paths=['{ROOT / 'configs/data/tiny-grpo.jsonl'}']"])
        run_grpo(grpo)
    finally:
        handle.remove()
    assert n_sft > 0 and len(seen) > n_sft
    assert all(on and dt == torch.bfloat16 for on, dt, _, _ in seen), seen
    policy = [s for s in seen[n_sft:] if s[2] == torch.float32]  # (the reference is held in bf16)
    assert any(grad for *_, grad in policy) and any(not grad for *_, grad in policy)  # update and rollouts
    for run in ("sft", "grpo"):
        ckpt = latest_checkpoint(tmp_path / run)
        from safetensors.torch import load_file

        assert all(v.dtype == torch.float32 for v in load_file(str(ckpt / "model.safetensors")).values())
        optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
        moments = [t for st in optim["state"].values() for t in st.values() if torch.is_tensor(t) and t.dim()]
        assert moments and all(t.dtype == torch.float32 for t in moments)
    rows = read_metrics(tmp_path / "grpo")
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN


def test_dynamic_sampling_judges_groups_by_the_shaped_rewards_and_padding_learns_nothing(tmp_path):
    """truncation = zero on a random model (it never stops): every shaped reward is 0, so every group is
    uniform. Dynamic sampling sees that (not the raw rewards, which vary), refills in vain and pads every
    group; the padding has zero advantage even with the KL in the reward, so the policy loss is exactly 0."""
    out = tmp_path / "run"
    _run(out, "grpo.steps=2", "grpo.dynamic_sampling=true", "grpo.max_refill=2", 'grpo.truncation="zero"',
         'grpo.kl_mode="reward"', "checkpoint.every=0", "checkpoint.export=false", "grpo.exact_kl=false")
    for r in read_metrics(out):
        assert r["zero_std_frac_sampled"] == 1 and r["refill_rounds"] == 2 and r["groups_padded"] == 8, r
        assert r["adv_min"] == r["adv_max"] == 0 and r["pg_loss"] == 0, r


def test_dynamic_sampling_padding_has_zero_advantage_under_a_batch_estimator(tmp_path):
    """With no refill round, the uniform groups of the first draw pad the batch (the last groups). REINFORCE++
    whitens over the whole batch, which would give a uniform group a non-zero advantage: padding gets 0."""
    out = tmp_path / "run"
    _run(out, "grpo.steps=1", "grpo.dynamic_sampling=true", "grpo.max_refill=0", 'grpo.advantage="reinforce_pp"',
         "checkpoint.every=0", "checkpoint.export=false", "grpo.exact_kl=false")
    (m,) = read_metrics(out)
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    padded = m["groups_padded"] * 4  # group_size 4
    assert padded > 0 and len(rows) == 32
    assert all(r["advantage"] == 0 for r in rows[-padded:])
    assert any(r["advantage"] != 0 for r in rows[:-padded])


def test_the_kl_is_logged_with_sampler_old_logprobs_and_never_nan(tmp_path):
    """old_logprobs = sampler: the KL to the reference is measured on the sampler's log-probs (it was not
    logged at all). truncation = mask on a model that never stops leaves no token to measure: no NaN is
    logged (the metric is absent), and the run goes on."""
    import math

    _run(tmp_path / "sampler", "grpo.steps=1", 'grpo.old_logprobs="sampler"', "checkpoint.every=0",
         "checkpoint.export=false", "grpo.exact_kl=false")
    (m,) = read_metrics(tmp_path / "sampler")
    assert m["kl"] >= 0
    _run(tmp_path / "masked", "grpo.steps=1", 'grpo.truncation="mask"', "checkpoint.every=0",
         "checkpoint.export=false", "grpo.exact_kl=false")
    (m,) = read_metrics(tmp_path / "masked")
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
