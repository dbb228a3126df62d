"""A GRPO ablation on the embedded default: one knob, several values, each from every seed's own SFT model.

    python bench/robustness.py --envs native --no-curves        # first: the seeds' main runs (data, SFT, GRPO)
    python bench/ablate.py grpo.advantage=grpo,dr_grpo
    python bench/ablate.py grpo.kl_coef=0.02,0 --seeds 0,1,2,3,4
    python bench/ablate.py grpo.policy_loss=ppo,cispo,gmpo --seeds 0,1,2 --plot docs/ablation-policy-loss.png

For seed S and value V, the GRPO stage runs again (`python train.py --stage grpo --set KEY=V`) in
OUT/KEY=V-sS, on the data and the SFT model of FROM/native-sS (linked, not copied), and the result is scored on
that run's held-out test set as the main job scores it. The value the default already has is not rerun: its
cell is the main run's own GRPO stage. Printed, per value: the mean and min-max over the seeds of held-out
accuracy (all / SFT-type / challenge), of the right-reading rate (sampled), and of GRPO's training curve (the
step at which the training accuracy first reaches 0.95, and the KL at the end); then whether each difference
between the values is larger than the seed-to-seed spread (the values' min-max ranges do not overlap).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("knob", help="KEY=V1,V2,... (a grpo.* key)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--from", dest="src", default="runs/robustness", help="the main runs (native-sS)")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--with", dest="extra", action="append", default=[], metavar="KEY=V",
                   help="a setting for every cell (then every cell is rerun, the default's too)")
    p.add_argument("--plot", help="write the GRPO training curves here (accuracy, KL, entropy per step; mean and "
                                  "min-max over seeds)")
    a = p.parse_args()
    key, values = a.knob.split("=", 1)
    values = values.split(",")
    src, out = ROOT / a.src, ROOT / a.out
    seeds = [int(s) for s in a.seeds.split(",")]
    sys.path.insert(0, str(ROOT))
    from psyche.config import load_run_config
    from psyche.recipe import embedded_config

    default = str(_get(load_run_config(None, [], cls=embedded_config), key))
    cells = {}
    for v in values:
        for s in seeds:
            main_run = src / f"native-s{s}"
            if not (main_run / "report.json").is_file():
                sys.exit(f"{main_run}: no main run of seed {s}; run bench/robustness.py first")
            if v == default and not a.extra:
                cells[(v, s)] = (main_run, json.loads((main_run / "report.json").read_text())["grpo"])
                continue
            d = out / ",".join([f"{key}={v}", *a.extra]).replace("/", "_") if a.extra else out / f"{key}={v}"
            d = d.with_name(d.name + f"-s{s}")
            if not (d / "metrics.json").is_file():
                d.mkdir(parents=True, exist_ok=True)
                for part in ("data", "sft"):
                    if not (d / part).exists():
                        os.symlink(main_run / part, d / part)
                cmd = [sys.executable, "train.py", "--stage", "grpo", "--out", str(d), "--set", f"run.seed={s}",
                       "--set", f"{key}={v}", "--set", "log.progress=false",
                       *[x for e in a.extra for x in ("--set", e)]]
                with open(d / "grpo.log", "w") as f:
                    if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode:
                        sys.exit(f"{' '.join(cmd)} failed; see {d / 'grpo.log'}")
                ev = [sys.executable, "-m", "psyche.cli", "task-eval", str(main_run), str(d / "grpo" / "hf"),
                      "--json", str(d / "metrics.json")]
                subprocess.run(ev, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                print(f"{key}={v} seed {s}: done", flush=True)
            cells[(v, s)] = (d, next(iter(json.loads((d / "metrics.json").read_text()).values())))
    print(table(key, values, seeds, cells, src))
    if a.plot:
        plot(key, values, seeds, cells, Path(a.plot))
        print(f"wrote {a.plot}")


def plot(key, values, seeds, cells, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for v in values:
        runs = [[json.loads(x) for x in (cells[(v, s)][0] / "grpo" / "metrics.jsonl").read_text().splitlines()]
                for s in seeds]
        for ax, metric in zip(axes, ("accuracy", "kl", "entropy")):
            steps = [r["step"] for r in runs[0]]
            ys = [[r[metric] for r in run] for run in runs]
            mean = [sum(c) / len(c) for c in zip(*ys)]
            ax.plot(steps, mean, label=f"{v}")
            ax.fill_between(steps, [min(c) for c in zip(*ys)], [max(c) for c in zip(*ys)], alpha=0.2)
            ax.set_xlabel("GRPO step")
            ax.set_title(f"training {metric} ({len(seeds)} seeds: mean, min-max)")
    axes[0].legend(title=key)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _curve(run: Path) -> tuple[float, float]:
    rows = [json.loads(x) for x in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    first = next((r["step"] for r in rows if r["accuracy"] >= 0.95), float("nan"))
    return first, rows[-1]["kl"]


def table(key, values, seeds, cells, src) -> str:
    keys = [("accuracy", "all"), ("sft_type_acc", "SFT-type"), ("challenge_acc", "challenge"),
            ("right_reading_sampled", "right reading, sampled")]
    lines = [f"| {key} | " + " | ".join(name for _, name in keys) + " | first step with train acc >= 0.95 | KL at the end |",
             "|---" * (len(keys) + 3) + "|"]
    ranges = {}
    for v in values:
        row = [f"{v}"]
        for k, _ in keys:
            xs = [cells[(v, s)][1][k] for s in seeds]
            ranges[(v, k)] = (min(xs), max(xs))
            row.append(f"{sum(xs) / len(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})")
        curves = [_curve(cells[(v, s)][0]) for s in seeds]
        firsts, kls = [c[0] for c in curves], [c[1] for c in curves]
        row.append(f"{sum(firsts) / len(firsts):.1f} ({min(firsts)}-{max(firsts)})")
        row.append(f"{sum(kls) / len(kls):.4f} ({min(kls):.4f}-{max(kls):.4f})")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for k, name in keys:
        for i, v in enumerate(values):
            for w in values[i + 1:]:
                (a0, a1), (b0, b1) = ranges[(v, k)], ranges[(w, k)]
                apart = a1 < b0 or b1 < a0
                lines.append(f"{name}: {v} vs {w}: {'larger than' if apart else 'within'} the seed-to-seed spread")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
