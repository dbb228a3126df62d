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
         "recipe.hidden_size=64", "recipe.intermediate_size=128", "recipe.layers=2", "recipe.vocab=600",
         "recipe.seed_challenge=4"]


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
    # the seed set: every other SFT-type item and exactly `seed_challenge` challenge items, none of them in the pool
    seed = [json.loads(line) for line in open(out / "data" / "seed.jsonl")]
    assert Counter(r["type"] for r in seed)["social"] == 4 and len(seed) > 4
    pool_ids = {json.loads(line)["id"] for line in open(out / "data" / "pool.jsonl")}
    assert not pool_ids & {r["id"] for r in seed}
    assert json.loads((out / "data" / "summary.json").read_text())["seed_challenge_items"] == 4
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


def test_selection_routes_by_answer_and_rationale(tmp_path, monkeypatch):
    """stage_select with scripted selector replies: only an item answered with the rationale's option lines goes to
    the SFT data; a right letter without them (a guess) and a wrong answer go to the challenge pool."""
    from psyche import recipe
    from psyche.config import load_run_config
    from psyche.task import make_splits, sft_target

    cfg = load_run_config(None, [], cls=recipe.embedded_config)
    cfg.run.out = str(tmp_path)
    (tmp_path / "probe" / "hf").mkdir(parents=True)
    (tmp_path / "probe" / "hf" / "config.json").write_text("{}")  # the probe counts as trained
    pool, _ = make_splits(0, n_train=48, n_test=0)
    d = tmp_path / "data"
    d.mkdir()
    recipe._items_jsonl(d / "pool.jsonl", pool)
    recipe._items_jsonl(d / "seed.jsonl", [])
    kind = {it.id: i % 3 for i, it in enumerate(pool)}  # 0 reasoned, 1 guessed letter, 2 wrong letter

    def reply(it):
        gold = sft_target(it)
        if kind[it.id] == 0:
            return gold
        if kind[it.id] == 1:
            return gold.replace("√", "")  # the letter is right, no option was judged
        return gold.rsplit("</think>", 1)[0] + "</think>" + next(k for k in "ABCD" if k not in it.answer)

    monkeypatch.setattr(recipe, "answer_items", lambda model, items, **kw: {it.id: reply(it) for it in items})
    recipe.stage_select(cfg, tmp_path, log=lambda *a: None)
    non = {r["id"] for r in map(json.loads, open(d / "non_challenge.jsonl"))}
    chal = {r["id"] for r in map(json.loads, open(d / "challenge.jsonl"))}
    assert non == {i for i, k in kind.items() if k == 0}
    assert chal == {i for i, k in kind.items() if k != 0}
    sft_ids = {r["id"] for r in map(json.loads, open(d / "sft.jsonl"))}
    assert sft_ids == non  # the SFT data is the (empty) seed set plus what the selector solved


@pytest.mark.parametrize("key", ["recipe.seed_challenge=-1", "recipe.seed_every=0"])
def test_bad_seed_set_settings_are_named(key, tmp_path):
    from psyche import recipe
    from psyche.config import ConfigError, load_run_config

    cfg = load_run_config(None, [key], cls=recipe.embedded_config)
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        recipe.stage_data(cfg, tmp_path, log=lambda *a: None)
    assert not (tmp_path / "data").exists()
