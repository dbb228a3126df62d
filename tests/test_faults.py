"""Faults during training, survived with nothing lost: SIGKILL inside a GRPO checkpoint write, a disk that fills
during a checkpoint write, and a reward function that returns NaN or raises. Each through the real CLI."""

import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from psyche.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from psyche.metrics import read_metrics
from psyche.weights import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("time_", "tok_per_s", "dt")
ENV = {k: v for k, v in os.environ.items() if k not in ("PSYCHE_DEBUG", "PSYCHE_FAULT")}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _grpo(out, *sets):
    return ["train.py", "--stage", "grpo", "--config", "configs/tiny-grpo.toml", "--out", str(out), "--set",
            "log.progress=false", "--set", "grpo.exact_kl=false", "--set", "grpo.dump_every=0", "--set",
            "checkpoint.export=false", *[a for s in sets for a in ("--set", s)]]


def _sft(out, *sets):
    return ["train.py", "--stage", "sft", "--config", "configs/tiny-sft.toml", "--out", str(out), "--set",
            "log.progress=false", *[a for s in sets for a in ("--set", s)]]


def _run(argv, env=None, python=(sys.executable,)):
    return subprocess.run([*python, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**ENV, **(env or {})})


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _one_line_error(r) -> str:
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    return errors[0]


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


# ---- SIGKILL inside a GRPO checkpoint write ----

@pytest.mark.slow
def test_sigkill_during_grpo_checkpoint_write_then_resume_matches_an_uninterrupted_run(tmp_path):
    sets = ("grpo.steps=3", "checkpoint.every=1", "checkpoint.keep_last=2")
    ref = tmp_path / "ref"
    _ok(_run(_grpo(ref, *sets)))
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, *_grpo(out, *sets)], cwd=ROOT, env={**ENV, "PSYCHE_FAULT": "ckpt_write@3:sleep"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(600, p.kill)
    timer.start()
    try:
        for line in p.stdout:  # the step-3 checkpoint's weights are written, its meta.json and rename are not
            if line.startswith("PSYCHE_FAULT"):
                os.kill(p.pid, signal.SIGKILL)
                break
    finally:
        timer.cancel()
        p.wait()
    assert p.returncode == -signal.SIGKILL
    assert [c.name for c in list_checkpoints(out)] == ["step_00000001", "step_00000002"]
    assert list((out / "checkpoints").glob(".step_00000003*")), "the half-written checkpoint is hidden"

    from psyche.run import build_model_for_training
    from psyche.weights import load_pretrained

    policy = build_model_for_training(out / "init", torch.device("cpu"))
    reference, _ = load_pretrained(out / "init")
    state = load_checkpoint(latest_checkpoint(out), model=policy, extra_models={"reference": reference})
    assert state["step"] == 2

    log = _ok(_run(_grpo(out, *sets))).stdout
    assert "resumed from" in log and "at step 2" in log
    assert [c.name for c in list_checkpoints(out)] == ["step_00000002", "step_00000003"]
    assert not list((out / "checkpoints").glob(".step_*")), "the next save removes the leftover"
    got, want = read_metrics(out), read_metrics(ref)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert _stable(got) == _stable(want)


# ---- a disk that fills during a checkpoint write ----

def test_full_disk_during_checkpoint_write_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    sets = ("checkpoint.every=2", "checkpoint.keep_last=1", 'optim.schedule="constant"', "optim.warmup_steps=1")
    _ok(_run(_sft(out, "sft.max_steps=2", *sets)))  # a constant LR: the run may be extended from step 2
    before = {d: _tree(out / d) for d in ("checkpoints", "hf", "init")}
    r = _run(_sft(out, "sft.max_steps=4", *sets), env={"PSYCHE_FAULT": "ckpt_write@4:enospc"})
    line = _one_line_error(r)
    assert f"{out}/checkpoints/step_00000004: writing the checkpoint failed (No space left on device)" in line
    assert f"the last good checkpoint is {out}/checkpoints/step_00000002" in line
    # keep_last=1 deleted nothing, no partial directory is left, the previous export is whole
    assert {d: _tree(out / d) for d in before} == before
    log = _ok(_run(_sft(out, "sft.max_steps=4", *sets))).stdout
    assert "resumed from" in log and "at step 2" in log
    assert [c.name for c in list_checkpoints(out)] == ["step_00000004"]


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch, tiny_ckpt):
    """The failing call itself writes half a file first (as a full disk does), then raises ENOSPC."""
    from psyche.weights import load_pretrained

    model, _ = load_pretrained(tiny_ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={"step": 1}, keep_last=1)
    before = _tree(tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, state={"step": 2}, keep_last=1)
    msg = str(e.value)
    assert "step_00000002: writing the checkpoint failed (No space left on device: " in msg
    assert f"the last good checkpoint is {tmp_path}/checkpoints/step_00000001" in msg and "\n" not in msg
    assert _tree(tmp_path) == before
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=opt)["step"] == 1


@pytest.mark.parametrize("fails", ["safetensors", "torch.save"])
def test_a_write_that_safetensors_or_torch_reports_is_a_checkpoint_error(tmp_path, monkeypatch, tiny_ckpt, fails):
    """A full disk or a file-size limit reaches us as safetensors' SafetensorError or torch.save's RuntimeError, not
    as an OSError: still one CheckpointError naming the file, and nothing already written is touched."""
    from safetensors import SafetensorError

    import psyche.weights
    from psyche.weights import load_pretrained

    model, _ = load_pretrained(tiny_ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={"step": 1}, keep_last=1)
    before = _tree(tmp_path)
    if fails == "safetensors":
        def save_file(*a, **kw):
            raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
        monkeypatch.setattr(psyche.weights, "save_file", save_file)
        reason = "(File too large: "
    else:
        def save(obj, f, *a, **kw):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(torch, "save", save)
        reason = "(torch.save could not write it ([enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534;"
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, state={"step": 2}, keep_last=1)
    msg = str(e.value)
    assert f"{tmp_path}/checkpoints/step_00000002: writing the checkpoint failed {reason}" in msg, msg
    assert ("model.safetensors" if fails == "safetensors" else "optimizer.pt") in msg
    assert f"the last good checkpoint is {tmp_path}/checkpoints/step_00000001" in msg and "\n" not in msg
    assert _tree(tmp_path) == before


def test_an_export_that_safetensors_fails_to_write_is_a_checkpoint_error(tmp_path, monkeypatch, tiny_ckpt):
    """export_hf and export_adapter (the files other tools load) alike; a previous export stays whole."""
    import safetensors.torch
    from safetensors import SafetensorError

    import psyche.weights
    from psyche.checkpoint import export_adapter, export_hf
    from psyche.config import LoraSection
    from psyche.lora import add_lora, settings
    from psyche.weights import load_pretrained

    model, _ = load_pretrained(tiny_ckpt)
    lora = LoraSection(rank=2, alpha=4.0)
    add_lora(model, **settings(lora), seed=0)
    export_hf(model, tmp_path / "hf")
    export_adapter(model, tmp_path / "adapter", lora, str(tiny_ckpt))
    before = _tree(tmp_path)

    def save_file(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(psyche.weights, "save_file", save_file)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(CheckpointError) as e:
        export_hf(model, tmp_path / "hf")
    assert str(e.value).startswith(f"{tmp_path}/hf: writing the exported model failed (No space left on device: ")
    assert "model.safetensors)" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        export_adapter(model, tmp_path / "adapter", lora, str(tiny_ckpt))
    assert str(e.value) == (f"{tmp_path}/adapter: writing the adapters failed (No space left on device: "
                            f"{tmp_path}/adapter/adapter_model.safetensors)")
    assert _tree(tmp_path) == before


def test_an_unreadable_checkpoint_is_named_on_resume(tmp_path):
    out = tmp_path / "run"
    _ok(_run(_sft(out, "sft.max_steps=2", "checkpoint.every=2")))
    opt = out / "checkpoints" / "step_00000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:1000])
    before = _tree(out)
    line = _one_line_error(_run(_sft(out, "sft.max_steps=4", "checkpoint.every=2")))
    assert f"{opt}: cannot be read" in line
    assert _tree(out) == before


# ---- a reward function that returns NaN or raises ----

DRIVER = '''
import math, os, runpy, sys
from psyche.rewards import register

calls = [0]

@register("flaky")
def flaky(prompt, completion, item):
    calls[0] += 1
    if calls[0] > int(os.environ["FLAKY_AFTER"]):
        if os.environ["FLAKY_MODE"] == "raise":
            raise KeyError("no such rubric")
        return math.nan
    return 0.5

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_nan_or_raising_reward_stops_grpo_naming_function_and_sample(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    # 8 prompts x 4 samples = 32 rewards a step: step 1 is fine, step 2's first reward is NaN
    argv = _grpo(out, "grpo.steps=3", "checkpoint.every=1", 'grpo.rewards=["format", "flaky"]',
                 "grpo.reward_weights=[0.1, 1.0]")
    line = _one_line_error(_run(argv, env={"FLAKY_MODE": "nan", "FLAKY_AFTER": "32"}, python=(sys.executable,
                                                                                               str(driver))))
    assert "step 2: reward function 'flaky' returned nan on the prompt at configs/data/tiny-grpo.jsonl:" in line
    assert ", sample 1 of 4 (completion '" in line
    assert f"Last good checkpoint: {out}/checkpoints/step_00000001 (untouched)" in line
    assert [c.name for c in list_checkpoints(out)] == ["step_00000001"]
    assert [r["step"] for r in read_metrics(out)] == [1]
    before = _tree(out)
    # resumed from step 1, the function raises on its first call: the run directory is unchanged
    line = _one_line_error(_run(argv, env={"FLAKY_MODE": "raise", "FLAKY_AFTER": "0"}, python=(sys.executable,
                                                                                                str(driver))))
    assert "step 2: reward function 'flaky' raised KeyError: 'no such rubric' on the prompt at " in line
    assert "configs/data/tiny-grpo.jsonl:" in line and "(untouched)" in line
    assert _tree(out) == before


def test_reward_set_names_function_and_sample():
    from psyche.rewards import REGISTRY, RewardError, RewardSet

    REGISTRY["test_nan"] = lambda p, c, item: float("nan")
    REGISTRY["test_inf"] = lambda p, c, item: float("inf")
    try:
        for name, what in (("test_nan", "returned nan"), ("test_inf", "returned inf")):
            with pytest.raises(RewardError) as e:
                RewardSet({"format": 0.1, name: 1.0})("p", "<think>x</think>A", {"answer": "A"}, where="f.jsonl:3")
            assert str(e.value).startswith(f"reward function {name!r} {what} on f.jsonl:3 (completion ")
        total, parts = RewardSet({"format": 1.0, "accuracy": 1.0})("p", "<think>x</think>A", {"answer": "A"})
        assert total == 2.0 and parts == {"format": 1.0, "accuracy": 1.0}
    finally:
        del REGISTRY["test_nan"], REGISTRY["test_inf"]
