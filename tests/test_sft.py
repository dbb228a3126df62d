"""The SFT step and loop: loss = mean NLL of exactly the assistant tokens, packing = no packing, accumulation =
one big micro-batch, exact resume after SIGKILL (also mid-checkpoint), non-finite loss stops cleanly, the CLI
writes metrics/config/checkpoints/HF export; and the metrics logger."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from psyche.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from psyche.config import OptimSection, load_run_config
from psyche.data import IGNORE, SFTBatches, collate, load_messages, tokenize
from psyche.metrics import MetricsLogger, read_metrics, step_line
from psyche.run import NonFiniteLossError, build_model_for_training, build_optimizer
from psyche.sft import run_sft, train_step
from psyche.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-sft.toml"
DATA = ROOT / "configs" / "data" / "tiny-sft.jsonl"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)
    samples = tokenize(load_messages([DATA]), tok, max_length=128)
    return tiny_ckpt, tok, samples


def _train(init, samples, tok, *, micro, packing, steps=4, G=8, **model_kw):
    torch.manual_seed(0)
    model = build_model_for_training(init, CPU, **model_kw)
    opt = build_optimizer(model, OptimSection(lr=1e-2))
    b = SFTBatches(samples, global_batch=G, micro_batch=micro, world_size=1, packing=packing, max_length=128,
                   pad_id=tok.pad_id, seed=0)
    losses = [train_step(model, opt, b.micro_batches(s, 0), device=CPU, grad_clip=1.0,
                         amp=contextlib.nullcontext())["loss"] for s in range(steps)]
    return losses, model


@pytest.mark.parametrize("packing", [True, False])
def test_accumulation_4x2_equals_micro_batch_8(setup, packing):
    init, tok, samples = setup
    big, m1 = _train(init, samples, tok, micro=8, packing=packing)
    acc, m2 = _train(init, samples, tok, micro=2, packing=packing)
    torch.testing.assert_close(torch.tensor(acc), torch.tensor(big), atol=1e-6, rtol=0)
    for p, q in zip(m1.parameters(), m2.parameters()):  # Adam's m/sqrt(v) magnifies rounding where grad ~ 0
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw", [dict(activation_checkpointing=True),
                                pytest.param(dict(activation_checkpointing=True, compile=True), marks=pytest.mark.slow)])
def test_activation_checkpointing_and_compile_change_nothing(setup, kw):
    init, tok, samples = setup
    plain, _ = _train(init, samples, tok, micro=4, packing=True, steps=3)
    other, _ = _train(init, samples, tok, micro=4, packing=True, steps=3, **kw)
    torch.testing.assert_close(torch.tensor(other), torch.tensor(plain), atol=1e-5, rtol=0)


def test_the_uniform_gradient_lm_head_path_changes_nothing(setup, monkeypatch):
    """SFT asks for the lm_head path that makes the gradients in the forward (taken from a vocabulary size on,
    here forced at the tiny one): the same losses and weights as the streaming path, accumulation included."""
    from psyche import kernels

    init, tok, samples = setup
    monkeypatch.setattr(kernels, "UNIFORM_GRAD_MIN_VOCAB", 1 << 40)
    plain, m1 = _train(init, samples, tok, micro=2, packing=True, steps=3)
    monkeypatch.setattr(kernels, "UNIFORM_GRAD_MIN_VOCAB", 0)
    taken = []
    real = kernels._logprobs.token_logprobs_uniform_grad
    monkeypatch.setattr(kernels._logprobs, "token_logprobs_uniform_grad", lambda *a: (taken.append(1), real(*a))[1])
    fused, m2 = _train(init, samples, tok, micro=2, packing=True, steps=3)
    assert taken
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), atol=1e-5, rtol=0)  # fp32 rounding
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


def _reference_nll(model, samples, i):
    """Per-sample NLL sum from full logits of the sample alone, masked by the tokenizer's assistant mask."""
    x = torch.from_numpy(samples.ids[i]).long()[None]
    m = torch.from_numpy(samples.mask[i])
    logp = F.log_softmax(model(x)[0, :-1].float(), -1).gather(-1, x[0, 1:, None])[:, 0]
    return -(logp * m[1:]).sum(), int(m[1:].sum())


def test_loss_is_assistant_nll_packed_and_padded_alike(setup):
    init, tok, samples = setup
    model = build_model_for_training(init, CPU)
    idx = list(range(6))
    with torch.no_grad():
        ref = [_reference_nll(model, samples, i) for i in idx]
        for packed, rows in ((True, [idx[:3], idx[3:]]), (False, [[i] for i in idx])):
            b = collate(rows, samples, tok.pad_id, packed)
            logp, _ = model(b.input_ids, doc_ids=b.doc_ids, targets=b.labels)  # (B, T)
            assert (logp[b.labels == IGNORE] == 0).all()
            for r, row in enumerate(rows):
                for d, i in enumerate(row):
                    sel = (b.doc_ids[r] == d) if packed else torch.ones_like(b.labels[r], dtype=torch.bool)
                    got = -logp[r][sel].sum()
                    torch.testing.assert_close(got, ref[i][0], atol=1e-4, rtol=1e-5)
                    assert int(((b.labels[r] != IGNORE) & sel).sum()) == ref[i][1]
            # the step's loss is the token-weighted mean over the whole batch
            want = sum(ref[i][0] for i in idx) / sum(ref[i][1] for i in idx)
            torch.testing.assert_close(-logp.sum() / b.n_targets, want, atol=1e-5, rtol=1e-5)


# ---- the CLI, resume and faults ----

def _cmd(out, *sets):
    return [sys.executable, "train.py", "--stage", "sft", "--config", str(TINY), "--out", str(out),
            "--set", "sft.max_steps=6", "--set", "checkpoint.every=2", "--set", "log.progress=false", *
            [a for s in sets for a in ("--set", s)]]


def _run(out, *sets, timeout=120):
    r = subprocess.run(_cmd(out, *sets), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _run_until_fault(out, fault, timeout=120):
    """Start a run with PSYCHE_FAULT=...:sleep, wait for it to reach that point, SIGKILL it."""
    env = {**os.environ, "PSYCHE_FAULT": fault}
    p = subprocess.Popen(_cmd(out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if line.startswith("PSYCHE_FAULT"):
                os.kill(p.pid, signal.SIGKILL)
                break
    finally:
        timer.cancel()
        p.wait()
    assert p.returncode == -signal.SIGKILL, "".join(lines[-30:])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    log = _run(out, "log.tensorboard=true")
    return out, log


def test_cli_writes_config_metrics_checkpoints_and_export(reference_run):
    import transformers

    out, log = reference_run
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tok_per_s"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "step 6/6 | loss" in log and "| gnorm" in log and "tok/s" in log
    cfg = load_run_config(out / "config.toml")
    assert cfg.sft.max_steps == 6 and cfg.run.out == str(out)
    assert [p.name for p in list_checkpoints(out)] == ["step_00000004", "step_00000006"]
    assert any((out / "tb").iterdir())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    assert hf.config.vocab_size > 0


def test_sigkill_mid_checkpoint_and_mid_run_then_resume_is_exact(reference_run, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "run"
    # 1) killed while writing the step-4 checkpoint: step 2 stays the latest and loads
    _run_until_fault(out, "ckpt_write@4:sleep")
    assert latest_checkpoint(out).name == "step_00000002"
    assert list((out / "checkpoints").glob(".step_00000004*")), "the half-written checkpoint should be hidden"
    model = build_model_for_training(out / "init", CPU)
    assert load_checkpoint(latest_checkpoint(out), model=model)["step"] == 2
    # 2) resumed, then killed after step 5 (its last checkpoint is step 4)
    _run_until_fault(out, "step_end@5:sleep")
    assert latest_checkpoint(out).name == "step_00000004"
    assert not list((out / "checkpoints").glob(".step_*")), "leftover temporaries are cleaned by the next save"
    # 3) resumed to the end: every loss equals the uninterrupted run's, bit for bit, each step logged once
    log = _run(out)
    assert "resumed from" in log and "at step 4" in log
    got, want = read_metrics(out), read_metrics(ref_out)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]


def test_non_finite_loss_stops_without_touching_the_last_checkpoint(tmp_path, monkeypatch):
    from psyche import kernels

    orig, calls = kernels.token_logprobs, [0]

    def poisoned(*a, **kw):  # finite for steps 1-2 (2 micro-batches each), NaN from step 3
        calls[0] += 1
        lp, ent = orig(*a, **kw)
        return (lp * float("nan"), ent) if calls[0] > 4 else (lp, ent)

    monkeypatch.setattr(kernels, "token_logprobs", poisoned)
    cfg = load_run_config(TINY, ["sft.max_steps=6", "checkpoint.every=2", "log.progress=false",
                                 f"run.out={json.dumps(str(tmp_path))}"])
    cfg.data.paths = [str(DATA)]
    with pytest.raises(NonFiniteLossError) as e:
        with contextlib.chdir(ROOT):
            run_sft(cfg)
    msg = str(e.value)
    assert "step 3: non-finite loss nan" in msg and "step_00000002 (untouched)" in msg
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert not (tmp_path / "hf").exists()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sft(out, *sets, on_step=None):
    cfg = load_run_config(TINY, ["checkpoint.every=2", "checkpoint.export=false", "log.progress=false",
                                 f"run.out={json.dumps(str(out))}", *sets])
    cfg.data.paths = [str(DATA)]
    with contextlib.chdir(ROOT):
        return run_sft(cfg, on_step=on_step)


def test_resume_refuses_settings_that_would_silently_revert_to_the_checkpoints(tmp_path):
    """Loading a checkpoint puts its LR schedule and AdamW settings back: a config that changes them (a longer
    cosine run, another lr or weight decay) is one ConfigError naming the change, and nothing is written."""
    from psyche.config import ConfigError

    class Stop(Exception):
        pass

    def stop_after_2(step, model):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):  # 2 of 4 steps done and checkpointed
        _sft(tmp_path, "sft.max_steps=4", on_step=stop_after_2)
    before = _tree(tmp_path)
    for change, msg in (("sft.max_steps=6", "(total steps 4 -> 6)"), ("optim.lr=0.006", "(lr 0.003 -> 0.006)"),
                        ("optim.warmup_steps=2", "(warm-up steps 1 -> 2)"),
                        ("optim.weight_decay=0.1", "(weight_decay 0.0 -> 0.1)")):
        with pytest.raises(ConfigError) as e:
            _sft(tmp_path, "sft.max_steps=4", change)
        assert str(e.value).startswith(f"cannot resume {tmp_path}/checkpoints/step_00000002 exactly: the config "
                                       f"changes what it was trained with {msg}, and resuming"), str(e.value)
        assert _tree(tmp_path) == before
    _sft(tmp_path, "sft.max_steps=4")  # unchanged: resumes
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_resume_extends_a_constant_schedule_with_the_configs_total(tmp_path):
    """A change that gives no step still to train another LR is taken, and the config's schedule carried on."""
    const = ['optim.schedule="constant"', "optim.warmup_steps=1"]
    _sft(tmp_path, "sft.max_steps=2", *const)
    _sft(tmp_path, "sft.max_steps=4", *const)
    assert [r["lr"] for r in read_metrics(tmp_path)] == [3e-3] * 4
    trainer = torch.load(latest_checkpoint(tmp_path) / "trainer_state.pt", weights_only=True)
    assert trainer["scheduler"]["lr_lambdas"][0]["total"] == 4


def test_a_fresh_run_refuses_a_run_directory_that_holds_checkpoints(tmp_path):
    """checkpoint.resume=false over an earlier run's checkpoints would mix with them and prune them: one line, before
    anything is read or written."""
    from psyche.config import ConfigError

    _sft(tmp_path, "sft.max_steps=2")
    before = _tree(tmp_path)
    with pytest.raises(ConfigError) as e:
        _sft(tmp_path, "sft.max_steps=2", "checkpoint.resume=false")
    assert str(e.value).startswith(f"checkpoint.resume=false, but {tmp_path}/checkpoints holds checkpoints of an "
                                   "earlier run (the latest step_00000002): ")
    assert _tree(tmp_path) == before
    _sft(tmp_path / "fresh", "sft.max_steps=2", "checkpoint.resume=false")  # a new directory: fine
    assert [p.name for p in list_checkpoints(tmp_path / "fresh")] == ["step_00000002"]


def test_bad_inputs_fail_cleanly_from_the_cli(tmp_path):
    from click.testing import CliRunner

    sys.path.insert(0, str(ROOT))
    import train

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{"mess\n')
    for sets, msg in (([f"data.paths=[{json.dumps(str(bad))}]"], f"Error: {bad}:2: invalid JSON"),
                      (["sft.micro=3"], "Error: --set sft.micro=3: unknown key 'micro' in sft"),
                      (["optim.lr=fast"], "optim.lr: expected float, got str 'fast'")):
        with contextlib.chdir(ROOT):
            r = CliRunner().invoke(train.main, _cmd(tmp_path / "r", *sets)[2:])
        assert r.exit_code == 1 and msg in r.output, r.output


# ---- metrics ----

def test_metrics_logger_and_step_line(tmp_path):
    log = MetricsLogger(tmp_path)
    for s in range(1, 5):
        log.log(s, {"loss": 1.0 / s, "nan": float("nan"), "t": torch.tensor(2.5)})
    log.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["nan"] == "nan" and rows[0]["t"] == 2.5
    MetricsLogger(tmp_path, resume_step=2).close()  # resuming at step 2 drops the later lines
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    line = step_line({"loss": 2.3141, "lr": 1e-5, "grad_norm": 0.912, "tok_per_s": 12345.0, "kl": 0.00123},
                     step=12, total=100, elapsed=83)
    assert line == "step 12/100 | loss 2.314 | lr 1.0e-05 | gnorm 0.91 | tok/s 12.3k | kl 0.00123 | 0:01:23"
    assert not MetricsLogger(tmp_path / "x", enabled=False).enabled and not (tmp_path / "x").exists()
