"""psyche plot / compare / replay: series and seed bands, the compare table's numbers, pass-rate heat maps, and
replay of a dumped GRPO step reproducing the logged loss exactly on CPU."""

import json
import math
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from psyche.analysis import (REPLAY_KEYS, compare_table, find_runs, pass_rate_matrix, plot_runs, replay, run_info,
                             seed_band, series, summarize)
from psyche.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-grpo.toml"


def _write_run(d: Path, rows):
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_series_tokens_and_smoothing():
    grpo = [{"step": s, "tokens": 10 * s, "update_tokens": 10 * s, "reward_mean": float(s)} for s in (1, 2, 3)]
    x, y = series(grpo, "reward_mean", "tokens")
    assert x.tolist() == [10, 30, 60] and y.tolist() == [1, 2, 3]  # GRPO logs each step's tokens: summed
    sft = [{"step": s, "tokens": 100 * s, "loss": 4.0 - s} for s in (1, 2, 3)]
    assert series(sft, "loss", "tokens")[0].tolist() == [100, 200, 300]  # SFT logs the running total
    assert series(grpo, "reward_mean", smooth=2)[1].tolist() == [1.0, 1.5, 2.5]
    rows = [{"step": 1, "kl": "nan"}, {"step": 2}, {"step": 3, "kl": 0.5}]
    x, y = series(rows, "kl")
    assert x.tolist() == [1, 3] and math.isnan(y[0])


def test_seed_band_mean_min_max():
    a = (np.array([1.0, 2, 3]), np.array([0.0, 1, 2]))
    b = (np.array([1.0, 2, 3, 4]), np.array([2.0, 3, 4, 5]))
    grid, mean, lo, hi = seed_band([a, b])
    assert grid.tolist() == [1, 2, 3]  # the range both seeds cover
    assert mean.tolist() == [1, 2, 3] and lo.tolist() == [0, 1, 2] and hi.tolist() == [2, 3, 4]


def test_compare_table_numbers_and_cells(tmp_path):
    for seed, rewards in ((0, [0.1, 0.5, 0.3]), (1, [0.2, 0.4, 0.6])):
        _write_run(tmp_path / "adv=grpo" / f"seed{seed}",
                   [{"step": i + 1, "reward_mean": r, "kl": 0.01 * (3 - i)} for i, r in enumerate(rewards)])
    _write_run(tmp_path / "lonely", [{"step": 1, "reward_mean": 0.7}])
    runs = find_runs([tmp_path])
    assert [run_info(r)["label"] for r in runs] == ["adv=grpo/seed0", "adv=grpo/seed1", "lonely"]
    assert summarize(read_metrics(runs[0]), "kl") == {"final": 0.01, "best": 0.01, "best_step": 3}  # lower is better
    table = compare_table(runs, ["reward_mean", "kl"])
    assert "| adv=grpo/seed0 | 3 | 0.3 | 0.5 @2 | 0.01 | 0.01 @3 |" in table
    assert "| lonely | 1 | 0.7 | 0.7 @1 | – | – |" in table
    sd = math.sqrt(((0.3 - 0.45) ** 2 + (0.6 - 0.45) ** 2))
    assert f"| adv=grpo | 2 | 0.45 ± {sd:.4g} | 0.55 ± {math.sqrt(0.005):.4g} |" in table
    assert "| lonely | 1 |" not in table.split("| cell |")[1]  # cells with one run are only in the run table
    png = plot_runs(runs, ["reward_mean", "missing_metric"], "step", tmp_path / "p.png", smooth=2, title="t")
    assert png.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "empty").mkdir()
    with pytest.raises(click.ClickException, match="no metrics.jsonl"):
        find_runs([tmp_path / "empty"])


def test_pass_rate_matrix_order_and_bins():
    rows = [{"step": 1, "pass_rate": {"a": 0.0, "b": 1.0}}, {"step": 2, "pass_rate": {"a": 0.5, "c": 0.2}},
            {"step": 3, "pass_rate": {"b": 0.5}}]
    ids, steps, M = pass_rate_matrix(rows)
    assert ids == ["b", "a", "c"] and steps == [1, 2, 3]  # by mean pass rate, highest first
    assert M[0, 0] == 1.0 and math.isnan(M[0, 1]) and M[1, 1] == 0.5
    ids, steps, M = pass_rate_matrix(rows, max_cols=2)
    assert M.shape == (3, 2) and steps[-1] == 3
    assert M[ids.index("a"), 0] == 0.0  # step 1 alone in the first column


# ---- replay ----

@pytest.fixture(scope="module")
def dumped_run(tmp_path_factory, tiny_ckpt):
    """Two GRPO steps (two optimizer steps each, so step 2 starts from a live AdamW state), step 2 dumped."""
    out = tmp_path_factory.mktemp("replay") / "run"
    sets = ["log.progress=false", "grpo.steps=2", "grpo.prompts_per_step=4", "grpo.mini_batch=2",
            "grpo.micro_batch=3", "grpo.max_new_tokens=8", "grpo.entropy_coef=0.01", "grpo.diagnostics=true",
            "grpo.replay_steps=[2]", "checkpoint.every=0", "checkpoint.export=false", f'model.init="{tiny_ckpt}"']
    cmd = [sys.executable, "train.py", "--stage", "grpo", "--config", str(TINY), "--out", str(out),
           *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_replay_reproduces_the_logged_step_exactly(dumped_run, tmp_path):
    dump = dumped_run / "replay" / "step_0002"
    names = {p.name for p in dump.iterdir()}
    assert {"batch_rank0.safetensors", "batch_rank0.json", "step.json", "config.toml", "logged.json",
            "checkpoints"} <= names
    logged = read_metrics(dumped_run)[1]
    assert logged["step"] == 2 and json.loads((dump / "logged.json").read_text())["loss"] == logged["loss"]
    r = replay(dump, diagnostics=True, grad_out=tmp_path / "g.safetensors")
    rep = r["replayed"]
    assert rep["optimizer_steps"] == 2
    assert rep["loss"] == logged["loss"]  # bit for bit
    for k in REPLAY_KEYS + ("pg_loss/seq-mean-token-sum", "entropy/adv_pos"):
        assert rep[k] == logged[k], k
    g = load_file(str(tmp_path / "g.safetensors"))
    norm = float(torch.stack([v.norm() ** 2 for v in g.values()]).sum().sqrt())
    assert norm == pytest.approx(r["first"]["grad_norm"], rel=1e-6) and norm > 0
    again = replay(dump)  # deterministic
    assert again["first"] == r["first"] and again["replayed"]["grad_norm"] == rep["grad_norm"]


def test_replay_of_a_bf16_run_uses_its_autocast_and_a_dump_without_weights_is_an_error(tiny_ckpt, tmp_path):
    """model.dtype = bfloat16 on the CPU: the run's forwards ran under bf16 autocast, so replay's must too to
    give the logged loss bit for bit. A dump whose checkpoint is gone is a one-line error, not a traceback."""
    import shutil

    from psyche.data import DataError

    out = tmp_path / "run"
    sets = ["log.progress=false", "grpo.steps=1", "grpo.prompts_per_step=4", "grpo.mini_batch=2",
            "grpo.max_new_tokens=8", "grpo.replay_steps=[1]", "checkpoint.every=0", "checkpoint.export=false",
            f'model.init="{tiny_ckpt}"', 'model.dtype="bfloat16"']
    cmd = [sys.executable, "train.py", "--stage", "grpo", "--config", str(TINY), "--out", str(out),
           *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    dump = out / "replay" / "step_0001"
    assert replay(dump)["replayed"]["loss"] == read_metrics(out)[0]["loss"]
    shutil.rmtree(dump / "checkpoints")
    with pytest.raises(DataError, match="no complete checkpoint"):
        replay(dump)


def test_replay_command_and_check(dumped_run, tmp_path):
    import shutil

    from click.testing import CliRunner

    from psyche.cli import main

    dump = dumped_run / "replay" / "step_0002"
    r = CliRunner().invoke(main, ["replay", str(dump), "--check"])
    assert r.exit_code == 0, r.output
    assert "replay of step 2" in r.output and "exact" in r.output.splitlines()[2]
    # a dump whose logged loss was tampered with fails --check
    bad = tmp_path / "step_0002"
    shutil.copytree(dump, bad)
    logged = json.loads((bad / "logged.json").read_text())
    logged["loss"] += 1e-9
    (bad / "logged.json").write_text(json.dumps(logged))
    r = CliRunner().invoke(main, ["replay", str(bad), "--check"])
    assert r.exit_code == 1 and "!= logged" in r.output


def test_read_metrics_skips_a_cut_last_line_and_names_a_bad_one(tmp_path):
    from psyche.data import DataError
    from psyche.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a metrics row"):
        read_metrics(tmp_path)
