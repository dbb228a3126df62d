"""Looking at runs: `psyche plot`, `psyche compare`, `psyche replay`.

A RUN_DIR argument is a run directory (it holds metrics.jsonl), a sweep directory (it holds sweep.json: all its
runs), or any directory above runs (every run below it). Runs that are seeds of one sweep cell (by the sweep
manifest, or by the `CELL/seedK` layout) are drawn as one mean line with a min–max band and summarised as
mean ± std over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import click

from psyche.data import DataError
from psyche.metrics import METRICS_NAME

DEFAULT_METRICS = ("reward_mean", "accuracy", "kl", "entropy", "response_length_mean")
LOWER_IS_BETTER = ("loss", "kl", "gap", "err", "bias", "time_", "truncation", "zero_std", "grad_norm")
SEED_DIR = re.compile(r"^seed(-?\d+)$")


# ---- reading runs ----

def read_metrics(run_dir) -> list[dict]:
    """Every row of RUN_DIR/metrics.jsonl ([] when there is none); a line that is not a JSON object is a
    DataError naming the file and line (a run killed mid-write can leave a cut last line)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON (column {e.colno}): {e.msg}") from None
        if not isinstance(row, dict) or "step" not in row:
            raise DataError(f"{path}:{n}: expected a JSON object with a 'step', got {line[:60]!r}")
        rows.append(row)
    return rows



def find_runs(paths) -> list[Path]:
    """Run directories named by `paths` (a run, a sweep directory, or a parent of runs), in order, once each."""
    from psyche.sweep import read_manifest

    out: list[Path] = []
    for p in map(Path, paths):
        if (p / METRICS_NAME).is_file():
            found = [p]
        elif (m := read_manifest(p)) is not None:
            found = [p / r["dir"] for r in m["runs"] if (p / r["dir"] / METRICS_NAME).is_file()]
        else:
            found = sorted(f.parent for f in p.rglob(METRICS_NAME))
        if not found:
            raise click.ClickException(f"{p}: no {METRICS_NAME} here or below (not a run or sweep directory)")
        out += [f for f in found if f not in out]
    return out


def run_info(run_dir: Path) -> dict:
    """{dir, cell, seed, label}: the sweep cell and seed from the manifest two levels up, else from a
    `CELL/seedK` layout; a lone run is its own cell."""
    from psyche.sweep import read_manifest

    run_dir = Path(run_dir)
    m = read_manifest(run_dir.parent.parent)
    if m is not None:
        rel = f"{run_dir.parent.name}/{run_dir.name}"
        for r in m["runs"]:
            if Path(r["dir"]).as_posix() == rel:
                return {"dir": run_dir, "cell": r["cell"], "seed": r["seed"], "label": f"{r['cell']}/seed{r['seed']}"}
    if (s := SEED_DIR.match(run_dir.name)):
        return {"dir": run_dir, "cell": run_dir.parent.name, "seed": int(s.group(1)),
                "label": f"{run_dir.parent.name}/{run_dir.name}"}
    return {"dir": run_dir, "cell": run_dir.name, "seed": None, "label": run_dir.name}


def group_cells(runs: list[dict]) -> dict[str, list[dict]]:
    cells: dict[str, list[dict]] = {}
    for r in runs:
        cells.setdefault(r["cell"], []).append(r)
    return cells


# ---- series ----

def _num(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return None


def series(rows: list[dict], metric: str, x: str = "step", smooth: int = 1):
    """(xs, ys) numpy arrays of `metric` over x = step or tokens (cumulative trained tokens: GRPO logs each
    step's tokens, SFT the running total), with a trailing moving average over `smooth` points."""
    import numpy as np

    if x not in ("step", "tokens"):
        raise ValueError(f"x must be step or tokens, got {x!r}")
    per_step = any("update_tokens" in r for r in rows)  # GRPO: "tokens" is this step's count
    xs, ys, total = [], [], 0.0
    for r in rows:
        total += float(r.get("tokens", 0)) if per_step else 0.0
        y = _num(r.get(metric))
        if y is None:
            continue
        xs.append(r["step"] if x == "step" else (total if per_step else float(r.get("tokens", math.nan))))
        ys.append(y)
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if smooth > 1 and len(ys):
        c = np.cumsum(np.insert(ys, 0, 0.0))
        n = np.minimum(np.arange(1, len(ys) + 1), smooth)
        ys = (c[1:] - c[np.arange(len(ys)) + 1 - n]) / n
    return xs, ys


def seed_band(curves: list[tuple]):
    """Mean, min and max across seeds on the first seed's x grid (limited to the range all seeds cover; other
    seeds linearly interpolated, which is exact when x = step and the steps agree)."""
    import numpy as np

    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return np.array([]), np.array([]), np.array([]), np.array([])
    lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    grid = curves[0][0][(curves[0][0] >= lo) & (curves[0][0] <= hi)]
    Y = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, Y.mean(0), Y.min(0), Y.max(0)


# ---- plots ----

def _plt():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise click.ClickException("plots need matplotlib: pip install 'psyche[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(run_dirs, metrics=(), x: str = "step", out=None, smooth: int = 1, title: str | None = None) -> Path:
    """One panel per metric; each sweep cell one colour: a single run as a line, several seeds as their mean
    line and min–max band. Returns the PNG path (default: plot.png in the first directory given)."""
    plt = _plt()
    runs = [run_info(d) for d in run_dirs]
    data = {r["label"]: read_metrics(r["dir"]) for r in runs}
    present = {k for rows in data.values() for row in rows for k in row}
    metrics = list(metrics) or [m for m in DEFAULT_METRICS if m in present] or ["loss"]
    cells = group_cells(runs)
    n = len(metrics)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for i, metric in enumerate(metrics):
        ax = axes[i // cols][i % cols]
        for c, (cell, members) in enumerate(cells.items()):
            col = colours(c % 10)
            curves = [series(data[r["label"]], metric, x, smooth) for r in members]
            if len(members) == 1:
                ax.plot(*curves[0], color=col, lw=1.4, label=cell)
                continue
            grid, mean, lo, hi = seed_band(curves)
            ax.plot(grid, mean, color=col, lw=1.6, label=f"{cell} (mean of {len(members)} seeds)")
            ax.fill_between(grid, lo, hi, color=col, alpha=0.18, lw=0)
        ax.set_title(metric + (f" (moving avg {smooth})" if smooth > 1 else ""), fontsize=10)
        ax.set_xlabel("step" if x == "step" else "trained tokens")
        ax.grid(alpha=0.3)
        if metric not in present:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    for j in range(n, nrows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(2, len(labels)), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * math.ceil(len(labels) / 2), 1, 1))
    out = Path(out) if out else Path(run_dirs[0]).parent / "plot.png" if len(run_dirs) > 1 else \
        Path(run_dirs[0]) / "plot.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def pass_rate_matrix(rows: list[dict], max_cols: int = 120):
    """Pass-rate rows (psyche.grpo.diagnostics.read_pass_rates) -> (prompt ids, column steps, matrix (P, C)) with NaN
    where a prompt was not sampled. Prompts are ordered by their mean pass rate (learned ones at the top); with
    more than `max_cols` steps, consecutive steps are merged into one column (mean of the rates seen there)."""
    import numpy as np

    steps = [r["step"] for r in rows]
    ids = sorted({pid for r in rows for pid in r["pass_rate"]})
    M = np.full((len(ids), len(steps)), np.nan)
    at = {pid: i for i, pid in enumerate(ids)}
    for j, r in enumerate(rows):
        for pid, v in r["pass_rate"].items():
            M[at[pid], j] = v
    if len(steps) > max_cols:
        edges = np.linspace(0, len(steps), max_cols + 1).astype(int)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins stay NaN
                M = np.stack([np.nanmean(M[:, a:b], axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)
        steps = [steps[b - 1] for b in edges[1:]]
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            order = np.argsort(-np.nan_to_num(np.nanmean(M, axis=1), nan=-1.0), kind="stable")
    return [ids[i] for i in order], steps, M[order]


def plot_pass_rates(run_dirs, out) -> Path | None:
    """A heat map per run (prompts × steps, colour = fraction of the group with accuracy 1, grey = not
    sampled that step) for the runs that wrote pass_rates.jsonl (grpo.diagnostics = true); None if none did."""
    from psyche.grpo.diagnostics import read_pass_rates

    have = [(run_info(d), read_pass_rates(d)) for d in run_dirs]
    have = [(r, rows) for r, rows in have if rows][:12]
    if not have:
        return None
    plt = _plt()
    import numpy as np

    cols = min(3, len(have))
    nrows = math.ceil(len(have) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 4.2 * nrows), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # grey: not sampled that step
    im = None
    for k, (r, rows) in enumerate(have):
        ax = axes[k // cols][k % cols]
        ids, steps, M = pass_rate_matrix(rows)
        im = ax.imshow(np.ma.masked_invalid(M), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1,
                       extent=(0.5, len(steps) + 0.5, len(ids) - 0.5, -0.5))
        ticks = np.unique(np.linspace(1, len(steps), min(len(steps), 8)).round().astype(int))
        ax.set_xticks(ticks, [str(steps[t - 1]) for t in ticks])
        if len(ids) <= 40:
            ax.set_yticks(range(len(ids)), [i[-20:] for i in ids], fontsize=6)
        else:
            ax.set_yticks([])
        ax.set_xlabel("step")
        ax.set_ylabel(f"{len(ids)} prompts (by mean pass rate)")
        ax.set_title(r["label"], fontsize=9)
    for j in range(len(have), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="pass rate (accuracy = 1)")
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---- compare ----

def lower_is_better(metric: str) -> bool:
    return any(s in metric for s in LOWER_IS_BETTER)


def summarize(rows: list[dict], metric: str) -> dict | None:
    """{final, best, best_step} of `metric` (best = min for loss/KL/error-like names, else max)."""
    pts = [(r["step"], v) for r in rows if (v := _num(r.get(metric))) is not None and math.isfinite(v)]
    if not pts:
        return None
    pick = min if lower_is_better(metric) else max
    best_step, best = pick(pts, key=lambda p: p[1])
    return {"final": pts[-1][1], "best": best, "best_step": best_step}


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _mean_std(vals: list[float]) -> str:
    if not vals:
        return "–"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return _fmt(m)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{_fmt(m)} ± {_fmt(sd)}"


def compare_table(run_dirs, metrics=()) -> str:
    """Markdown: per run, the final and best value of each metric; then per sweep cell with more than one
    run, mean ± std (ddof 1) over its seeds of the same."""
    runs = [run_info(d) for d in run_dirs]
    data = {r["label"]: read_metrics(r["dir"]) for r in runs}
    present = {k for rows in data.values() for row in rows for k in row}
    metrics = list(metrics) or [m for m in DEFAULT_METRICS if m in present] or ["loss"]
    heads = [h for m in metrics for h in (f"{m} final", f"{m} best ({'min' if lower_is_better(m) else 'max'})")]
    lines = ["| run | steps | " + " | ".join(heads) + " |", "|" + "---|" * (len(heads) + 2)]
    sums = {}
    for r in runs:
        rows = data[r["label"]]
        cells = []
        for m in metrics:
            s = summarize(rows, m)
            sums[(r["label"], m)] = s
            cells += ["–", "–"] if s is None else [_fmt(s["final"]), f"{_fmt(s['best'])} @{s['best_step']}"]
        lines.append(f"| {r['label']} | {rows[-1]['step'] if rows else 0} | " + " | ".join(cells) + " |")
    groups = {c: m for c, m in group_cells(runs).items() if len(m) > 1}
    if groups:
        lines += ["", "| cell | seeds | " + " | ".join(heads) + " |", "|" + "---|" * (len(heads) + 2)]
        for cell, members in groups.items():
            cells = []
            for m in metrics:
                got = [sums[(r["label"], m)] for r in members if sums[(r["label"], m)] is not None]
                cells += [_mean_std([g["final"] for g in got]), _mean_std([g["best"] for g in got])]
            lines.append(f"| {cell} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- replay ----

REPLAY_KEYS = ("loss", "pg_loss", "kl_loss", "entropy_loss", "grad_norm", "clip_frac_low", "clip_frac_high",
               "ratio_mean", "entropy")


def replay(dump, *, diagnostics: bool = False, grad_split: bool = False, grad_out=None) -> dict:
    """Reload a step dump (psyche.grpo.diagnostics.save_step_dump) on the CPU and redo its update exactly as the run
    did: the model, optimizer and RNG from the dump's checkpoint, the same batch, loss settings and mini-/micro-
    batching. Returns {step, logged, replayed, first}: the run's logged metrics, the replayed update's, and the
    loss and gradient norm of the first mini-batch at the dumped weights (its gradient written to `grad_out`
    as safetensors when given). A dump from one CPU process replays bit for bit; one from several ranks is
    reassembled into the global batch and agrees up to summation order."""
    import torch
    from safetensors.torch import save_file

    from psyche import dist
    from psyche.checkpoint import latest_checkpoint, load_checkpoint
    from psyche.config import load_run_config
    from psyche.grpo.diagnostics import StepDiagnostics, load_step_dump
    from psyche.dist import global_norm
    from psyche.grpo import LossConfig, UpdatePlan, micro_loss, select_cov_tokens, selecting_losses, update_policy
    from psyche.run import build_model_for_training, build_optimizer, build_scheduler, resolve_dtype

    dump = Path(dump)
    if not (dump / "step.json").is_file():
        raise click.ClickException(f"{dump}: not a step dump (no step.json); dumps live in RUN_DIR/replay/step_XXXX")
    from safetensors import SafetensorError

    try:
        meta, batch = load_step_dump(dump)
        lc = LossConfig(**meta["loss_config"])
        plan = UpdatePlan(**meta["update"])
    except (ValueError, KeyError, IndexError, TypeError, OSError, SafetensorError) as e:  # damaged or partial
        raise DataError(f"{dump}: not a readable step dump ({type(e).__name__}: {e})") from None
    cfg = load_run_config(dump / "config.toml")
    ckpt = latest_checkpoint(dump)
    if ckpt is None:
        raise DataError(f"{dump}: the dump has no complete checkpoint of the weights before its update "
                        "(checkpoints/step_*); it cannot be replayed")
    if cfg.lora.rank > 0:  # the checkpoint holds the base and its adapters: the layers first, then its values
        from psyche.lora import add_lora, settings
        from psyche.model import Qwen2
        from psyche.model_config import ModelConfig

        with torch.device("meta"):
            model = Qwen2(ModelConfig.from_dir(ckpt))
        add_lora(model, **settings(cfg.lora))
        model = model.to_empty(device="cpu").train()  # every value comes from load_checkpoint below
        model.tie_weights()
    else:
        model = build_model_for_training(ckpt, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.grpo.optim)
    scheduler, _ = build_scheduler(optimizer, cfg.grpo.optim, 1)  # its state (and the LR) come from the dump
    load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=True)
    amp = dist.autocast(model, torch.device("cpu"), resolve_dtype(cfg.model.dtype, torch.device("cpu")))  # as the run
    plan = dataclasses.replace(plan, mini_batch_rows=plan.mini_batch_rows * meta["world_size"])

    rows = list(range(min(plan.mini_batch_rows, batch.input_ids.shape[0])))
    if lc.policy_loss in selecting_losses():  # the tokens the run's update chose for its first mini-batch
        select_cov_tokens(batch, rows, lc, [lc.policy_loss], seed=plan.seed)
    n_tok, n_seq = float(batch.mask[rows].sum()), float(len(rows))
    model.zero_grad(set_to_none=True)
    first_loss = 0.0
    for s in range(0, len(rows), plan.micro_batch):
        with amp:
            loss, logged, _ = micro_loss(model, batch.rows(rows[s:s + plan.micro_batch]), lc, n_tok, n_seq)
        loss.backward()
        first_loss += float(logged["loss"])
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    first = {"loss": first_loss, "grad_norm": float(global_norm(list(grads.values())))}
    if grad_out:
        save_file({k: v.contiguous() for k, v in grads.items()}, str(grad_out))
    model.zero_grad(set_to_none=True)

    diag = StepDiagnostics(lc, grad_split=grad_split) if diagnostics or grad_split else None
    replayed = update_policy(model, optimizer, batch, lc, plan, clip_fn=dist.clip_grad_norm_, diag=diag, amp=amp)
    logged = None
    if (dump / "logged.json").is_file():
        try:
            logged = json.loads((dump / "logged.json").read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{dump / 'logged.json'}:{e.lineno}: invalid JSON: {e.msg}") from None
    else:  # a dump whose run stopped before logging: look in the run's metrics
        logged = next((r for r in read_metrics(dump.parents[1]) if r["step"] == meta["step"]), None)
    return {"step": meta["step"], "world_size": meta["world_size"], "logged": logged, "replayed": replayed,
            "first": first, "rows": int(batch.input_ids.shape[0])}


# ---- commands ----

@click.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--metric", "metrics", multiple=True, help=f"Metric to plot (repeat; default: {', '.join(DEFAULT_METRICS)}).")
@click.option("--x", "x", type=click.Choice(["step", "tokens"]), default="step", show_default=True)
@click.option("--smooth", default=1, show_default=True, help="Trailing moving average over this many points.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (default: plot.png in the run, or beside the runs); the pass-rate heat map goes "
                   "to OUT_pass_rates.png.")
@click.option("--title", default=None)
def plot_cmd(run_dirs, metrics, x, smooth, out, title):
    """Line plots of runs (seeds of a sweep cell: mean and min–max band) and pass-rate heat maps."""
    dirs = find_runs(run_dirs)
    if out is None:
        base = Path(run_dirs[0])
        out = (base / "plot.png") if len(run_dirs) == 1 else base.parent / "plot.png"
    path = plot_runs(dirs, metrics, x, out, smooth, title)
    click.echo(f"wrote {path} ({len(dirs)} run(s))")
    heat = plot_pass_rates(dirs, Path(path).with_name(Path(path).stem + "_pass_rates.png"))
    if heat is not None:
        click.echo(f"wrote {heat}")


@click.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--metric", "metrics", multiple=True, help=f"Metric to tabulate (repeat; default: {', '.join(DEFAULT_METRICS)}).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the table to this file.")
def compare_cmd(run_dirs, metrics, out):
    """Markdown table: final and best value per run, and mean ± std over seeds per sweep cell."""
    table = compare_table(find_runs(run_dirs), metrics)
    click.echo(table, nl=False)
    if out:
        Path(out).write_text(table, encoding="utf-8")


@click.command("replay")
@click.argument("step_dump", type=click.Path(exists=True, file_okay=False))
@click.option("--diagnostics", is_flag=True, help="Also compute the step's counterfactual losses and entropy buckets.")
@click.option("--grad-split", is_flag=True, help="Also split the gradient by term and by advantage sign.")
@click.option("--grad-out", type=click.Path(dir_okay=False), default=None,
              help="Write the first mini-batch's gradient at the dumped weights (safetensors).")
@click.option("--check", is_flag=True, help="Exit 1 unless the replayed loss equals the logged one exactly.")
def replay_cmd(step_dump, diagnostics, grad_split, grad_out, check):
    """Recompute a dumped GRPO step (RUN_DIR/replay/step_XXXX) and print its loss and gradient."""
    r = replay(step_dump, diagnostics=diagnostics, grad_split=grad_split, grad_out=grad_out)
    logged, rep = r["logged"] or {}, r["replayed"]
    click.echo(f"replay of step {r['step']}: {r['rows']} sequences from {r['world_size']} rank(s), "
               f"{rep['optimizer_steps']} optimizer step(s)")
    w = max(24, *(len(k) for k in rep))
    click.echo(f"{'':{w}s} {'logged':>24s} {'replayed':>24s}")
    keys = [k for k in REPLAY_KEYS if k in rep] + sorted(k for k in rep if "/" in k or k == "grad_split_residual")
    for k in keys:
        lv = logged.get(k)
        same = "" if lv is None else ("  exact" if lv == rep[k] else f"  diff {rep[k] - lv:+.3g}")
        click.echo(f"{k:{w}s} {'–' if lv is None else repr(lv):>24s} {rep[k]!r:>24s}{same}")
    click.echo(f"first mini-batch at the dumped weights: loss {r['first']['loss']!r}, "
               f"gradient norm {r['first']['grad_norm']!r}" + (f" (gradient -> {grad_out})" if grad_out else ""))
    if check and logged.get("loss") != rep["loss"]:
        raise click.ClickException(f"replayed loss {rep['loss']!r} != logged {logged.get('loss')!r}")
