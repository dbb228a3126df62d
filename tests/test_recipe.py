"""The embedded default, reduced to a few steps: every stage runs, the artefacts are there and well-formed, the
data stage routes items as the teachers' answers say, and the same seed gives the same table twice."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["recipe.n_train=240", "recipe.n_test_challenge=8", "recipe.n_test_other=16", "recipe.sft_steps=3",
         "recipe.control_steps=3", "recipe.max_new_tokens=20", "recipe.eval_batch=100", "recipe.samples=1",
         "grpo.steps=2", "grpo.prompts_per_step=8", "grpo.group_size=4", "grpo.max_new_tokens=20",
         "log.progress=false", "recipe.curve_every=2", "recipe.curve_items=6"]


def _run(out, *extra):
    cmd = [sys.executable, "train.py", "--out", str(out), *[a for s in SMALL + list(extra) for a in ("--set", s)]]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "run"
    return out, _run(out)


def _jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_every_stage_leaves_its_artefacts(run):
    out, log = run
    for d in ("sft/hf", "grpo/hf", "control/hf"):
        assert (out / d / "config.json").is_file(), d
    for f in ("data/test.jsonl", "data/train.jsonl", "data/grpo.jsonl", "data/sft.jsonl", "data/selection.json",
              "grpo/metrics.jsonl", "sft/metrics.jsonl", "sft/curve.jsonl", "grpo/rollouts.jsonl", "report.md",
              "plots/sft_loss.png", "plots/grpo.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    report = json.loads((out / "report.json").read_text())
    for name in ("base", "sft", "control", "grpo"):
        assert {"smcq_acc", "mmcq_strict", "mmcq_elastic", "format_rate", "sft_type_acc", "challenge_acc",
                "response_length", "right_reading_greedy", "right_reading_sampled"} <= set(report[name])
        assert all(0 <= report[name][k] <= 100 for k in ("smcq_acc", "mmcq_strict", "format_rate"))
    assert set(report["timings_s"]) == {"data", "sft", "grpo", "control", "eval"}
    table = (out / "report.md").read_text()
    assert table.count("\n") == 13 and "SFT + GRPO" in table and "right reading" in table
    assert (out / "plots" / "grpo.png").read_bytes()[:4] == b"\x89PNG"
    curve = _jsonl(out / "sft" / "curve.jsonl")
    assert [r["step"] for r in curve] == [2, 3] and {"course", "lines", "right_reading_sampled"} <= set(curve[0])


def test_data_stage_routes_items_as_the_teachers_answer(run):
    """The challenge pool is exactly the items the slip answers wrong; the SFT data is every other item, each
    with the teacher's sampled rationale (the slip in about 70% of those where it applies, nowhere else); the
    GRPO prompts are the challenge pool balanced per type and gold letter, then SFT-data prompts mixed in."""
    from psyche.recipe import read_items
    from psyche.task import explain, is_challenge, slip, case_of, slip_applies, sft_target

    out, _ = run
    train = {it.id: it for it in read_items(out / "data" / "train.jsonl")}
    sft = _jsonl(out / "data" / "sft.jsonl")
    assert {r["id"] for r in sft} == {i for i, it in train.items() if not is_challenge(it)}
    slipped = []
    for r in sft:
        it, reply = train[r["id"]], r["messages"][-1]["content"]
        assert reply in (sft_target(it), sft_target(it, explain(it, slip(case_of(it).scores))[0]))
        assert reply.endswith("</think>" + it.answer)
        if slip_applies(it):
            slipped.append(reply != sft_target(it))
        else:
            assert reply == sft_target(it)
    assert len(slipped) > 10 and 0.4 < sum(slipped) / len(slipped) < 0.95
    sel = json.loads((out / "data" / "selection.json").read_text())
    assert sum(sel["challenge"].values()) == sum(map(is_challenge, train.values()))
    grpo = _jsonl(out / "data" / "grpo.jsonl")
    head, tail = grpo[: sel["grpo_challenge"]], grpo[sel["grpo_challenge"]:]
    assert all(r["challenge"] for r in head) and not any(r["challenge"] for r in tail)
    assert len(tail) == sel["grpo_mixed_in"] > 0 and all(r["answer"] == train[r["id"]].answer for r in grpo)
    cells = {}
    for r in head:
        cells.setdefault(r["type"], Counter())[r["answer"]] += 1
    assert cells and all(len(set(c.values())) == 1 for c in cells.values()), cells
    test = read_items(out / "data" / "test.jsonl")
    assert [is_challenge(it) for it in test] == [True] * 8 + [False] * 16
    assert not {it.ref for it in test} & {it.ref for it in train.values()}


def test_rerun_resumes_and_same_seed_gives_the_same_table(run, tmp_path):
    out, _ = run
    again = _run(out)  # everything exists: nothing is retrained
    assert "already trained" in again and "data: already made" in again
    fresh = tmp_path / "fresh"
    _run(fresh)
    a = json.loads((out / "report.json").read_text())
    b = json.loads((fresh / "report.json").read_text())
    for name in ("base", "sft", "control", "grpo"):
        assert a[name] == b[name], name
    assert (out / "sft" / "curve.jsonl").read_text() == (fresh / "sft" / "curve.jsonl").read_text()


def test_the_curve_does_not_change_the_sft_model(run, tmp_path):
    """The learning curve's greedy evaluations draw no random numbers: the SFT model is the same without it."""
    out, _ = run
    plain = tmp_path / "plain"
    _run(plain, "recipe.curve_every=0")
    assert (plain / "sft" / "hf" / "model.safetensors").read_bytes() == \
        (out / "sft" / "hf" / "model.safetensors").read_bytes()
    assert not (plain / "sft" / "curve.jsonl").exists()


def test_task_eval_scores_a_checkpoint_as_the_report_does(run, tmp_path):
    from click.testing import CliRunner

    from psyche.recipe import task_eval_cmd

    out, _ = run
    res = CliRunner().invoke(task_eval_cmd, [str(out), str(out / "sft" / "hf"), "--max-new-tokens", "20",
                                           "--samples", "1", "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "m.json").read_text())[str(out / "sft" / "hf")]
    assert got == json.loads((out / "report.json").read_text())["sft"]
    assert str(out / "sft" / "hf") in res.output
    bad = CliRunner().invoke(task_eval_cmd, [str(tmp_path), str(out / "sft" / "hf")])
    assert bad.exit_code != 0 and "no test set" in bad.output and str(tmp_path) in bad.output


@pytest.mark.parametrize("key", ["recipe.n_train=0", "recipe.teacher_confusion=1.5", "recipe.grpo_mix=1.0",
                                 "recipe.sft_steps=-1", "recipe.control_lr=0", "recipe.base=/nonexistent"])
def test_bad_recipe_settings_are_named_before_anything_is_written(key, tmp_path):
    from psyche import recipe
    from psyche.config import ConfigError, load_run_config

    cfg = load_run_config(None, [key, f"run.out={json.dumps(str(tmp_path / 'run'))}"], cls=recipe.embedded_config)
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        recipe.run_recipe(cfg, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_test_set_too_large_for_the_held_out_facts_is_a_config_error(tmp_path):
    from psyche import recipe
    from psyche.config import ConfigError, load_run_config

    cfg = load_run_config(None, [f"run.out={json.dumps(str(tmp_path / 'run'))}", "recipe.n_test_challenge=5000"],
                          cls=recipe.embedded_config)
    with pytest.raises(ConfigError, match="recipe.n_test_challenge"):
        recipe.run_recipe(cfg, log=lambda *a: None)


def test_sft_trains_on_the_prompt_tokens_that_evaluation_and_grpo_generate_from(run):
    """SFT's samples start with exactly the tokens that evaluation and GRPO feed the model before it replies
    (a system turn in one and not the other would put every reply after a prompt SFT never showed)."""
    from psyche.base import BASE_DIR
    from psyche.data import tokenize
    from psyche.grpo.loop import load_prompts
    from psyche.recipe import embedded_config, read_items
    from psyche.task import task_prompt
    from psyche.tokenizer import Tokenizer

    out, _ = run
    cfg, tok = embedded_config(), Tokenizer.from_dir(BASE_DIR)
    train = {it.id: it for it in read_items(out / "data" / "train.jsonl")}
    grpo = {p["item"]["id"]: p["ids"] for p in load_prompts([out / "data" / "grpo.jsonl"], tok)[0]}
    think = tok.token_to_id("<think>")
    for rec in _jsonl(out / "data" / "sft.jsonl")[:20]:
        s = tokenize([(rec["messages"], "x")], tok, cfg.data.max_length, cfg.data.truncation, cfg.data.system)
        ids, mask = list(s.ids[0]), list(s.mask[0])
        gen = tok.encode_chat(task_prompt(train[rec["id"]]), add_generation_prompt=True)[0]  # as evaluation
        assert ids[:len(gen)] == gen and not any(mask[:len(gen)]) and ids[len(gen)] == think and mask[len(gen)]
        if rec["id"] in grpo:
            assert grpo[rec["id"]] == gen
    assert set(grpo) & {r["id"] for r in _jsonl(out / "data" / "sft.jsonl")}  # the mixed-in prompts were checked
