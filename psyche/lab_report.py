"""The GRPO lab's report: from finished cells (psyche/lab.py runs them) to end points per cell and seed, paired
per-seed differences with a verdict per metric, the zero-variance check of a group-size ablation, and the
curves' plots, written as OUT/<name>/report.md, report.json and plots/.

A lab directory: OUT/cells/<settings>/s<seed>/ holds a cell's cell.json (its summary, written last: the cell is
done) and grpo/ (the GRPO run: config.toml, metrics.jsonl, pass_rates.jsonl).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


# ---- a lab directory ----

def cell_name(sets: list[str]) -> str:
    return "default" if not sets else "__".join(sorted(sets)).replace("/", "_")


def write_atomic(path: Path, text: str):
    """Write a file whole or not at all (a temporary beside it, then renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- end points, verdicts, the report ----

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
    write_atomic(d / "report.json", json.dumps(_nan_to_null(rep), indent=2, allow_nan=False) + "\n")
    write_atomic(d / "report.md", markdown(rep))
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
