"""The embedded default: the Psyche-R1 recipe in miniature, end to end, on 2 CPU cores (`python train.py`).

    data     generate exam items (psyche/task.py): three SFT types whose rationales spell out every sub-score,
             and a challenge type that asks one sub-score alone, which the seed set asks rarely
             (recipe.seed_challenge of its ~1,500 items)
    probe    a small model SFT-trained on the seed set: the "selector LLM"
    select   the selector answers every pool item; items it fails (a wrong answer, or a right letter with
             option lines that differ from the rationale's: a guess) go to the challenge pool (GRPO), the rest
             to the non-challenge pool (SFT), as in the seed; the challenge pool is balanced by type and gold
             letter (a pool of failures inherits the selector's letter bias)
    sft      SFT continues from the probe on all non-challenge data (the seed set and the non-challenge pool), at
             recipe.sft_lr (a tenth of the probe's lr: restarting at the probe's undid part of what it had learned)
    grpo     GRPO from the SFT model on the challenge pool, with non-challenge prompts mixed in and a KL term to
             the SFT model (both guard the SFT-type skills against being rewritten)
    control  the SFT model trained further on SFT data for about GRPO's wall time (a fixed step count, so the
             table is reproducible): does GRPO teach what more SFT would not?
    eval     base, SFT, control and GRPO answer the held-out test set greedily, scored with the PCEB rules

Deviations from the seed, on purpose: the selectors are one probe model (the seed used several LLMs); the
probe is the start of the SFT model (the seed's SFT started from the base model), which saves a second SFT
run in the time budget. GRPO samples at T = 1.0: the rarely seen challenge type still varies across samples
there (the variance GRPO learns from), while the converged SFT types give zero-std groups, counted per step as
zero_std_frac (GUIDE §5 trap 12; `grpo.temperature` and `grpo.dynamic_sampling` are the knobs for it).
Each stage writes into RUN_DIR/<stage>/ and is skipped when its output exists, so a rerun resumes.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import click
import torch

from psyche.config import ConfigError, ModelConfig, RunConfig
from psyche.evaluate import credit, extract_answer
from psyche.pceb import Item
from psyche.task import (SFT_TYPES, balance, group_by_type, item_to_sft_messages, item_type_of, make_splits, solved,
                         task_prompt, tokenizer_corpus)

MODELS = ("base", "sft", "control", "grpo")


def embedded_config() -> RunConfig:
    """The run configuration of the embedded default (every value can be changed with --set)."""
    cfg = RunConfig()
    cfg.run.name, cfg.run.out = "psyche-r1-mini", "runs/psyche-r1-mini"
    cfg.model.dtype = "float32"
    cfg.data.max_length, cfg.data.packing, cfg.data.system = 160, False, ""
    cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.schedule, cfg.optim.min_lr_ratio = 3e-3, 0.02, "cosine", 0.1
    cfg.sft.global_batch, cfg.sft.micro_batch = 16, 16
    cfg.checkpoint.every, cfg.checkpoint.keep_last = 0, 1
    cfg.log.every = 100
    g = cfg.grpo
    g.prompt_style, g.prompts_per_step, g.group_size, g.mini_batch, g.micro_batch = "plain", 16, 8, 0, 64
    g.temperature, g.max_new_tokens, g.max_prompt_length = 1.0, 64, 256
    g.kl_coef, g.loss_agg, g.truncation, g.dump_every = 0.02, "token-mean", "zero", 5
    g.rewards, g.reward_weights = ["format", "accuracy"], [0.1, 1.0]
    g.optim.lr, g.optim.warmup_steps, g.optim.schedule = 3e-4, 2, "constant"
    g.steps, g.exact_kl, g.exact_kl_rows = 25, True, 32
    return cfg


def _items_jsonl(path: Path, items: list[Item]):
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(item_record(it), ensure_ascii=False) + "\n")


def item_record(it: Item) -> dict:
    return {"id": it.id, "type": item_type_of(it), "qtype": it.qtype, "question": it.question,
            "options": it.options, "answer": it.answer, "analysis": it.analysis, "case_text": it.case_text,
            "subject": it.subject, "category": it.category}


def read_items(path: Path) -> list[Item]:
    keys = ("id", "category", "qtype", "question", "options", "answer", "analysis", "case_text", "subject")
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        out.append(Item(**{k: r[k] for k in keys if k in r}))
    return out


def _messages_jsonl(path: Path, items: list[Item]):
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"id": it.id, "messages": item_to_sft_messages(it)}, ensure_ascii=False) + "\n")


def _prompts_jsonl(path: Path, items: list[Item]):
    """GRPO records: the prompt turns exactly as SFT shows them, and the answer key (no rationale)."""
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"id": it.id, "type": item_type_of(it), "qtype": it.qtype, "answer": it.answer,
                                "messages": task_prompt(it)}, ensure_ascii=False) + "\n")


# ---- stages ----

def stage_data(cfg: RunConfig, out: Path, log) -> dict:
    """Generate the items, the tokenizer and the random initial model (RUN_DIR/data, RUN_DIR/init)."""
    from psyche.model import build_model
    from psyche.tokenizer import train_tokenizer
    from psyche.weights import save_pretrained

    rc = cfg.recipe
    if rc.seed_challenge < 0 or rc.seed_every < 1:
        raise ConfigError(f"recipe.seed_challenge must be >= 0 and recipe.seed_every >= 1, got "
                          f"{rc.seed_challenge} and {rc.seed_every}")
    d = out / "data"
    if (d / "test.jsonl").is_file() and (out / "init" / "config.json").is_file():
        log("data: already made")
        return json.loads((d / "summary.json").read_text())
    d.mkdir(parents=True, exist_ok=True)
    train, test = make_splits(seed=cfg.run.seed, n_train=rc.n_train, n_test=rc.n_test)
    seed_set = [it for i, it in enumerate(train) if item_type_of(it) in SFT_TYPES and i % rc.seed_every == 0]
    rare = [it for it in train if item_type_of(it) not in SFT_TYPES][:rc.seed_challenge]  # a trace of the skill
    seed_set += rare
    seed_ids = {it.id for it in seed_set}
    pool = [it for it in train if it.id not in seed_ids]
    _items_jsonl(d / "seed.jsonl", seed_set)
    _messages_jsonl(d / "seed_sft.jsonl", seed_set)
    _items_jsonl(d / "pool.jsonl", pool)
    _items_jsonl(d / "test.jsonl", test)
    tok = train_tokenizer(tokenizer_corpus(cfg.run.seed), vocab_size=rc.vocab)
    mc = ModelConfig(hidden_size=rc.hidden_size, intermediate_size=rc.intermediate_size,
                     num_hidden_layers=rc.layers, num_attention_heads=rc.heads, num_key_value_heads=rc.kv_heads,
                     vocab_size=-(-tok.vocab_size // 64) * 64, tie_word_embeddings=True, max_position_embeddings=512,
                     torch_dtype="float32", eos_token_id=tok.im_end_id, bos_token_id=tok.eot_id)
    save_pretrained(build_model(mc, seed=cfg.run.seed), out / "init", tokenizer=tok)
    summary = {"seed_items": len(seed_set), "seed_challenge_items": len(rare),
               "pool_items": len(pool), "test_items": len(test),
               "parameters": mc.num_params(), "vocab": mc.vocab_size}
    (d / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"data: {len(seed_set)} seed items ({summary['seed_challenge_items']} of the challenge type), "
        f"{len(pool)} pool items (all four types), {len(test)} test items; "
        f"model {mc.num_params():,} parameters, vocab {mc.vocab_size}")
    return summary


def _sft_config(cfg: RunConfig, out: Path, init: Path, data: Path, steps: int, lr: float | None = None) -> RunConfig:
    c = copy.deepcopy(cfg)
    c.run.out, c.model.init = str(out), str(init)
    c.data.paths, c.data.format = [str(data)], "messages"
    c.sft.max_steps = steps
    if lr is not None:
        c.optim.lr = lr
    return c


def run_sft_quiet(c: RunConfig, log) -> float:
    from psyche.sft import run_sft

    t = time.time()
    if (Path(c.run.out) / "hf" / "config.json").is_file():
        log(f"{Path(c.run.out).name}: already trained")
        return 0.0
    run_sft(c)
    return time.time() - t


@torch.no_grad()
def answer_items(model_dir: Path, items: list[Item], *, batch_size: int, max_new_tokens: int, temperature=0.0,
                 seed=0) -> dict[str, str]:
    """Greedy (or sampled) responses of a checkpoint to the items' task prompts."""
    from psyche.sampler import generate, row_seeds
    from psyche.tokenizer import Tokenizer
    from psyche.weights import load_pretrained

    model, _ = load_pretrained(model_dir)
    tok = Tokenizer.from_dir(model_dir)
    prompts = [tok.encode_chat(task_prompt(it), add_generation_prompt=True)[0] for it in items]
    seeds = row_seeds(seed, len(items))
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    out = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        r = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                     stop_token_ids=tok.stop_ids, pad_id=tok.pad_id, seeds=seeds[idx])
        for j, i in enumerate(idx):
            out[items[i].id] = tok.decode(r.tokens[j, : r.lengths[j]].tolist(), skip_special_tokens=True)
    return out


def stage_select(cfg: RunConfig, out: Path, log) -> dict:
    """Probe SFT, then challenge selection over the pool (RUN_DIR/probe, RUN_DIR/data/*pool*)."""
    rc, d = cfg.recipe, out / "data"
    probe = _sft_config(cfg, out / "probe", out / "init", d / "seed_sft.jsonl", rc.probe_steps)
    run_sft_quiet(probe, log)
    if (d / "selection.json").is_file():
        log("select: already done")
        return json.loads((d / "selection.json").read_text())
    pool = read_items(d / "pool.jsonl")
    wrong_everywhere = {it.id: True for it in pool}
    for k in range(rc.select_k):  # sample 0 greedy, the others sampled: solved if any sample solves it
        resp = answer_items(out / "probe" / "hf", pool, batch_size=rc.eval_batch, max_new_tokens=rc.max_new_tokens,
                            temperature=rc.select_temperature if k else 0.0, seed=k)
        for it in pool:
            if solved(it, resp[it.id]):  # right answer with the rationale's option lines, not a lucky letter
                wrong_everywhere[it.id] = False
    challenge = [it for it in pool if wrong_everywhere[it.id]]
    non_challenge = [it for it in pool if not wrong_everywhere[it.id]]
    # within each type, every gold answer equally often (a pool of failures inherits the selector's letter
    # bias, and GRPO would learn the bias); the types keep their share of the failures
    balanced = [it for group in group_by_type(challenge).values() for it in balance(group, seed=cfg.run.seed)]
    mix = [it for it in non_challenge if item_type_of(it) in SFT_TYPES]
    n_mix = min(len(mix), round(rc.grpo_mix * len(balanced) / max(1e-9, 1 - rc.grpo_mix)))
    import random

    mixed_in = random.Random(f"mix|{cfg.run.seed}").sample(mix, n_mix)
    _items_jsonl(d / "challenge.jsonl", challenge)
    _items_jsonl(d / "non_challenge.jsonl", non_challenge)
    _messages_jsonl(d / "sft.jsonl", read_items(d / "seed.jsonl") + non_challenge)  # all non-challenge data
    _prompts_jsonl(d / "grpo.jsonl", balanced + mixed_in)
    by_type = lambda xs: {t: sum(item_type_of(i) == t for i in xs) for t in ("total", "level", "statements", "social")}  # noqa: E731
    sel = {"challenge": by_type(challenge), "non_challenge": by_type(non_challenge),
           "challenge_balanced": len(balanced), "grpo_prompts": len(balanced) + n_mix, "grpo_mixed_in": n_mix,
           "challenge_letters": dict(sorted(_letters(challenge).items())),
           "balanced_letters": dict(sorted(_letters(balanced).items()))}
    (d / "selection.json").write_text(json.dumps(sel, indent=2) + "\n")
    log(f"select: challenge pool {sel['challenge']} (letters {sel['challenge_letters']}), balanced to "
        f"{len(balanced)}; non-challenge {sel['non_challenge']}; GRPO prompts {len(balanced)} + {n_mix} mixed in")
    return sel


def _letters(items):
    from collections import Counter

    return Counter(it.answer for it in items if it.qtype == "single")


def stage_sft(cfg: RunConfig, out: Path, log) -> float:
    d = out / "data"
    c = _sft_config(cfg, out / "sft", out / "probe" / "hf", d / "sft.jsonl", cfg.recipe.sft_steps, cfg.recipe.sft_lr)
    return run_sft_quiet(c, log)


def stage_grpo(cfg: RunConfig, out: Path, log) -> float:
    from psyche.grpo_run import run_grpo

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
                    cfg.recipe.sft_lr)
    return run_sft_quiet(c, log)


def evaluate_model(model_dir: Path, items: list[Item], rc) -> tuple[dict, dict]:
    """Held-out metrics of one checkpoint: single-choice accuracy, multiple-choice strict/elastic, format
    rate, mean response length (tokens are not needed: characters of the decoded reply), accuracy on
    SFT-type and on challenge-type items (percent)."""
    from psyche.rewards import format_reward

    resp = answer_items(model_dir, items, batch_size=rc.eval_batch, max_new_tokens=rc.max_new_tokens)
    ok, cred, kinds = {}, {}, {}
    for it in items:
        pred = extract_answer(resp[it.id], it.qtype)
        ok[it.id] = float(bool(pred) and set(pred) == set(it.answer))
        cred[it.id] = credit(pred, it.answer)
        kinds[it.id] = item_type_of(it)
    pct = lambda xs: 100.0 * sum(xs) / max(len(xs), 1)  # noqa: E731
    single = [it.id for it in items if it.qtype == "single"]
    multi = [it.id for it in items if it.qtype == "multiple"]
    m = {
        "smcq_acc": pct([ok[i] for i in single]),
        "mmcq_strict": pct([ok[i] for i in multi]),
        "mmcq_elastic": pct([cred[i] for i in multi]),
        "format_rate": pct([format_reward("", resp[it.id]) for it in items]),
        "sft_type_acc": pct([ok[it.id] for it in items if kinds[it.id] in SFT_TYPES]),
        "challenge_acc": pct([ok[it.id] for it in items if kinds[it.id] not in SFT_TYPES]),
        "accuracy": pct(list(ok.values())),
        "response_length": sum(len(r) for r in resp.values()) / max(len(resp), 1),
    }
    for t in ("total", "level", "statements", "social"):
        m[f"acc_{t}"] = pct([ok[it.id] for it in items if kinds[it.id] == t])
    return m, resp


def stage_eval(cfg: RunConfig, out: Path, log) -> dict:
    items = read_items(out / "data" / "test.jsonl")
    dirs = {"base": out / "init", "sft": out / "sft" / "hf", "control": out / "control" / "hf",
            "grpo": out / "grpo" / "hf"}
    report = {}
    (out / "eval").mkdir(exist_ok=True)
    for name, path in dirs.items():
        if not (path / "config.json").is_file():
            log(f"eval: {name} missing ({path}), skipped")
            continue
        m, resp = evaluate_model(path, items, cfg.recipe)
        report[name] = m
        with open(out / "eval" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps({"id": it.id, "type": item_type_of(it), "gold": it.answer,
                                    "response": resp[it.id]}, ensure_ascii=False) + "\n")
    return report


COLUMNS = [("SMCQ acc", "smcq_acc"), ("MMCQ strict", "mmcq_strict"), ("MMCQ elastic", "mmcq_elastic"),
           ("format", "format_rate"), ("resp. chars", "response_length"), ("SFT-type acc", "sft_type_acc"),
           ("challenge acc", "challenge_acc"), ("all acc", "accuracy")]
ROW_NAMES = {"base": "base (random init)", "sft": "SFT", "control": "SFT + more SFT (control)",
             "grpo": "SFT + GRPO"}


def report_table(report: dict, names: dict | None = None) -> str:
    """The Markdown table of `report` ({model: metrics}): the rows `names` ({model: label}) in order, by default
    the four recipe models."""
    lines = ["| model | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, label in (names or {m: ROW_NAMES[m] for m in MODELS}).items():
        if name in report:
            lines.append(f"| {label} | " + " | ".join(f"{report[name][k]:.1f}" for _, k in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(out: Path) -> list[Path]:
    """PNG training curves: SFT loss (probe, SFT, control) and GRPO reward, accuracy, zero-std fraction, KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from psyche.metrics import read_metrics

    (out / "plots").mkdir(exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    start = {"probe": 0}
    for name in ("probe", "sft", "control"):  # each run continues the previous one's weights
        rows = read_metrics(out / name) if (out / name / "metrics.jsonl").is_file() else []
        x0 = start.get(name, 0)
        if rows:
            ax.plot([x0 + r["step"] for r in rows], [r["loss"] for r in rows], label=name, lw=1)
        if name == "probe":
            start["sft"] = x0 + len(rows)
        if name == "sft":
            start["control"] = x0 + len(rows)
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


def run_recipe(cfg: RunConfig, stage: str = "all", log=print) -> dict | None:
    """Run the embedded default's stages up to `stage` (all: every stage and the report)."""
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.time()
    stage_data(cfg, out, log)
    timings["data"] = time.time() - t0
    steps = [("select", stage_select), ("sft", stage_sft), ("grpo", stage_grpo), ("control", stage_control)]
    for name, fn in steps:
        if stage in ("select",) and name != "select":
            break
        if stage == "sft" and name not in ("select", "sft"):
            break
        if stage == "grpo" and name == "control":
            break
        t = time.time()
        fn(cfg, out, log)
        timings[name] = time.time() - t
    if stage not in ("all", "eval"):
        return None
    t = time.time()
    report = stage_eval(cfg, out, log)
    timings["eval"] = time.time() - t
    report_json = {**report, "timings_s": timings, "config": {"seed": cfg.run.seed}}
    (out / "report.json").write_text(json.dumps(report_json, indent=2) + "\n")
    table = report_table(report)
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
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the metrics here.")
def task_eval_cmd(run_dir, models, max_new_tokens, batch_size, json_out):
    """Score checkpoints (e.g. the hf/ of sweep runs) on the embedded default's held-out test set
    (RUN_DIR/data/test.jsonl), greedy, with the report's columns."""
    from psyche.config import RecipeSection

    test = Path(run_dir) / "data" / "test.jsonl"
    if not test.is_file():
        raise click.ClickException(f"{test}: no test set; RUN_DIR must be a run of `python train.py`")
    items = read_items(test)
    rc = RecipeSection(max_new_tokens=max_new_tokens, eval_batch=batch_size)
    report = {m: evaluate_model(Path(m), items, rc)[0] for m in models}
    click.echo(report_table(report, names={m: m for m in models}), nl=False)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
