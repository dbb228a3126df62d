"""The GRPO lab: its teachers, its bench, the new rollout metrics, and a reduced ablation end to end."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

import psyche.lab_report as lab_report
from psyche.lab import (CONFUSIONS, STYLES, BenchSize, LabTeacher, can_fail, confusable, misread, parse_knob,
                        parse_seeds, write_rationale)
from psyche.lab_report import sign_test_p, verdict
from psyche.task import explain, make_splits


def test_the_teachers_misread_style_and_answer_consistently():
    train, _ = make_splits(seed=0, n_train=400, n_test=40)
    t, rng = LabTeacher(), random.Random(0)
    lengths, styles = [], set()
    for it in train[:200]:
        text, answer = t.write(it, rng)
        think, _, after = text.removeprefix("<think>").partition("</think>")
        assert after == answer  # the answer is the letters the rationale reached
        styles.add("check" if "复核" in think else "options" if "\nA." in think else "brief")
        lengths.append(len(text))
    assert styles == set(STYLES)
    mean = sum(lengths) / len(lengths)
    assert (sum((x - mean) ** 2 for x in lengths) / len(lengths)) ** 0.5 / mean > 0.2  # length is the style's
    # a misreading applies to the facts it names and nothing else; can_fail says whether one changes the answer
    for it in train[:200]:
        idx = confusable(it)
        assert misread(it, []) == explain.__globals__["case_of"](it).scores
        if not idx:
            assert not can_fail(it)
        flips = any(explain(it, misread(it, [i]))[1] != it.answer for i in idx)
        assert can_fail(it) >= flips
    # every confusion is a real change of one score
    assert all(true != wrong and 0 < p < 1 for _, true, wrong, p in CONFUSIONS)


def test_write_rationale_takes_each_verb_in_its_clause():
    train, _ = make_splits(seed=1, n_train=40, n_test=8)
    it = train[0]
    text, _ = write_rationale(it, explain.__globals__["case_of"](it).scores, "brief", ("计", "记", "评"))
    assert "病程" in text and "，计" in text and "，记" in text and text.count("\n") == 0


def test_rollout_stats_log_length_by_outcome_pass_rates_and_group_length_spread():
    from psyche.grpo.step import rollout_stats

    acc = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])  # groups of 4: pass rates 0.25, 1, 0
    lengths = torch.tensor([10, 20, 30, 40, 5, 5, 5, 5, 8, 12, 8, 12])
    st = rollout_stats(acc, torch.zeros(12), lengths, torch.ones(12, dtype=torch.bool), {"accuracy": acc}, 4)
    assert st["length_correct_mean"] == pytest.approx((10 + 5 * 4) / 5)
    assert st["length_incorrect_mean"] == pytest.approx((20 + 30 + 40 + 8 + 12 + 8 + 12) / 7)
    assert st["pass_rate_mean"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert st["pass_rate_p50"] == pytest.approx(0.25)
    assert st["pass_all_wrong_frac"] == pytest.approx(1 / 3) and st["pass_all_right_frac"] == pytest.approx(1 / 3)
    cv = [torch.tensor([10., 20, 30, 40]), torch.tensor([5., 5, 5, 5]), torch.tensor([8., 12, 8, 12])]
    assert st["length_cv_in_group"] == pytest.approx(float(sum(x.std() / x.mean() for x in cv) / 3), rel=1e-6)
    none_right = rollout_stats(acc * 0, torch.zeros(12), lengths, torch.ones(12, dtype=torch.bool),
                               {"accuracy": acc * 0}, 4)
    assert "length_correct_mean" not in none_right and none_right["pass_all_wrong_frac"] == 1.0


def test_knobs_seeds_and_verdicts_parse():
    assert parse_knob("grpo.clip_high=0.2,0.28") == (["grpo.clip_high"], [["0.2"], ["0.28"]])
    assert parse_knob("grpo.advantage+grpo.loss_agg=grpo+seq-mean-token-mean,dr_grpo+seq-mean-token-sum-norm")[1] == \
        [["grpo", "seq-mean-token-mean"], ["dr_grpo", "seq-mean-token-sum-norm"]]
    with pytest.raises(ValueError, match="one part per key"):
        parse_knob("a+b=1,2+3")
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    assert verdict("x", [0.1, 0.2, 0.3, -0.1, 0.2]).startswith("x: higher on 4/5")
    assert verdict("x", [0.1, -0.2, 0.3]).startswith("x: no consistent difference")
    assert verdict("x", [-1.0, -2.0, -3.0]).startswith("x: lower on 3/3")
    # 4 of 5 up but the mean down (one large fall): no direction is claimed
    assert verdict("x", [0.001, 0.002, -0.03, 0.002, 0.001]).startswith("x: no consistent difference")
    assert sign_test_p(5, 0) == 2 / 32 and sign_test_p(4, 1) == 12 / 32 and sign_test_p(0, 0) == 1.0


def test_a_reduced_ablation_writes_a_well_formed_report_and_resumes(tmp_path, monkeypatch):
    """Two values x two seeds on a tiny bench (short SFT, two GRPO steps): the report's table has every end point
    with its spread and the paired differences, a verdict per metric, and the curves' plot; rerun, no cell
    is run again."""
    import psyche.lab as lab

    size = BenchSize(n_train=240, n_test=8, sft_steps=4)
    extra = ("grpo.steps=2", "grpo.prompts_per_step=4", "grpo.mini_batch=2", "grpo.exact_kl_rows=4",
             "grpo.max_new_tokens=48")
    rep = lab.run_ablation("grpo.group_size=4,2", [0, 1], tmp_path, extra=extra, size=size, log=lambda m: None)
    d = tmp_path / "group_size"
    md = (d / "report.md").read_text()
    assert rep["labels"] == ["4", "2"] and set(rep["table"]["2"]) == set(lab_report.POINTS)
    for k in lab_report.POINTS:
        assert f"| {k} |" in md
        assert len(rep["paired_vs_first"]["2"][k]) == 2
    assert len(rep["verdicts"]["2"]) == len(lab_report.POINTS) and "Verdicts:" in md
    for png in ("curves.png", "accuracy_per_sample.png"):
        assert (d / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    zv = {r["group_size"]: r for r in rep["zero_variance_step1"]}  # p^G + (1-p)^G from the G = 4 pass counts
    assert set(zv) == {2, 4} and all(0 <= x <= 1 for r in zv.values() for x in r["measured"] + r["predicted"])
    assert all(a >= b for a, b in zip(zv[2]["predicted"], zv[4]["predicted"]))  # smaller groups: more often uniform
    assert zv[4]["measured"] == pytest.approx(zv[4]["predicted"])  # the largest group predicts itself exactly
    assert "p_two_sided" not in zv[4] and 0 < zv[2]["p_two_sided"] <= 1 and zv[2]["groups"] == 2 * 4
    assert "exact test, two-sided p" in md
    assert json.loads((d / "report.json").read_text())["seeds"] == [0, 1]
    cell = json.loads(next((tmp_path / "cells").glob("*/s0/cell.json")).read_text())
    assert "train.py --stage grpo --config configs/lab-grpo.toml" in cell["command"]

    def fail(*a, **k):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(lab.subprocess, "run", fail)
    lab.run_ablation("grpo.group_size=4,2", [0, 1], tmp_path, extra=extra, size=size, log=lambda m: None)
    assert (d / "report.md").read_text() == md
    assert Path(tmp_path / "bench" / "s1" / "sft" / "hf" / "config.json").is_file()


def test_end_points_read_every_sampled_group_and_never_divide_by_zero_samples(tmp_path):
    """cell_points on a hand-made run: training accuracy and zero variance from what was sampled (as dynamic
    sampling logs them before keeping only mixed groups), the means over the last steps, the incorrect
    length's change over the first and last steps, NaN (JSON null) for a per-sample gain without samples."""
    from psyche.config import RunConfig, to_toml

    d = tmp_path / "cells" / "default" / "s0" / "grpo"
    d.mkdir(parents=True)
    cfg = RunConfig()
    cfg.grpo.group_size = 4
    (d / "config.toml").write_text(to_toml(cfg))
    rows = [{"step": i + 1, "accuracy": 0.9, "accuracy_sampled": 0.1 * i, "zero_std_frac": 0.0,
             "zero_std_frac_sampled": 0.5, "entropy": 1.0 - 0.1 * i, "length_incorrect_mean": 10.0 + i,
             "prompts_drawn": 3} for i in range(10)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cell = {"sets": [], "seed": 0, "heldout_accuracy": 0.5, "sft_heldout": 0.25, "wall_s": 1.0}
    p = lab_report.cell_points(tmp_path, cell)
    assert p["train_accuracy_end"] == pytest.approx(0.7)  # mean of 0.5 .. 0.9 (accuracy_sampled)
    assert p["zero_std_frac_step1"] == 0.5 and p["entropy_start"] == 1.0
    assert p["length_incorrect_change"] == pytest.approx(5.0)  # mean(15..19) - mean(10..14)
    assert p["generated_samples"] == 120 and p["heldout_per_1k_samples"] == pytest.approx(1000 * 0.25 / 120)
    (d / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "prompts_drawn"}) + "\n"
                                             for r in rows))
    p = lab_report.cell_points(tmp_path, cell)
    assert math.isnan(p["heldout_per_1k_samples"])
    assert lab_report._nan_to_null({"a": [p["heldout_per_1k_samples"], 1.0]}) == {"a": [None, 1.0]}


def test_the_uniform_groups_test_is_the_exact_distribution_of_random_subsets():
    """Against brute force: pool each prompt's n + G outcomes, take every G-subset as the small group, count the
    uniform ones over prompts; the test's expectation and two-sided p are that distribution's."""
    import itertools

    from psyche.lab_report import uniform_groups_test

    n, G = 4, 2
    pairs = [(1, 0), (3, 1), (4, 2)]  # per prompt: right of n, right of G
    counts = {}
    subsets = [list(itertools.combinations(range(n + G), G)) for _ in pairs]
    for choice in itertools.product(*subsets):
        c = 0
        for (k, g), sub in zip(pairs, choice):
            right = sum(i < k + g for i in sub)  # the first k + g of the pooled samples are the right ones
            c += right in (0, G)
        counts[c] = counts.get(c, 0) + 1
    total = sum(counts.values())
    pmf = [counts.get(i, 0) / total for i in range(len(pairs) + 1)]
    obs = 2  # (1, 0) all wrong, (4, 2) all right
    want = min(1.0, 2 * min(sum(pmf[:obs + 1]), sum(pmf[obs:])))
    got = uniform_groups_test(pairs, n, G)
    assert got["uniform_groups"] == obs and got["groups"] == 3
    assert got["expected"] == pytest.approx(sum(i * q for i, q in enumerate(pmf)))
    assert got["p_two_sided"] == pytest.approx(want)
    assert uniform_groups_test([(16, 4)] * 3, 16, 4) == {"uniform_groups": 3, "groups": 3, "expected": 3.0,
                                                         "p_two_sided": 1.0}


def test_an_ablation_without_matplotlib_stops_before_any_cell_runs(tmp_path, monkeypatch):
    """The report needs matplotlib (the `plot` extra): a sweep without it says so at once, not after its cells."""
    import sys

    import click

    import psyche.lab as lab

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    with pytest.raises(click.ClickException, match=r"pip install 'psyche\[plot\]'"):
        lab.run_ablation("grpo.group_size=4,2", [0], tmp_path, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []
