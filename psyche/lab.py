"""The GRPO lab: a bench built so that GRPO's knobs have something to act on, and `psyche lab`, which runs an
ablation on it over seeds and writes a report.

The main job (psyche/recipe.py) was built to show that GRPO beats SFT, and it saturates in a few steps: its SFT
model is nearly deterministic (token entropy ~0.01), every reply has the same length, and one confusion is
all there is to learn. The lab keeps its world (Xu Youxin exam items, LLM teachers, an answer key, the shipped
base model) and changes the teachers, so that the mechanisms behind the published GRPO effects can act:

- several confusions, not one (`CONFUSIONS`): each teacher rationale misreads each confusable fact of the case
  with its own probability. An item's pass rate is then the chance that none of the misreadings that would
  change its answer happens, so pass rates spread out, and GRPO fixes the confusions one by one, at their own
  pace, instead of in one phase change;
- three styles of rationale, chosen at random (`STYLES`): the scoring line alone, the scoring line and one line
  per option, or those and a closing check. A reply's length is the policy's choice, not the item's, so a
  policy can drift longer or shorter;
- three ways of writing "scores" (评 / 计 / 记) in each clause: entropy that no reward cares about, which GRPO
  is free to collapse or keep.

The teachers' rationales are kept for SFT where their answer matches the key (Psyche-R1's filter), SFT runs
from the shipped base model, and GRPO (configs/lab-grpo.toml, frozen) trains on the items whose answer a
misreading can change, with the answer key and the format as rewards. A seed's data and SFT model are made
once (OUT/bench/s<seed>) and shared by every cell of every ablation.

    psyche lab grpo.clip_high=0.2,0.28 --seeds 0,1,2,3,4
    psyche lab grpo.advantage+grpo.loss_agg=grpo+seq-mean-token-mean,dr_grpo+seq-mean-token-sum-norm
    psyche lab grpo.group_size=4,8,16 --seeds 0-4 --name group-size

A value of the knob is a cell; cells with the same settings (the default, say) are run once and shared by every
ablation that has them (OUT/cells/<settings>/s<seed>, skipped when done), so a stopped sweep resumes. Each
cell's GRPO run is `python train.py --stage grpo --config configs/lab-grpo.toml --set ...` (its command is in
its cell.json), then a held-out greedy evaluation. The report (OUT/<name>/report.md, report.json, plots/) has
the end points per cell (mean and min-max over seeds), the paired per-seed differences from the first value,
curves with a band over seeds, and a one-line verdict per metric.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from psyche.pceb import Item
from psyche.task import balance, case_of, explain, group_by_type, item_type_of, make_splits, task_prompt

ROOT = Path(__file__).resolve().parents[1]
LAB_CONFIG = ROOT / "configs" / "lab-grpo.toml"

# Facts the teachers misread, each with the score it is misread as and how often: (which fact, the phrase or
# course bin, the true score, the misread score, probability).
CONFUSIONS = (("course", 2, 1, 0.6),  # a 3-12 month course read as under 3 months
              ("自己摆脱不了，需借助他人帮助", 2, 3, 0.6),  # 精神痛苦: moderate read as severe
              ("心里烦闷，能主动摆脱", 1, 2, 0.5),  # 精神痛苦: mild read as moderate
              ("不得不减少工作量", 2, 1, 0.6),  # 社会功能: moderate read as mild
              ("无法正常上班", 3, 2, 0.5))  # 社会功能: severe read as moderate
STYLES = ("brief", "options", "check")  # the scoring line; + a line per option; + a closing check
VERBS = ("评", "计", "记")  # how a clause says "scores"


def confusable(item: Item) -> list[int]:
    """Indices into CONFUSIONS of the misreadings that can happen on this item's case."""
    case = case_of(item)
    out = []
    for i, (fact, true, _, _) in enumerate(CONFUSIONS):
        if fact == "course":
            if case.scores[0] == true:
                out.append(i)
        elif fact in (case.phrase1, case.phrase2):
            out.append(i)
    return out


def misread(item: Item, which: list[int]) -> tuple[int, int, int]:
    """The case's scores with the misreadings `which` (indices into CONFUSIONS) applied."""
    case = case_of(item)
    c, a, b = case.scores
    for i in which:
        fact, _, wrong, _ = CONFUSIONS[i]
        if fact == "course":
            c = wrong
        elif fact == case.phrase1:
            a = wrong
        else:
            b = wrong
    return c, a, b


def can_fail(item: Item) -> bool:
    """Some misreading the teachers make changes this item's answer (GRPO's prompts and the held-out set)."""
    idx = confusable(item)
    subsets = [[i for k, i in enumerate(idx) if m >> k & 1] for m in range(1, 1 << len(idx))]
    return any(explain(item, misread(item, s))[1] != item.answer for s in subsets)


def write_rationale(item: Item, reading: tuple[int, int, int], style: str,
                    verbs: tuple[str, str, str]) -> tuple[str, str]:
    """(the reply a teacher writes reading the case as `reading`, in `style`, the answer it reaches)."""
    full, answer = explain(item, reading)  # scoring line + one line per option
    scoring, _, options = full.partition("\n")
    for k, verb in zip(("病程", "精神痛苦", "社会功能"), verbs):  # each clause's own verb
        head, sep, tail = scoring.partition(k)
        cut = tail.index("，评") + 1
        scoring = head + sep + tail[:cut] + verb + tail[cut + 1:]
    body = scoring if style == "brief" else scoring + "\n" + options
    if style == "check":
        total = sum(reading)
        body += f"\n复核：三项合计{total}分，选{answer}。"
    return f"<think>{body}</think>{answer}", answer


class LabTeacher:
    """A teacher that misreads each confusable fact with its CONFUSIONS probability, writes in a random style
    with random verbs, and answers from its reading."""

    def write(self, item: Item, rng: random.Random) -> tuple[str, str]:
        which = [i for i in confusable(item) if rng.random() < CONFUSIONS[i][3]]
        style = rng.choice(STYLES)
        verbs = tuple(rng.choice(VERBS) for _ in range(3))
        return write_rationale(item, misread(item, which), style, verbs)


# ---- the bench of one seed: data and the SFT model ----

@dataclass(frozen=True)
class BenchSize:
    """How big a seed's bench is (the defaults are the lab's; tests make a tiny one)."""

    n_train: int = 4000  # generated training items: the SFT data (filtered) and the GRPO pool
    n_test: int = 256  # held-out items a misreading can fail (greedy accuracy before and after GRPO)
    sft_steps: int = 300  # SFT from the shipped base model (the main job's SFT settings otherwise)


def make_data(d: Path, seed: int, size: BenchSize = BenchSize()) -> dict:
    """OUT/bench/s<seed>/data: sft.jsonl (the teachers' rationales kept by the answer filter), grpo.jsonl (the
    training items a misreading can fail, balanced by type and answer), test.jsonl (held-out such items)."""
    from psyche.recipe import _jsonl, _prompt_record, item_record

    d.mkdir(parents=True, exist_ok=True)
    train, test_pool = make_splits(seed=seed, n_train=size.n_train, n_test=6 * size.n_test)
    teacher, rng = LabTeacher(), random.Random(f"lab-teacher|{seed}")
    sft, kept_styles = [], {s: 0 for s in STYLES}
    for it in train:
        text, answer = teacher.write(it, rng)
        if answer == it.answer:  # the answer filter
            sft.append({"id": it.id, "messages": task_prompt(it) + [{"role": "assistant", "content": text}]})
            kept_styles[_style_of(text)] += 1
    pool = [it for it in train if can_fail(it)]
    grpo = [it for group in group_by_type(pool).values() for it in balance(group, seed=seed)]
    test = [it for it in test_pool if can_fail(it)][:size.n_test]
    _jsonl(d / "sft.jsonl", sft)
    _jsonl(d / "grpo.jsonl", map(_prompt_record, grpo))
    _jsonl(d / "test.jsonl", map(item_record, test))
    info = {"train": len(train), "sft": len(sft), "sft_styles": kept_styles, "grpo_prompts": len(grpo),
            "grpo_types": {t: sum(item_type_of(i) == t for i in grpo) for t in group_by_type(grpo)},
            "test": len(test)}
    (d / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _style_of(text: str) -> str:
    return "check" if "复核" in text else "options" if "\nA." in text else "brief"


def prepare_bench(out: Path, seed: int, size: BenchSize = BenchSize(), log=print) -> Path:
    """The seed's data and SFT model (made once): OUT/bench/s<seed>/{data, sft/hf}."""
    from psyche.base import BASE_DIR
    from psyche.recipe import embedded_config, _sft_config, run_sft_quiet

    b = out / "bench" / f"s{seed}"
    if not (b / "data" / "data.json").is_file():
        info = make_data(b / "data", seed, size)
        log(f"lab bench s{seed}: {info['sft']} SFT rationales {info['sft_styles']}, {info['grpo_prompts']} GRPO "
            f"prompts, {info['test']} held-out items")
    if not (b / "sft" / "hf" / "config.json").is_file():
        cfg = embedded_config()
        cfg.run.seed, cfg.log.progress, cfg.data.max_length = seed, False, 224
        t = time.time()
        run_sft_quiet(_sft_config(cfg, b / "sft", BASE_DIR, b / "data" / "sft.jsonl", size.sft_steps), log)
        log(f"lab bench s{seed}: SFT in {time.time() - t:.0f} s")
    return b


# ---- evaluation ----

def evaluate(model_dir: Path, test: Path, max_new_tokens: int = 128) -> dict:
    """Held-out greedy accuracy of a checkpoint on the bench's test items, and the replies' mean length."""
    from psyche.evaluate import exact, extract_answer
    from psyche.recipe import answer_items, read_items

    items = read_items(test)
    replies = answer_items(model_dir, items, batch_size=256, max_new_tokens=max_new_tokens)
    ok = [exact(extract_answer(r, it.qtype), it.answer) for it, r in zip(items, replies)]
    return {"heldout_accuracy": sum(ok) / len(ok), "heldout_chars": sum(map(len, replies)) / len(replies)}


# ---- cells ----

def parse_knob(knob: str) -> tuple[list[str], list[list[str]]]:
    """"k1+k2=a+b,c+d" -> ([k1, k2], [[a, b], [c, d]]): one key or several joined by +, and their values."""
    if "=" not in knob:
        raise ValueError(f"{knob!r}: expected KEY=V1,V2,... (or KEY1+KEY2=A1+A2,B1+B2,...)")
    keys, values = knob.split("=", 1)
    keys = keys.split("+")
    cells = [v.split("+") for v in values.split(",")]
    bad = [v for v in cells if len(v) != len(keys)]
    if bad or not all(keys):
        raise ValueError(f"{knob!r}: each value needs one part per key ({len(keys)})")
    return keys, cells


def cell_name(sets: list[str]) -> str:
    return "default" if not sets else "__".join(sorted(sets)).replace("/", "_")


def run_cell(out: Path, bench: Path, seed: int, sets: list[str], log=print) -> dict:
    """One GRPO run of the lab config with `sets` from the seed's SFT model, then its held-out evaluation
    -> the cell's summary (read back when the cell is done)."""
    d = out / "cells" / cell_name(sets) / f"s{seed}"
    done = d / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(d / "grpo", ignore_errors=True)  # an unfinished cell starts over (its wall time is then whole)
    d.mkdir(parents=True, exist_ok=True)
    init, prompts = json.dumps(str(bench / "sft" / "hf")), json.dumps(str(bench / "data" / "grpo.jsonl"))
    cmd = [sys.executable, "train.py", "--stage", "grpo", "--config", str(LAB_CONFIG.relative_to(ROOT)),
           "--out", str(d / "grpo"), "--set", f"run.seed={seed}", "--set", f"grpo.init={init}",
           "--set", f"grpo.paths=[{prompts}]", "--set", "log.progress=false", *[x for s in sets for x in ("--set", s)]]
    t = time.time()
    with open(d / "grpo.log", "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"cell {cell_name(sets)} seed {seed} failed (exit {r.returncode}); see {d / 'grpo.log'}")
    wall = time.time() - t
    summary = {"sets": sets, "seed": seed, "command": " ".join(cmd), "wall_s": round(wall, 1),
               **evaluate(d / "grpo" / "hf", bench / "data" / "test.jsonl")}
    _write_atomic(done, json.dumps(summary, indent=2) + "\n")  # its presence means "done": never half-written
    log(f"cell {cell_name(sets)} s{seed}: held-out {summary['heldout_accuracy']:.3f}, {wall:.0f} s")
    return summary


def _write_atomic(path: Path, text: str):
    """Write a file whole or not at all (a temporary beside it, then renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sft_point(bench: Path) -> dict:
    """The SFT model's held-out evaluation (the start of every cell of the seed), made once."""
    f = bench / "sft_eval.json"
    if not f.is_file():
        _write_atomic(f, json.dumps(evaluate(bench / "sft" / "hf", bench / "data" / "test.jsonl")) + "\n")
    return json.loads(f.read_text())


# ---- the report ----

# The curves of the report, one panel each: (metric key, title). Training accuracy and reward are per step on
# that step's prompts (noisy): the panels show them smoothed over SMOOTH steps.
CURVES = (("accuracy", "accuracy (training prompts)"), ("reward_mean", "reward"), ("entropy", "token entropy"),
          ("length_correct_mean", "length of correct replies"),
          ("length_incorrect_mean", "length of incorrect replies"),
          ("kl", "KL to the reference (k3)"), ("clip_frac_low", "clip fraction, low (A < 0)"),
          ("clip_frac_high", "clip fraction, high (A > 0)"), ("zero_std_frac", "zero-variance groups"))
SAMPLED = {"accuracy": "accuracy_sampled", "zero_std_frac": "zero_std_frac_sampled"}  # over every group sampled
SMOOTH = 5
LAST = 5  # steps an end point averages over


def cell_points(out: Path, cell: dict) -> dict:
    """The end points of one (cell, seed): held-out accuracy and its gain over the SFT model, and the
    training curves' last LAST steps (means), their first step (entropy, zero variance), the change of the
    incorrect replies' length (last LAST steps' mean − first LAST steps'), and totals (samples generated)."""
    from psyche.analysis import read_metrics

    rows = read_metrics(cell_dir(out, cell))
    last = rows[-LAST:]

    def mean(key, rs):
        vals = [r[key] for r in rs if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    samples = sum(r.get("prompts_drawn", 0) for r in rows) * group_size(out, cell)
    gain = cell["heldout_accuracy"] - cell["sft_heldout"]
    # accuracy and zero variance over every group sampled (first round), as dynamic sampling logs them before it
    # keeps only the mixed groups; runs that predate accuracy_sampled fall back to the batch trained on
    acc = "accuracy_sampled" if any("accuracy_sampled" in r for r in rows) else "accuracy"
    zero = "zero_std_frac_sampled" if any("zero_std_frac_sampled" in r for r in rows) else "zero_std_frac"
    return {"heldout_accuracy": cell["heldout_accuracy"], "heldout_gain": gain,
            "train_accuracy_end": mean(acc, last), "entropy_start": mean("entropy", rows[:1]),
            "entropy_end": mean("entropy", last), "length_correct_end": mean("length_correct_mean", last),
            "length_incorrect_end": mean("length_incorrect_mean", last),
            "length_incorrect_change": mean("length_incorrect_mean", last) - mean("length_incorrect_mean", rows[:LAST]),
            "kl_end": mean("kl", last), "clip_frac_low_mean": mean("clip_frac_low", rows),
            "clip_frac_high_mean": mean("clip_frac_high", rows), "zero_std_frac_step1": mean(zero, rows[:1]),
            "zero_std_frac_mean": mean(zero, rows), "logprob_gap_mean": mean("logprob_gap", rows),
            "generated_samples": samples,
            "heldout_per_1k_samples": 1000 * gain / samples if samples else float("nan"),
            "wall_s": cell["wall_s"]}


def _nan_to_null(x):
    """JSON has no NaN: a metric a cell lacks is written as null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_null(v) for v in x]
    return x


def cell_dir(out: Path, cell: dict) -> Path:
    return out / "cells" / cell_name(cell["sets"]) / f"s{cell['seed']}" / "grpo"


def run_config(out: Path, cell: dict):
    """The config the cell's run saved."""
    from psyche.config import load_run_config

    return load_run_config(cell_dir(out, cell) / "config.toml")


def group_size(out: Path, cell: dict) -> int:
    return run_config(out, cell).grpo.group_size


def zero_variance_check(out: Path, labels, seeds, cells) -> list[dict] | None:
    """For an ablation of the group size: each cell's zero-variance fraction at step 1 (the same prompts in every
    cell of a seed) against p^G + (1 − p)^G over those prompts, p^G estimated without bias from the largest
    group's step-1 pass counts (k of n right: C(k, G) / C(n, G)). Both count groups whose *correctness* does not
    vary (all right or all wrong): the reward's zero-std fraction is lower, as the format reward still varies in
    some of them. None unless the cells differ in group size.

    Whether a smaller cell's count of such groups, over all seeds, departs from p^G + (1 − p)^G is tested
    exactly (`uniform_groups_test`): a seed's per-cell counts are small and skewed, so "below the prediction on
    most seeds" is what chance gives and a sign test over seeds would overstate it."""
    from math import comb

    from psyche.analysis import read_metrics
    from psyche.grpo.diagnostics import read_pass_rates

    sizes = {lab: group_size(out, cells[(lab, seeds[0])]) for lab in labels}
    if len(set(sizes.values())) < 2:
        return None
    big = max(sizes, key=sizes.get)
    n = sizes[big]
    rows = []
    for lab in labels:
        G, measured, predicted, pairs = sizes[lab], [], [], []
        for s in seeds:
            m = read_metrics(cell_dir(out, cells[(lab, s)]))[0]
            measured.append(m["pass_all_wrong_frac"] + m["pass_all_right_frac"])
            step1 = read_pass_rates(cell_dir(out, cells[(big, s)]))[0]["pass_rate"]
            ks = [round(p * n) for p in step1.values()]
            predicted.append(sum((comb(k, G) + comb(n - k, G)) / comb(n, G) for k in ks) / len(ks))
            own = read_pass_rates(cell_dir(out, cells[(lab, s)]))[0]["pass_rate"]
            if pairs is not None and own.keys() == step1.keys():
                pairs += [(round(step1[key] * n), round(own[key] * G)) for key in step1]
            else:
                pairs = None  # not the same prompts: no test
        row = {"label": lab, "group_size": G, "measured": measured, "predicted": predicted}
        if lab != big and pairs:
            row.update(uniform_groups_test(pairs, n, G))
        rows.append(row)
    return rows


def uniform_groups_test(pairs: list[tuple[int, int]], n: int, G: int) -> dict:
    """Exact test of the uniform-correctness count of groups of G against groups of n of the same prompts at
    the same policy. pairs: per prompt, (right of n, right of G). Under no difference, the n + G samples of a
    prompt are exchangeable, so given its K right in all, the G are a random G-subset: uniform with probability
    (C(K, G) + C(n + G − K, G)) / C(n + G, G), independently over prompts. The observed count is compared with
    that sum of Bernoullis (its exact distribution) -> {uniform_groups, expected, p_two_sided}."""
    from math import comb

    N = n + G
    probs = [(comb(k + g, G) + comb(N - k - g, G)) / comb(N, G) for k, g in pairs]
    dist_ = [1.0]  # P(count = i), built prompt by prompt
    for q in probs:
        dist_ = [a * (1 - q) + b * q for a, b in zip(dist_ + [0.0], [0.0] + dist_)]
    obs = sum(g in (0, G) for _, g in pairs)
    p = min(1.0, 2 * min(sum(dist_[:obs + 1]), sum(dist_[obs:])))
    return {"uniform_groups": obs, "groups": len(pairs), "expected": sum(probs), "p_two_sided": p}


def sign_test_p(up: int, down: int) -> float:
    """Two-sided exact sign test on the non-tied seeds: P(a split at least this uneven | no effect)."""
    n, k = up + down, max(up, down)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n)


def verdict(name: str, diffs: list[float], tol: float = 0.0) -> str:
    """One line on the paired per-seed differences of a metric (value − first value). A direction is claimed
    when 4 of 5 seeds (all of 3) agree and the mean has the same sign; the sign test's p says how little
    4 of 5 proves (0.375; 5 of 5: 0.0625)."""
    d = [x for x in diffs if not math.isnan(x)]
    if not d:
        return f"{name}: no data"
    up, down = sum(x > tol for x in d), sum(x < -tol for x in d)
    mean = sum(d) / len(d)
    need = len(d) - 1 if len(d) >= 5 else len(d)  # 4 of 5 seeds, or all of 3
    p = f"sign test p {sign_test_p(up, down):.2g}"
    if up >= need and mean > 0:
        return f"{name}: higher on {up}/{len(d)} seeds (mean {mean:+.4g}; {p})"
    if down >= need and mean < 0:
        return f"{name}: lower on {down}/{len(d)} seeds (mean {mean:+.4g}; {p})"
    return f"{name}: no consistent difference ({up} higher, {down} lower of {len(d)}; mean {mean:+.4g})"


POINTS = ("heldout_accuracy", "heldout_gain", "train_accuracy_end", "entropy_start", "entropy_end",
          "length_correct_end", "length_incorrect_end", "length_incorrect_change", "kl_end", "clip_frac_low_mean",
          "clip_frac_high_mean", "zero_std_frac_step1", "zero_std_frac_mean", "logprob_gap_mean", "generated_samples",
          "heldout_per_1k_samples", "wall_s")


def report(out: Path, name: str, labels: list[str], seeds: list[int], cells: dict) -> dict:
    """OUT/<name>/report.md, report.json and plots/curves.png from cells {(label, seed): summary}."""
    d = out / name
    (d / "plots").mkdir(parents=True, exist_ok=True)
    pts = {(lab, s): cell_points(out, cells[(lab, s)]) for lab in labels for s in seeds}
    table = {}
    for lab in labels:
        table[lab] = {}
        for k in POINTS:
            vals = [pts[(lab, s)][k] for s in seeds]
            ok = [v for v in vals if not math.isnan(v)]
            table[lab][k] = {"mean": sum(ok) / len(ok) if ok else float("nan"), "min": min(ok, default=float("nan")),
                             "max": max(ok, default=float("nan")), "per_seed": vals}
    first = labels[0]
    paired = {lab: {k: [pts[(lab, s)][k] - pts[(first, s)][k] for s in seeds] for k in POINTS} for lab in labels[1:]}
    verdicts = {lab: [verdict(k, paired[lab][k]) for k in POINTS] for lab in labels[1:]}
    plot_curves(out, labels, seeds, cells, d / "plots" / "curves.png")
    plot_per_sample(out, labels, seeds, cells, d / "plots" / "accuracy_per_sample.png")
    rep = {"name": name, "labels": labels, "seeds": seeds, "cells": {lab: cells[(lab, seeds[0])]["sets"]
                                                                     for lab in labels},
           "table": table, "paired_vs_first": paired, "verdicts": verdicts,
           "zero_variance_step1": zero_variance_check(out, labels, seeds, cells), "notes": []}
    if any(run_config(out, cells[(lab, seeds[0])]).grpo.dynamic_sampling for lab in labels):
        rep["notes"].append("With dynamic sampling the update sees only mixed groups: entropy, lengths, KL and clip "
                            "fractions are measured on them; training accuracy and zero variance on every group "
                            "of the first round sampled (accuracy_sampled, zero_std_frac_sampled; a run that "
                            "predates accuracy_sampled: its accuracy on the groups kept).")
    _write_atomic(d / "report.json", json.dumps(_nan_to_null(rep), indent=2, allow_nan=False) + "\n")
    _write_atomic(d / "report.md", markdown(rep))
    return rep


def markdown(rep: dict) -> str:
    labels, seeds = rep["labels"], rep["seeds"]
    lines = [f"# lab: {rep['name']}", "", f"seeds {', '.join(map(str, seeds))}; cells: " +
             "; ".join(f"`{lab}` = {' '.join(rep['cells'][lab]) or '(lab defaults)'}" for lab in labels), "",
             "| metric | " + " | ".join(f"`{lab}`" for lab in labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for k in POINTS:
        cells = [rep["table"][lab][k] for lab in labels]
        lines.append(f"| {k} | " + " | ".join(f"{c['mean']:.4g} ({c['min']:.4g}–{c['max']:.4g})" for c in cells) + " |")
    for lab in labels[1:]:
        lines += ["", f"Paired per-seed differences, `{lab}` − `{labels[0]}` (seeds {', '.join(map(str, seeds))}):", ""]
        lines += [f"- {k}: " + ", ".join(f"{x:+.4g}" for x in rep["paired_vs_first"][lab][k]) for k in POINTS]
        lines += ["", "Verdicts:", ""] + [f"- {v}" for v in rep["verdicts"][lab]]
    lines += [f"\nNote: {n}" for n in rep.get("notes", [])]
    if rep.get("zero_variance_step1"):
        lines += ["", "Groups whose correctness does not vary (all right or all wrong) at step 1, measured vs "
                  "p^G + (1 − p)^G (p^G from the largest group's pass counts):", "", "| cell | G | measured (per seed) | predicted (per seed) |", "|---|---|---|---|"]
        for r in rep["zero_variance_step1"]:
            lines.append(f"| `{r['label']}` | {r['group_size']} | " + ", ".join(f"{x:.3f}" for x in r["measured"])
                         + " | " + ", ".join(f"{x:.3f}" for x in r["predicted"]) + " |")
        lines += [f"\n`{r['label']}`: {r['uniform_groups']} of {r['groups']} groups uniform, {r['expected']:.2f} "
                  f"expected given each prompt's pass count over both cells (exact test, two-sided p "
                  f"{r['p_two_sided']:.2g})" for r in rep["zero_variance_step1"] if "p_two_sided" in r]
    lines += ["", "![curves](plots/curves.png)", "", "![accuracy per generated sample](plots/accuracy_per_sample.png)",
              ""]
    return "\n".join(lines)


def _smooth(xs: list[float], k: int) -> list[float]:
    out = []
    for i in range(len(xs)):
        w = [x for x in xs[max(0, i - k + 1):i + 1] if not math.isnan(x)]
        out.append(sum(w) / len(w) if w else float("nan"))
    return out


def plot_curves(out: Path, labels, seeds, cells, path: Path):
    """One panel per CURVES metric: per cell, the mean over seeds and a band from the min to the max."""
    from psyche.analysis import _plt, read_metrics

    plt = _plt()

    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    for (key, title), ax in zip(CURVES, axes.flat):
        for lab in labels:
            runs = []
            for s in seeds:
                rows = read_metrics(cell_dir(out, cells[(lab, s)]))
                k = SAMPLED.get(key, key) if rows and SAMPLED.get(key) in rows[0] else key
                ys = [r.get(k, float("nan")) for r in rows]
                runs.append(_smooth(ys, SMOOTH) if key in ("accuracy", "reward_mean") else ys)
            n = min(map(len, runs))
            x = list(range(1, n + 1))
            cols = [[r[i] for r in runs if not math.isnan(r[i])] for i in range(n)]
            mean = [sum(c) / len(c) if c else float("nan") for c in cols]
            lo = [min(c) if c else float("nan") for c in cols]
            hi = [max(c) if c else float("nan") for c in cols]
            (line,) = ax.plot(x, mean, label=lab)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_title(title + (f" ({SMOOTH}-step mean)" if key in ("accuracy", "reward_mean") else ""))
        ax.set_xlabel("GRPO step")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"mean and min-max over seeds {', '.join(map(str, seeds))}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_per_sample(out: Path, labels, seeds, cells, path: Path):
    """Training accuracy (smoothed) against the samples generated so far, one line per (cell, seed)."""
    from psyche.analysis import _plt, read_metrics

    plt = _plt()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, lab in enumerate(labels):
        for s in seeds:
            cell = cells[(lab, s)]
            rows = read_metrics(cell_dir(out, cell))
            G, total, xs = group_size(out, cell), 0, []
            for r in rows:
                total += r.get("prompts_drawn", 0) * G
                xs.append(total)
            k = "accuracy_sampled" if rows and "accuracy_sampled" in rows[0] else "accuracy"
            ax.plot(xs, _smooth([r.get(k, float("nan")) for r in rows], SMOOTH), color=f"C{i}",
                    alpha=0.7, label=lab if s == seeds[0] else None)
    ax.set_xlabel("samples generated")
    ax.set_ylabel(f"training accuracy ({SMOOTH}-step mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---- the command ----

def parse_seeds(text: str) -> list[int]:
    """"0,1,2" or "0-4"."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def run_ablation(knob: str, seeds: list[int], out: Path, name: str | None = None, extra: tuple = (),
                 size: BenchSize = BenchSize(), log=print) -> dict:
    """Prepare each seed's bench, run every (value, seed) cell not done yet, and write the report."""
    from psyche.analysis import _plt

    _plt()  # the report's plots need matplotlib: say so before any cell runs, not after the sweep
    out = Path(out).resolve()  # the cells run train.py from the repository root
    keys, values = parse_knob(knob)
    labels, cells = ["+".join(vals) for vals in values], {}
    for s in seeds:
        bench = prepare_bench(out, s, size, log)
        sft = sft_point(bench)
        for vals, label in zip(values, labels):
            sets = [f"{k}={v}" for k, v in zip(keys, vals) if not _is_default(k, v)] + list(extra)
            cell = run_cell(out, bench, s, sorted(sets), log)
            cells[(label, s)] = {**cell, "sft_heldout": sft["heldout_accuracy"]}
    name = name or knob.split("=", 1)[0].replace("grpo.", "").replace("+", "-")
    return report(out, name, labels, seeds, cells)


def _is_default(key: str, value: str) -> bool:
    """The lab config's own value for `key` (so the default's cell is shared by every ablation)."""
    from psyche.config import load_run_config

    cfg = load_run_config(LAB_CONFIG, [])
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part, None)
    try:
        return obj is not None and type(obj)(json.loads(value) if not isinstance(obj, str) else value) == obj
    except (ValueError, TypeError):
        return False


@click.command("lab")
@click.argument("knob")
@click.option("--seeds", default="0-4", show_default=True, help="Seeds: 0,1,2 or 0-4.")
@click.option("--out", default="runs/lab", show_default=True, type=click.Path(file_okay=False),
              help="The lab's directory: benches and cells (shared by every ablation) and one report per ablation.")
@click.option("--name", default=None, help="The report's directory name (default: from the knob).")
@click.option("--with", "extra", multiple=True, metavar="KEY=V", help="A setting for every cell of this ablation.")
def lab_cmd(knob, seeds, out, name, extra):
    """Run an ablation on the GRPO lab bench: KNOB is KEY=V1,V2,... (or KEY1+KEY2=A1+A2,B1+B2,...)."""
    try:
        keys, values = parse_knob(knob)
        seed_list = parse_seeds(seeds)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    from psyche.config import ConfigError, load_run_config

    try:  # every cell's settings are a valid config before anything runs
        for vals in values:
            load_run_config(LAB_CONFIG, [f"{k}={v}" for k, v in zip(keys, vals)] + list(extra))
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None
    rep = run_ablation(knob, seed_list, Path(out), name, tuple(extra), log=click.echo)
    d = Path(out) / rep["name"]
    click.echo((d / "report.md").read_text())
    click.echo(f"wrote {d / 'report.md'}, {d / 'report.json'}, {d / 'plots' / 'curves.png'}")
