"""Sweeps: a grid of config values × seeds, each run in its own directory with its resolved config.

    python train.py --stage grpo --config C --sweep grpo.loss_agg=token-mean,seq-mean-token-mean \\
        --sweep grpo.kl_coef=0,0.001 --seeds 3 --out runs/abl [--print-commands [--nproc 8]]

gives 2 × 2 cells × 3 seeds:

    runs/abl/sweep.json                                    the manifest: stage, base config, overrides, the grid,
                                                           seeds, and per run its cell, seed, directory, status
    runs/abl/loss_agg=token-mean,kl_coef=0/seed0/          an ordinary run directory (config.toml, metrics.jsonl,
    runs/abl/loss_agg=token-mean,kl_coef=0/seed1/ ...      checkpoints/, ...)

Without --config the base is the embedded default's run config (psyche.recipe.embedded_config): give its
GRPO stage a start and prompts, e.g. `--set grpo.init='"runs/mini/sft/hf"'
--set grpo.paths='["runs/mini/data/grpo.jsonl"]'` after `python train.py --stage sft --out runs/mini`.
Values are taken as `--set` takes them (TOML literals, else bare strings); a list value keeps its commas inside
brackets (`--sweep grpo.replay_steps=[1,2],[3]`). Seeds: `--seeds N` runs run.seed, run.seed + 1, ...;
`--seeds 1,7` runs exactly those. Every run's config is resolved (and so checked) before the first one starts.
Runs go one after another in this process (`--nproc 1`), or one torchrun job after another (`--nproc N`); with
`--print-commands` the manifest and each run's config.toml are written and the torchrun commands printed, to
launch wherever. Re-running a sweep skips the runs the manifest marks done with an unchanged config.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

import click

MANIFEST = "sweep.json"
SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


def split_values(text: str) -> list[str]:
    """'a,b,[1, 2],"x,y"' -> ['a', 'b', '[1, 2]', '"x,y"']: split on commas outside brackets and quotes."""
    out, cur, depth, quote = [], "", 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """'grpo.kl_coef=0,0.001' -> ('grpo.kl_coef', ['0', '0.001'])."""
    if "=" not in spec:
        raise click.BadParameter(f"--sweep {spec}: expected SECTION.KEY=V1,V2,...")
    key, values = (s.strip() for s in spec.split("=", 1))
    vals = split_values(values)
    if not key or any(v == "" for v in vals):
        raise click.BadParameter(f"--sweep {spec}: empty key or value")
    if len(set(vals)) != len(vals):
        raise click.BadParameter(f"--sweep {spec}: repeated value")
    return key, vals


def parse_seeds(text: str | None, base: int) -> list[int]:
    """None -> [base]; 'N' -> [base, ..., base + N − 1]; 'a,b,c' -> [a, b, c]."""
    if text is None:
        return [base]
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"--seeds {text}: expected a count N or a list S1,S2,...") from None
    if len(parts) == 1:
        if parts[0] < 1:
            raise click.BadParameter(f"--seeds {text}: the count must be >= 1")
        return list(range(base, base + parts[0]))
    if len(set(parts)) != len(parts):
        raise click.BadParameter(f"--seeds {text}: repeated seed")
    return parts


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each swept key by its last component (`grpo.kl_coef` -> `kl_coef`), or in full where two would clash."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def cell_name(values: dict[str, str], short: dict[str, str]) -> str:
    """{'grpo.loss_agg': 'token-mean', 'grpo.kl_coef': '0'} -> 'loss_agg=token-mean,kl_coef=0' (characters
    that are awkward in paths become '_')."""
    if not values:
        return "base"
    return SAFE.sub("_", ",".join(f"{short[k]}={v}" for k, v in values.items()))


def expand_grid(sweeps: list[tuple[str, list[str]]]) -> list[dict]:
    """The cartesian product, first --sweep varying slowest: [{name, values: {key: text}}]."""
    keys = [k for k, _ in sweeps]
    if len(set(keys)) != len(keys):
        raise click.BadParameter(f"a key is swept twice: {keys}")
    short = short_keys(keys)
    cells = []
    for combo in itertools.product(*[v for _, v in sweeps]):
        values = dict(zip(keys, combo))
        cells.append({"name": cell_name(values, short), "values": values})
    names = [c["name"] for c in cells]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"two cells get the same directory name: {names}")
    return cells


def plan(stage: str, config_path, overrides, out, sweeps, seeds) -> tuple[Path, dict, list]:
    """Resolve every run's config -> (sweep directory, manifest, [RunConfig per run]). Raises on any bad value before anything
    runs. Overrides apply in order: --set, the cell's values, run.seed, run.out."""
    from psyche.config import load_run_config

    cls = None
    if config_path is None:  # as train.py: no --config means the embedded default's settings
        from psyche.recipe import embedded_config as cls
    base = load_run_config(config_path, list(overrides), cls=cls)
    root = Path(out or base.run.out)
    grid = [parse_sweep(s) for s in sweeps]
    cells = expand_grid(grid)
    seed_list = parse_seeds(seeds, base.run.seed)
    runs, cfgs = [], []
    for cell in cells:
        for seed in seed_list:
            d = root / cell["name"] / f"seed{seed}"
            sets = list(overrides) + [f"{k}={v}" for k, v in cell["values"].items()] + \
                [f"run.seed={seed}", f"run.out={json.dumps(str(d))}"]
            cfgs.append(load_run_config(config_path, sets, cls=cls))
            runs.append({"cell": cell["name"], "seed": seed, "dir": str(d.relative_to(root)), "status": "planned"})
    manifest = {"stage": stage, "config": None if config_path is None else str(config_path),
                "overrides": list(overrides), "sweep": {k: v for k, v in grid}, "seeds": seed_list,
                "cells": cells, "runs": runs}
    return root, manifest, cfgs


def write_manifest(root: Path, manifest: dict):
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(root / MANIFEST)


def read_manifest(root) -> dict | None:
    path = Path(root) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def torchrun_command(stage: str, run_dir: Path, nproc: int) -> list[str]:
    """The command that runs one sweep run from its resolved config (written to RUN_DIR/config.toml)."""
    return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "train.py", "--stage", stage,
            "--config", str(run_dir / "config.toml"), "--out", str(run_dir)]


def _done_before(old: dict | None, run: dict, toml: str, root: Path) -> bool:
    if not old:
        return False
    prev = next((r for r in old.get("runs", []) if r["dir"] == run["dir"]), None)
    saved = root / run["dir"] / "config.toml"
    return bool(prev and prev.get("status") == "done" and saved.is_file() and saved.read_text() == toml)


def sweep_main(stage, config_path, overrides, out, sweeps, seeds, print_commands=False, nproc=1):
    """train.py's --sweep / --seeds: plan, write the manifest, then run (or print) each run in turn."""
    from psyche.config import ConfigError, to_toml

    if stage not in ("sft", "grpo"):
        raise click.UsageError("--sweep/--seeds work with --stage sft or --stage grpo")
    if nproc < 1:
        raise click.UsageError("--nproc must be >= 1")
    try:
        root, manifest, cfgs = plan(stage, config_path, overrides, out, sweeps, seeds)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    old = read_manifest(root)
    n = len(cfgs)
    click.echo(f"sweep: {len(manifest['cells'])} cell(s) x {len(manifest['seeds'])} seed(s) = {n} run(s) in {root}")
    if print_commands:
        for run, cfg in zip(manifest["runs"], cfgs):
            d = root / run["dir"]
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.toml").write_text(to_toml(cfg))
        write_manifest(root, manifest)
        for run in manifest["runs"]:
            click.echo(shlex.join(torchrun_command(stage, root / run["dir"], nproc)))
        return
    write_manifest(root, manifest)
    failed = []
    for i, (run, cfg) in enumerate(zip(manifest["runs"], cfgs), 1):
        d = root / run["dir"]
        toml = to_toml(cfg)
        if _done_before(old, run, toml, root):
            run["status"] = "done"
            click.echo(f"[{i}/{n}] {run['dir']}: done before, skipped")
            write_manifest(root, manifest)
            continue
        click.echo(f"[{i}/{n}] {run['dir']}")
        run["status"] = "running"
        write_manifest(root, manifest)
        try:
            if nproc == 1:
                _run_in_process(stage, cfg)
            else:
                d.mkdir(parents=True, exist_ok=True)
                (d / "config.toml").write_text(toml)
                subprocess.run(torchrun_command(stage, d, nproc), check=True)
            run["status"] = "done"
        except Exception as e:  # noqa: BLE001 — one failed run must not stop the grid; the manifest says which
            traceback.print_exc(file=sys.stderr)
            run["status"] = f"failed: {type(e).__name__}: {e}"[:500]
            failed.append(run["dir"])
        write_manifest(root, manifest)
    if failed:
        raise click.ClickException(f"{len(failed)} of {n} run(s) failed: {', '.join(failed)} (see {root / MANIFEST})")
    click.echo(f"sweep done: {root / MANIFEST}; plot with `psyche plot {root}`, tabulate with `psyche compare {root}`")


def _run_in_process(stage: str, cfg):
    if stage == "sft":
        from psyche.sft import run_sft as run
    else:
        from psyche.grpo.loop import run_grpo as run
    run(cfg)
