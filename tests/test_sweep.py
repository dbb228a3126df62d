"""Sweeps: grid expansion, seeds, names, the manifest, printed torchrun commands, and a 2 × 2 cells × 2 seeds
sweep of the tiny GRPO config run end to end (directories, resolved configs, plots, compare table)."""

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from psyche.analysis import compare_table, find_runs, plot_pass_rates, plot_runs, run_info
from psyche.config import load_run_config
from psyche.metrics import read_metrics
from psyche.sweep import expand_grid, parse_seeds, parse_sweep, plan, read_manifest, split_values

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-grpo.toml"
SMALL = ["log.progress=false", "grpo.steps=1", "grpo.prompts_per_step=2", "grpo.mini_batch=2", "grpo.group_size=4",
         "grpo.micro_batch=8", "grpo.max_new_tokens=8", "grpo.exact_kl=false", "checkpoint.export=false",
         "grpo.diagnostics=true"]
SWEEP = ["grpo.loss_agg=token-mean,seq-mean-token-mean", "grpo.kl_coef=0,0.001"]
CELLS = ["loss_agg=token-mean,kl_coef=0", "loss_agg=token-mean,kl_coef=0.001",
         "loss_agg=seq-mean-token-mean,kl_coef=0", "loss_agg=seq-mean-token-mean,kl_coef=0.001"]


def _train(*args, timeout=600):
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    return r


def test_values_seeds_and_names():
    assert split_values('a, b,[1, 2],"x,y"') == ["a", "b", "[1, 2]", '"x,y"']
    assert parse_sweep("grpo.kl_coef=0,0.001") == ("grpo.kl_coef", ["0", "0.001"])
    for bad in ("grpo.kl_coef", "grpo.kl_coef=0,,1", "grpo.kl_coef=0,0"):
        with pytest.raises(click.BadParameter):
            parse_sweep(bad)
    assert parse_seeds(None, 5) == [5] and parse_seeds("3", 5) == [5, 6, 7] and parse_seeds("1,9", 0) == [1, 9]
    with pytest.raises(click.BadParameter):
        parse_seeds("0", 0)
    cells = expand_grid([parse_sweep(s) for s in SWEEP])
    assert [c["name"] for c in cells] == CELLS  # first --sweep varies slowest
    assert cells[1]["values"] == {"grpo.loss_agg": "token-mean", "grpo.kl_coef": "0.001"}
    # clashing last components keep the full key; odd characters become '_'
    names = [c["name"] for c in expand_grid([("optim.lr", ["1e-3"]), ("grpo.optim.lr", ["1e-4"]),
                                             ("grpo.paths", ['["a/b.jsonl"]'])])]
    assert names == ["optim.lr=1e-3,grpo.optim.lr=1e-4,paths=__a_b.jsonl__"]
    assert expand_grid([]) == [{"name": "base", "values": {}}]


def test_plan_resolves_every_config_first(tmp_path):
    root, manifest, cfgs = plan("grpo", TINY, ["grpo.steps=3"], tmp_path, SWEEP, "2")
    assert root == tmp_path and len(cfgs) == 8
    run = manifest["runs"][3]
    assert run == {"cell": CELLS[1], "seed": 1, "dir": f"{CELLS[1]}/seed1", "status": "planned"}
    c = cfgs[3]
    assert (c.grpo.loss_agg, c.grpo.kl_coef, c.run.seed, c.grpo.steps) == ("token-mean", 0.001, 1, 3)
    assert c.run.out == str(tmp_path / CELLS[1] / "seed1")
    from psyche.config import ConfigError

    with pytest.raises(ConfigError, match="grpo.loss_agg"):  # a bad value fails before anything runs
        plan("grpo", TINY, [], tmp_path, ["grpo.loss_agg=token-mean,nonsense"], None)


def test_print_commands_writes_configs_and_manifest(tmp_path):
    r = _train("--stage", "grpo", "--config", str(TINY), "--out", str(tmp_path), "--sweep", SWEEP[1], "--seeds", "2",
               "--print-commands", "--nproc", "4")
    assert r.returncode == 0, r.stderr
    cmds = [line for line in r.stdout.splitlines() if line.startswith("torchrun")]
    assert len(cmds) == 4
    d = tmp_path / "kl_coef=0.001" / "seed1"
    assert cmds[-1] == (f"torchrun --standalone --nproc_per_node=4 train.py --stage grpo --config {d}/config.toml "
                        f"--out {d}")
    cfg = load_run_config(d / "config.toml")
    assert cfg.grpo.kl_coef == 0.001 and cfg.run.seed == 1 and cfg.run.out == str(d)
    assert not (d / "metrics.jsonl").exists()
    assert [x["status"] for x in read_manifest(tmp_path)["runs"]] == ["planned"] * 4
    r = _train("--stage", "all", "--sweep", SWEEP[1])
    assert r.returncode != 0 and "--stage sft or --stage grpo" in r.stderr


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, tiny_ckpt):
    out = tmp_path_factory.mktemp("sweep") / "abl"
    sets = [a for s in SMALL + [f'model.init="{tiny_ckpt}"'] for a in ("--set", s)]
    r = _train("--stage", "grpo", "--config", str(TINY), "--out", str(out), "--sweep", SWEEP[0], "--sweep", SWEEP[1],
               "--seeds", "2", *sets)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "sweep done" in r.stdout
    return out


def test_sweep_runs_every_cell_and_seed(sweep_dir):
    m = read_manifest(sweep_dir)
    assert [c["name"] for c in m["cells"]] == CELLS and m["seeds"] == [0, 1]
    assert len(m["runs"]) == 8 and all(r["status"] == "done" for r in m["runs"])
    for r in m["runs"]:
        d = sweep_dir / r["dir"]
        cfg = load_run_config(d / "config.toml")
        cell = next(c for c in m["cells"] if c["name"] == r["cell"])
        assert cfg.grpo.loss_agg == cell["values"]["grpo.loss_agg"]
        assert cfg.grpo.kl_coef == float(cell["values"]["grpo.kl_coef"]) and cfg.run.seed == r["seed"]
        rows = read_metrics(d)
        assert [x["step"] for x in rows] == [1]
        assert rows[0][f"pg_loss/{cfg.grpo.loss_agg}"] == rows[0]["pg_loss"]  # diagnostics on
        assert (d / "pass_rates.jsonl").is_file()
        assert run_info(d)["cell"] == r["cell"] and run_info(d)["seed"] == r["seed"]
    # seeds differ in what they sample; the two kl_coef cells of one seed share step 1's rollouts
    a = read_metrics(sweep_dir / CELLS[0] / "seed0")[0]
    b = read_metrics(sweep_dir / CELLS[1] / "seed0")[0]
    assert a["reward_mean"] == b["reward_mean"] and a["response_length_mean"] == b["response_length_mean"]


def test_rerunning_a_sweep_skips_finished_runs(sweep_dir, tiny_ckpt):
    sets = [a for s in SMALL + [f'model.init="{tiny_ckpt}"'] for a in ("--set", s)]
    r = _train("--stage", "grpo", "--config", str(TINY), "--out", str(sweep_dir), "--sweep", SWEEP[0], "--sweep",
               SWEEP[1], "--seeds", "2", *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("done before, skipped") == 8


def test_sweep_plots_and_compare_table(sweep_dir):
    runs = find_runs([sweep_dir])
    assert len(runs) == 8
    png = plot_runs(runs, ["reward_mean", "kl", "loss/seq-mean-token-sum"], "step", sweep_dir / "plot.png")
    heat = plot_pass_rates(runs, sweep_dir / "pass_rates.png")
    for p in (png, heat):
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = compare_table(runs, ["reward_mean", "kl"])
    lines = table.splitlines()
    assert lines[0] == ("| run | steps | reward_mean final | reward_mean best (max) | kl final | kl best (min) |")
    assert sum(line.startswith(f"| {c}/seed") for c in CELLS for line in lines) == 8
    cell_rows = [line for line in lines if any(line.startswith(f"| {c} | 2 |") for c in CELLS)]
    assert len(cell_rows) == 4 and all("±" in line for line in cell_rows)
    # the CLI: psyche plot / compare on the sweep directory
    r = subprocess.run([sys.executable, "-m", "psyche.cli", "compare", str(sweep_dir), "--metric", "reward_mean",
                        "--out", str(sweep_dir / "compare.md")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (sweep_dir / "compare.md").read_text() == r.stdout and "± " in r.stdout
    r = subprocess.run([sys.executable, "-m", "psyche.cli", "plot", str(sweep_dir), "--x", "tokens", "--metric",
                        "reward_mean", "--out", str(sweep_dir / "cli.png")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert (sweep_dir / "cli.png").is_file() and (sweep_dir / "cli_pass_rates.png").is_file()
    assert json.loads((sweep_dir / "sweep.json").read_text())["stage"] == "grpo"
