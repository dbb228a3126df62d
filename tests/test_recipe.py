"""The embedded default, reduced to a few steps: every stage runs, the artefacts are there and well-formed,
and the same seed gives the same table twice."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["recipe.n_train=160", "recipe.n_test=24", "recipe.probe_steps=6", "recipe.sft_steps=3",
         "recipe.control_steps=3", "recipe.max_new_tokens=20", "recipe.eval_batch=100", "grpo.steps=2",
         "grpo.prompts_per_step=8", "grpo.group_size=4", "grpo.max_new_tokens=20", "log.progress=false",
         "recipe.hidden_size=64", "recipe.intermediate_size=128", "recipe.layers=2", "recipe.vocab=600"]


def _run(out, *extra):
    cmd = [sys.executable, "train.py", "--out", str(out), *[a for s in SMALL + list(extra) for a in ("--set", s)]]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "run"
    return out, _run(out)


def test_every_stage_leaves_its_artefacts(run):
    out, log = run
    for d in ("init", "probe/hf", "sft/hf", "grpo/hf", "control/hf"):
        assert (out / d / "config.json").is_file(), d
    for f in ("data/test.jsonl", "data/pool.jsonl", "data/grpo.jsonl", "data/sft.jsonl", "data/selection.json",
              "grpo/metrics.jsonl", "sft/metrics.jsonl", "grpo/rollouts.jsonl", "report.md",
              "plots/sft_loss.png", "plots/grpo.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    report = json.loads((out / "report.json").read_text())
    for name in ("base", "sft", "control", "grpo"):
        assert {"smcq_acc", "mmcq_strict", "mmcq_elastic", "format_rate", "sft_type_acc", "challenge_acc",
                "response_length"} <= set(report[name])
        assert all(0 <= report[name][k] <= 100 for k in ("smcq_acc", "mmcq_strict", "format_rate"))
    table = (out / "report.md").read_text()
    assert table.count("\n") == 6 and "SFT + GRPO" in table and "control" in table
    assert (out / "plots" / "grpo.png").read_bytes()[:4] == b"\x89PNG"
    sel = json.loads((out / "data" / "selection.json").read_text())
    pool = sum(1 for _ in open(out / "data" / "pool.jsonl"))
    assert sum(sel["challenge"].values()) + sum(sel["non_challenge"].values()) == pool
    grpo = [json.loads(line) for line in open(out / "data" / "grpo.jsonl")]
    assert grpo and all(r["answer"] and r["messages"][-1]["role"] == "user" for r in grpo)
    # the challenge part (first in the file) is balanced by gold answer within each type
    cells = {}
    for r in grpo[: sel["challenge_balanced"]]:
        cells.setdefault(r["type"], Counter())[r["answer"]] += 1
    assert cells and all(len(set(c.values())) == 1 for c in cells.values()), cells


def test_rerun_resumes_and_same_seed_gives_the_same_table(run, tmp_path):
    out, _ = run
    again = _run(out)  # everything exists: nothing is retrained
    assert "already trained" in again
    fresh = tmp_path / "fresh"
    _run(fresh)
    a = json.loads((out / "report.json").read_text())
    b = json.loads((fresh / "report.json").read_text())
    for name in ("base", "sft", "control", "grpo"):
        assert a[name] == b[name], name


def test_task_eval_scores_a_checkpoint_as_the_report_does(run, tmp_path):
    from click.testing import CliRunner

    from psyche.recipe import task_eval_cmd

    out, _ = run
    res = CliRunner().invoke(task_eval_cmd, [str(out), str(out / "sft" / "hf"), "--max-new-tokens", "20",
                                           "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "m.json").read_text())[str(out / "sft" / "hf")]
    assert got == json.loads((out / "report.json").read_text())["sft"]
    assert str(out / "sft" / "hf") in res.output and res.output.count("\n") == 3
    bad = CliRunner().invoke(task_eval_cmd, [str(tmp_path), str(out / "sft" / "hf")])
    assert bad.exit_code != 0 and "no test set" in bad.output and str(tmp_path) in bad.output
