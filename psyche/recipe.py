"""The embedded default: the Psyche-R1 recipe in miniature, end to end, on 2 CPU cores (`python train.py`).

    data     generate Xu Youxin exam items (psyche/task.py) and a held-out test set; the LLM teachers write a
             rationale for every training item (keeping it when its answer matches the key), and the items the
             teachers all answer wrong at temperature 0 become the challenge pool (GRPO), the rest the SFT data,
             as in Psyche-R1's multi-LLM selection
    sft      SFT from the base model (psyche/base.py: pretrained on other scales, it answers the format but not
             this rule) on the teachers' rationales, which carry the teachers' one slip wherever it leaves the
             answer right
    grpo     GRPO from the SFT model on the challenge pool, with SFT-data prompts mixed in and a KL term to the
             SFT model (both guard the skills SFT taught), rewarded by the answer key alone
    control  the SFT model trained further on the same SFT data for about GRPO's wall time (a fixed step count,
             so the table is reproducible): does GRPO teach what more SFT would not?
    eval     base, SFT, control and GRPO answer the held-out test set greedily, scored with the PCEB rules

Why GRPO has something to learn: the SFT data scores a 3-12 month course right in about 30% of its rationales
and wrong in 70% (the teachers' slip, invisible to the answer filter there), so the SFT model samples the right
reading about a third of the time and answers greedily with the wrong one; on the challenge items the answer key
rewards exactly the right reading, which GRPO makes the greedy one, while more SFT fits the teachers' mixture.

Deviations from Psyche-R1, on purpose: the teachers and selectors are simulated (psyche/task.py says how) rather
than LLMs; the base model is a ~1M-parameter model pretrained here (psyche/assets/base) rather than
Qwen2.5-7B-Instruct. Each stage writes into RUN_DIR/<stage>/ and is skipped when its output exists, so a rerun
resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from pathlib import Path

import click

from psyche.config import ConfigError, RunConfig
from psyche.evaluate import credit, exact, extract_answer
from psyche.jsonl import jsonl_lines
from psyche.pceb import Item
from psyche.task import (TYPES, Teacher, balance, course_read, group_by_type, is_challenge, item_to_sft_messages,
                         item_type_of, make_splits, slip_applies, task_prompt)

MODELS = ("base", "sft", "control", "grpo")
MAX_TEST = 4000  # held-out items (the test facts are a quarter of the fact keys; the vignettes vary beyond them)


def embedded_config() -> RunConfig:
    """The run configuration of the embedded default (every value can be changed with --set)."""
    cfg = RunConfig()
    cfg.run.name, cfg.run.out = "psyche-r1-mini", "runs/psyche-r1-mini"
    cfg.model.dtype = "float32"
    # data.system stays "default": the tokenizer's own (none for the base model's), so SFT trains on exactly the
    # prompt tokens that evaluation and GRPO generate from (an empty system turn in SFT alone would not be)
    cfg.data.max_length, cfg.data.packing = 160, False
    cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.schedule, cfg.optim.min_lr_ratio = 1e-3, 0.05, "cosine", 0.1
    cfg.sft.global_batch, cfg.sft.micro_batch = 16, 16
    cfg.checkpoint.every, cfg.checkpoint.keep_last = 0, 1
    cfg.log.every = 100
    g = cfg.grpo
    g.prompt_style, g.prompts_per_step, g.group_size, g.mini_batch, g.micro_batch = "plain", 32, 8, 0, 64
    g.temperature, g.max_new_tokens, g.max_prompt_length = 1.0, 64, 256
    g.kl_coef, g.loss_agg, g.truncation, g.dump_every = 0.02, "token-mean", "zero", 5
    g.rewards, g.reward_weights = ["format", "accuracy"], [0.1, 1.0]
    g.optim.lr, g.optim.warmup_steps, g.optim.schedule = 3e-4, 2, "constant"
    g.steps, g.exact_kl, g.exact_kl_rows = 15, True, 32
    return cfg


def base_dir(cfg: RunConfig) -> Path:
    from psyche.base import BASE_DIR

    path = Path(cfg.recipe.base) if cfg.recipe.base else BASE_DIR
    if not (path / "config.json").is_file():
        raise ConfigError(f"recipe.base = {str(path)!r}: no config.json there (an HF checkpoint directory; the "
                          "default is the shipped psyche/assets/base, rebuilt by `python -m psyche.base`)")
    return path


def check(cfg: RunConfig):
    """The recipe's settings, checked before anything is written."""
    rc = cfg.recipe
    for key in ("n_train", "n_test_challenge", "n_test_other", "eval_batch", "max_new_tokens"):
        if getattr(rc, key) < 1:
            raise ConfigError(f"recipe.{key} must be >= 1, got {getattr(rc, key)}")
    for key in ("sft_steps", "control_steps", "samples"):
        if getattr(rc, key) < 0:
            raise ConfigError(f"recipe.{key} must be >= 0, got {getattr(rc, key)}")
    if rc.n_test_challenge + rc.n_test_other > MAX_TEST:
        raise ConfigError(f"recipe.n_test_challenge + recipe.n_test_other = {rc.n_test_challenge + rc.n_test_other}: "
                          f"at most {MAX_TEST} held-out items")
    if not 0.0 <= rc.teacher_confusion <= 1.0:
        raise ConfigError(f"recipe.teacher_confusion must be in [0, 1], got {rc.teacher_confusion}")
    if not 0.0 <= rc.grpo_mix < 1.0:
        raise ConfigError(f"recipe.grpo_mix must be in [0, 1), got {rc.grpo_mix}")
    if rc.control_lr <= 0:
        raise ConfigError(f"recipe.control_lr must be > 0, got {rc.control_lr}")
    base_dir(cfg)


# ---- item files ----

def item_record(it: Item) -> dict:
    return {"id": it.id, "type": item_type_of(it), "challenge": is_challenge(it), "qtype": it.qtype,
            "question": it.question, "options": it.options, "answer": it.answer, "analysis": it.analysis,
            "case_text": it.case_text, "subject": it.subject, "ref": it.ref, "category": it.category}


def read_items(path: Path) -> list[Item]:
    keys = ("id", "category", "qtype", "question", "options", "answer", "analysis", "case_text", "subject", "ref")
    out = []
    for line in jsonl_lines(Path(path).read_text(encoding="utf-8")):
        r = json.loads(line)
        out.append(Item(**{k: r[k] for k in keys if k in r}))
    return out


def _jsonl(path: Path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _prompt_record(it: Item) -> dict:
    """A GRPO record: the prompt turns exactly as SFT shows them, and the answer key (no rationale)."""
    return {"id": it.id, "type": item_type_of(it), "challenge": is_challenge(it), "qtype": it.qtype,
            "answer": it.answer, "messages": task_prompt(it)}


def pick_test(items: list[Item], n_challenge: int, n_other: int) -> list[Item]:
    """The first n_challenge challenge items and n_other others of `items` (already shuffled), in that order."""
    ch = [it for it in items if is_challenge(it)][:n_challenge]
    other = [it for it in items if not is_challenge(it)][:n_other]
    if len(ch) < n_challenge or len(other) < n_other:
        raise ConfigError(f"recipe.n_test_challenge={n_challenge} / recipe.n_test_other={n_other}: the held-out "
                          f"facts give only {len(ch)} / {len(other)} such items here; ask for fewer")
    return ch + other


# ---- stages ----

def stage_data(cfg: RunConfig, out: Path, log) -> dict:
    """Items, the teachers' rationales and the challenge selection (RUN_DIR/data)."""
    rc = cfg.recipe
    d = out / "data"
    if (d / "selection.json").is_file():
        log("data: already made")
        return json.loads((d / "selection.json").read_text())
    d.mkdir(parents=True, exist_ok=True)
    n_test_pool = 6 * (rc.n_test_challenge + rc.n_test_other)  # challenge items are ~1 in 5: enough of both
    train, test_pool = make_splits(seed=cfg.run.seed, n_train=rc.n_train, n_test=n_test_pool)
    test = pick_test(test_pool, rc.n_test_challenge, rc.n_test_other)
    teacher, rng = Teacher(rc.teacher_confusion), random.Random(f"teacher|{cfg.run.seed}")
    sft, challenge, slipped, dropped = [], [], [], 0
    for it in train:
        analysis, answer = teacher.write(it, rng)  # a sampled rationale ...
        if teacher.greedy(it) != it.answer:  # ... and the selection: every teacher wrong at temperature 0
            challenge.append(it)
        elif answer == it.answer:  # the answer filter (never fails here: the slip leaves these answers right)
            sft.append({"id": it.id, "messages": item_to_sft_messages(it, analysis)})
            slipped.append(analysis != it.analysis)
        else:
            dropped += 1
    balanced = [it for group in group_by_type(challenge).values() for it in balance(group, seed=cfg.run.seed)]
    sft_items = {it.id: it for it in train if not is_challenge(it)}
    n_mix = min(len(sft_items), round(rc.grpo_mix * len(balanced) / (1 - rc.grpo_mix)))
    mixed_in = random.Random(f"mix|{cfg.run.seed}").sample(sorted(sft_items.values(), key=lambda i: i.id), n_mix)
    _jsonl(d / "train.jsonl", map(item_record, train))
    _jsonl(d / "test.jsonl", map(item_record, test))
    _jsonl(d / "sft.jsonl", sft)
    _jsonl(d / "grpo.jsonl", map(_prompt_record, balanced + mixed_in))
    middle = [s for r, s in zip(sft, slipped) if slip_applies(sft_items[r["id"]])]
    by_type = lambda xs: {t: sum(item_type_of(i) == t for i in xs) for t in TYPES}  # noqa: E731
    sel = {"train": len(train), "challenge": by_type(challenge), "sft": len(sft), "dropped_by_filter": dropped,
           "sft_rationales_with_the_slip": sum(slipped),
           "slip_share_where_it_applies": round(sum(middle) / max(1, len(middle)), 4),
           "grpo_prompts": len(balanced) + n_mix, "grpo_challenge": len(balanced), "grpo_mixed_in": n_mix,
           "test": {"challenge": rc.n_test_challenge, "other": rc.n_test_other},
           "base": str(base_dir(cfg)), "base_sha256": _digest(base_dir(cfg))}
    (d / "selection.json").write_text(json.dumps(sel, indent=2) + "\n")
    log(f"data: {len(train)} training items -> {len(sft)} with teacher rationales for SFT "
        f"({sum(slipped)} carry the slip, {sel['slip_share_where_it_applies']:.0%} of those with a 3-12 month "
        f"course), {len(challenge)} challenge items {sel['challenge']} -> {len(balanced)} balanced + {n_mix} mixed "
        f"in for GRPO; test {rc.n_test_challenge} challenge + {rc.n_test_other} other items")
    return sel


def _digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _sft_config(cfg: RunConfig, out: Path, init: Path, data: Path, steps: int, lr: float | None = None) -> RunConfig:
    c = copy.deepcopy(cfg)
    c.run.out, c.model.init = str(out), str(init)
    c.data.paths, c.data.format = [str(data)], "messages"
    c.sft.max_steps = steps
    if lr is not None:
        c.optim.lr = lr
    return c


def run_sft_quiet(c: RunConfig, log, on_step=None) -> float:
    from psyche.sft import run_sft

    t = time.time()
    if (Path(c.run.out) / "hf" / "config.json").is_file():
        log(f"{Path(c.run.out).name}: already trained")
        return 0.0
    run_sft(c, on_step=on_step)
    return time.time() - t


def stage_sft(cfg: RunConfig, out: Path, log) -> float:
    rc = cfg.recipe
    c = _sft_config(cfg, out / "sft", base_dir(cfg), out / "data" / "sft.jsonl", rc.sft_steps)
    if (out / "sft" / "hf" / "config.json").is_file():
        log("sft: already trained")
        return 0.0
    on_step = sft_curve(out, rc, base_dir(cfg), log) if rc.curve_every > 0 else None
    return run_sft_quiet(c, log, on_step=on_step)


def sft_curve(out: Path, rc, tokenizer_dir: Path, log):
    """An on_step callback writing SFT's learning curve to RUN_DIR/sft/curve.jsonl: every rc.curve_every steps,
    each step of the procedure on held-out items of the SFT data's kind (greedy; `course` counts the slip as
    wrong, `course_outside` is the course score on cases outside 3-12 months, where the data has no slip), and
    the right-reading rate of a 3-12 month course on challenge items (two samples each at T 1.0)."""
    from psyche.task import rates, skill_grades, skill_rates
    from psyche.tokenizer import Tokenizer

    test = read_items(out / "data" / "test.jsonl")
    other = [it for it in test if not is_challenge(it)][:rc.curve_items]
    hard = [it for it in test if is_challenge(it)][:max(1, rc.curve_items // 3)] * 2
    path = out / "sft" / "curve.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    tok = Tokenizer.from_dir(tokenizer_dir)

    def on_step(step, model):
        if step % rc.curve_every and step != rc.sft_steps:
            return
        grades = skill_grades(model, tok, other, max_new_tokens=rc.max_new_tokens)
        row = {"step": step, **rates(grades)}
        row["course_outside"] = rates([g for g, it in zip(grades, other) if not slip_applies(it)])["course"]
        hard_rates = skill_rates(model, tok, hard, max_new_tokens=rc.max_new_tokens, temperature=1.0, seed=step)
        row["right_reading_sampled"], row["challenge_correct_sampled"] = hard_rates["course"], hard_rates["correct"]
        with open(path, "a") as f:
            f.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}) + "\n")
        log(f"sft curve, step {step}: " + " ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "step"))

    return on_step


def stage_grpo(cfg: RunConfig, out: Path, log) -> float:
    from psyche.grpo.loop import run_grpo

    if (out / "grpo" / "hf" / "config.json").is_file():
        log("grpo: already trained")
        return 0.0
    c = copy.deepcopy(cfg)
    c.run.out, c.grpo.init, c.grpo.paths = str(out / "grpo"), str(out / "sft" / "hf"), [str(out / "data" / "grpo.jsonl")]
    t = time.time()
    run_grpo(c)
    return time.time() - t


def stage_control(cfg: RunConfig, out: Path, log) -> float:
    c = _sft_config(cfg, out / "control", out / "sft" / "hf", out / "data" / "sft.jsonl", cfg.recipe.control_steps,
                    cfg.recipe.control_lr)
    return run_sft_quiet(c, log)


# ---- evaluation ----

def answer_items(model_dir: Path, items: list[Item], *, batch_size: int, max_new_tokens: int, temperature=0.0,
                 seed=0) -> list[str]:
    """Greedy (or sampled) responses of a checkpoint to the items' task prompts, in order (an item listed k
    times is sampled k times, each with its own row seed)."""
    from psyche.sampler import SamplingParams, generate_texts
    from psyche.tokenizer import Tokenizer
    from psyche.weights import load_pretrained

    model, _ = load_pretrained(model_dir)
    tok = Tokenizer.from_dir(model_dir)
    prompts = [tok.encode_chat(task_prompt(it), add_generation_prompt=True)[0] for it in items]
    return generate_texts(model, tok, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          sampling=SamplingParams(temperature), seed=seed)


def evaluate_model(model_dir: Path, items: list[Item], rc) -> tuple[dict, dict]:
    """Held-out metrics of one checkpoint (percent): single-choice accuracy, multiple-choice strict/elastic,
    format rate, mean response length (characters of the decoded reply), accuracy on the SFT data's kind of
    item and on challenge items, accuracy per item type, and how often the reply scores a 3-12 month course
    right (greedy on every such item; sampled at T 1.0, `rc.samples` per challenge item)."""
    from psyche.rewards import format_reward

    resp = dict(zip((it.id for it in items),
                    answer_items(model_dir, items, batch_size=rc.eval_batch, max_new_tokens=rc.max_new_tokens)))
    ok, cred = {}, {}
    for it in items:
        pred = extract_answer(resp[it.id], it.qtype)
        ok[it.id] = float(exact(pred, it.answer))
        cred[it.id] = credit(pred, it.answer)
    pct = lambda xs: 100.0 * sum(xs) / max(len(xs), 1)  # noqa: E731
    ch = {it.id: is_challenge(it) for it in items}
    middle = [it for it in items if slip_applies(it)]
    m = {
        "smcq_acc": pct([ok[it.id] for it in items if it.qtype == "single"]),
        "mmcq_strict": pct([ok[it.id] for it in items if it.qtype == "multiple"]),
        "mmcq_elastic": pct([cred[it.id] for it in items if it.qtype == "multiple"]),
        "format_rate": pct([format_reward("", resp[it.id]) for it in items]),
        "sft_type_acc": pct([ok[it.id] for it in items if not ch[it.id]]),
        "challenge_acc": pct([ok[it.id] for it in items if ch[it.id]]),
        "accuracy": pct(list(ok.values())),
        "response_length": sum(len(r) for r in resp.values()) / max(len(resp), 1),
        "right_reading_greedy": pct([course_read(resp[it.id]) == 2 for it in middle]),
    }
    for t in TYPES:
        m[f"acc_{t}"] = pct([ok[it.id] for it in items if item_type_of(it) == t])
    if rc.samples:
        hard = [it for it in items if ch[it.id]]
        many = [it for it in hard for _ in range(rc.samples)]
        sampled = answer_items(model_dir, many, batch_size=rc.eval_batch, max_new_tokens=rc.max_new_tokens,
                               temperature=1.0, seed=1)
        m["right_reading_sampled"] = pct([course_read(r) == 2 for r in sampled])
    return m, resp


def stage_eval(cfg: RunConfig, out: Path, log) -> dict:
    items = read_items(out / "data" / "test.jsonl")
    dirs = {"base": base_dir(cfg), "sft": out / "sft" / "hf", "control": out / "control" / "hf",
            "grpo": out / "grpo" / "hf"}
    report = {}
    (out / "eval").mkdir(exist_ok=True)
    for name, path in dirs.items():
        if not (path / "config.json").is_file():
            log(f"eval: {name} missing ({path}), skipped")
            continue
        m, resp = evaluate_model(path, items, cfg.recipe)
        report[name] = m
        _jsonl(out / "eval" / f"{name}.jsonl",
               ({"id": it.id, "type": item_type_of(it), "challenge": is_challenge(it), "gold": it.answer,
                 "response": resp[it.id]} for it in items))
    return report


COLUMNS = [("SMCQ acc", "smcq_acc"), ("MMCQ strict", "mmcq_strict"), ("MMCQ elastic", "mmcq_elastic"),
           ("format", "format_rate"), ("resp. chars", "response_length"), ("SFT-type acc", "sft_type_acc"),
           ("challenge acc", "challenge_acc"), ("all acc", "accuracy")]
ROW_NAMES = {"base": "base (pretrained, other scales)", "sft": "SFT", "control": "SFT + more SFT (control)",
             "grpo": "SFT + GRPO"}


def report_table(report: dict, names: dict | None = None, columns=None) -> str:
    """The Markdown table of `report` ({model: metrics}): the rows `names` ({model: label}) in order, by default
    the four recipe models."""
    columns = columns or COLUMNS
    lines = ["| model | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, label in (names or {m: ROW_NAMES[m] for m in MODELS}).items():
        if name in report:
            lines.append(f"| {label} | " + " | ".join(f"{report[name].get(k, float('nan')):.1f}" for _, k in columns)
                         + " |")
    return "\n".join(lines) + "\n"


READING_COLUMNS = [("right reading, greedy (3-12 month items)", "right_reading_greedy"),
                   ("right reading, sampled T 1.0 (challenge items)", "right_reading_sampled"),
                   ("total", "acc_total"), ("level", "acc_level"), ("statements", "acc_statements"),
                   ("score", "acc_score")]


def plot_curves(out: Path) -> list[Path]:
    """PNG training curves: SFT loss (SFT, control) and GRPO reward, accuracy, zero-std fraction, KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from psyche.metrics import read_metrics

    (out / "plots").mkdir(exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x0 = 0
    for name in ("sft", "control"):  # the control continues the SFT model's weights
        rows = read_metrics(out / name) if (out / name / "metrics.jsonl").is_file() else []
        if rows:
            ax.plot([x0 + r["step"] for r in rows], [r["loss"] for r in rows], label=name, lw=1)
            x0 += len(rows) if name == "sft" else 0
    ax.set_xlabel("SFT step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "plots" / "sft_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    rows = read_metrics(out / "grpo") if (out / "grpo" / "metrics.jsonl").is_file() else []
    if rows:
        keys = [("reward_mean", "reward"), ("accuracy", "accuracy (train prompts)"),
                ("zero_std_frac", "zero-std groups"), ("kl", "KL to SFT (k3)")]
        fig, axes = plt.subplots(1, len(keys), figsize=(13, 3))
        for a, (k, title) in zip(axes, keys):
            a.plot([r["step"] for r in rows], [r.get(k, float("nan")) for r in rows], lw=1.2)
            a.set_title(title, fontsize=10), a.set_xlabel("GRPO step"), a.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "plots" / "grpo.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


STAGES = (("data", stage_data), ("sft", stage_sft), ("grpo", stage_grpo), ("control", stage_control))
LAST_STAGE = {"select": "data", "sft": "sft", "grpo": "grpo", "eval": "control", "all": "control"}


def run_recipe(cfg: RunConfig, stage: str = "all", log=print) -> dict | None:
    """Run the embedded default's stages up to `stage` (select: the data and the selection; all: every stage and
    the report; eval: the report, running whatever stage it needs first)."""
    check(cfg)
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    for name, fn in STAGES:
        t = time.time()
        fn(cfg, out, log)
        timings[name] = round(time.time() - t, 1)
        if name == LAST_STAGE[stage]:
            break
    if stage not in ("all", "eval"):
        return None
    t = time.time()
    report = stage_eval(cfg, out, log)
    timings["eval"] = round(time.time() - t, 1)
    report_json = {**report, "timings_s": timings, "config": {"seed": cfg.run.seed}}
    (out / "report.json").write_text(json.dumps(report_json, indent=2) + "\n")
    table = report_table(report) + "\n" + report_table(report, columns=READING_COLUMNS)
    (out / "report.md").write_text(table)
    plots = plot_curves(out)
    log("\n" + table)
    log(f"report: {out / 'report.json'}, {out / 'report.md'}; plots: {', '.join(str(p) for p in plots)}")
    return report_json


@click.command("task-eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--max-new-tokens", default=64, show_default=True, help="As recipe.max_new_tokens of the run.")
@click.option("--batch-size", default=200, show_default=True)
@click.option("--samples", default=4, show_default=True, help="Sampled replies per challenge item (0: none).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the metrics here.")
def task_eval_cmd(run_dir, models, max_new_tokens, batch_size, samples, json_out):
    """Score checkpoints (e.g. the hf/ of sweep runs) on the embedded default's held-out test set
    (RUN_DIR/data/test.jsonl), greedy, with the report's columns."""
    from psyche.config import RecipeSection

    test = Path(run_dir) / "data" / "test.jsonl"
    if not test.is_file():
        raise click.ClickException(f"{test}: no test set; RUN_DIR must be a run of `python train.py`")
    items = read_items(test)
    rc = RecipeSection(max_new_tokens=max_new_tokens, eval_batch=batch_size, samples=samples)
    report = {m: evaluate_model(Path(m), items, rc)[0] for m in models}
    names = {m: m for m in models}
    click.echo(report_table(report, names=names) + "\n" + report_table(report, names=names, columns=READING_COLUMNS),
               nl=False)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
