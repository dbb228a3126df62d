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
curves with a band over seeds, and a one-line verdict per metric (psyche/lab_report.py).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from psyche.lab_report import cell_name, report, write_atomic
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
    write_atomic(done, json.dumps(summary, indent=2) + "\n")  # its presence means "done": never half-written
    log(f"cell {cell_name(sets)} s{seed}: held-out {summary['heldout_accuracy']:.3f}, {wall:.0f} s")
    return summary


def sft_point(bench: Path) -> dict:
    """The SFT model's held-out evaluation (the start of every cell of the seed), made once."""
    f = bench / "sft_eval.json"
    if not f.is_file():
        write_atomic(f, json.dumps(evaluate(bench / "sft" / "hf", bench / "data" / "test.jsonl")) + "\n")
    return json.loads(f.read_text())


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
