"""The embedded default on several seeds and two SIMD levels: does GRPO's gain hold on every run?

    python bench/robustness.py                       # seeds 0-4, as this machine computes and as an AVX2 CPU would
    python bench/robustness.py --seeds 0 --envs default --no-curves      # one run
    python bench/robustness.py --summary-only        # re-read the runs already made

Each run is a fresh `python train.py --set run.seed=S --out OUT/ENV-sS` in its own process, one at a time
(two CPU-heavy runs on 2 cores slow each other about tenfold). ENV is `native` (what the machine does) or
`avx2` (ATEN_CPU_CAPABILITY=avx2 for the whole run: ATen's SIMD kernels of an AVX2-only CPU, so softmax,
norms and reductions round as they do there; on a machine that is AVX2 already, use `default`, ATen's
scalar fallback, as the other level). With curves (the default), each seed's SFT stage is run a second time
with `recipe.curve_every` set, to record the learning curve of every step of the procedure, and its SFT
weights are checked to be the main run's.

Printed: the table of every run (all / SFT-type / challenge accuracy of SFT, control and GRPO; the gains; the
right-reading rates; wall time), min / mean / max of each row, the issue's criteria per run, and the step at
which each sub-skill of SFT first reaches 90% on held-out items. The same lines go to OUT/summary.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKILL_CROSSINGS = ("course_outside", "dim1", "dim2", "sum", "level", "lines", "letters", "correct")


def run(cmd: list[str], env_name: str, log: Path) -> float:
    env = dict(os.environ)
    if env_name != "native":
        env["ATEN_CPU_CAPABILITY"] = env_name
    t = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {r.returncode}); see {log}")
    return time.time() - t


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def crossing(curve: list[dict], key: str, level: float = 0.9) -> int | None:
    """The first step at which `key` reaches `level` and stays there for the rest of the curve."""
    for i, row in enumerate(curve):
        if all(r[key] >= level for r in curve[i:]):
            return row["step"]
    return None


def fmt_acc(m: dict) -> str:
    return f"{m['accuracy']:.1f} / {m['sft_type_acc']:.1f} / {m['challenge_acc']:.1f}"


def summarize(out: Path, runs: list[tuple[str, int]]) -> str:
    lines = ["| run | SFT all / SFT-type / chall. | control | GRPO | GRPO − SFT | GRPO − control | SFT-type loss "
             "| right reading greedy SFT → GRPO | sampled SFT → GRPO | format SFT | wall |",
             "|---" * 11 + "|"]
    rows, fails, curves = [], [], {}
    for env, seed in runs:
        d = out / f"{env}-s{seed}"
        rep = json.loads((d / "report.json").read_text())
        s, c, g = rep["sft"], rep["control"], rep["grpo"]
        wall = json.loads((d / "wall.json").read_text())["wall_s"] if (d / "wall.json").is_file() else float("nan")
        r = {"gain_sft": g["accuracy"] - s["accuracy"], "gain_control": g["accuracy"] - c["accuracy"],
             "sft_type_loss": s["sft_type_acc"] - g["sft_type_acc"], "sft": s["accuracy"], "control": c["accuracy"],
             "grpo": g["accuracy"], "wall": wall}
        rows.append(r)
        lines.append(f"| {env} seed {seed} | {fmt_acc(s)} | {fmt_acc(c)} | {fmt_acc(g)} | {r['gain_sft']:+.1f} | "
                     f"{r['gain_control']:+.1f} | {r['sft_type_loss']:+.1f} | "
                     f"{s['right_reading_greedy']:.0f} → {g['right_reading_greedy']:.0f} | "
                     f"{s.get('right_reading_sampled', float('nan')):.0f} → {g.get('right_reading_sampled', float('nan')):.0f} | "
                     f"{s['format_rate']:.1f} | {wall:.0f} s |")
        checks = {"GRPO >= SFT + 10": r["gain_sft"] >= 10, "GRPO >= control + 5": r["gain_control"] >= 5,
                  "SFT-type after GRPO >= SFT's - 2": r["sft_type_loss"] <= 2,
                  "SFT format >= 95": s["format_rate"] >= 95, "SFT SFT-type acc >= 60": s["sft_type_acc"] >= 60}
        fails += [f"{env} seed {seed}: {k}" for k, ok in checks.items() if not ok]
        if (out / f"{env}-s{seed}-curve" / "sft" / "curve.jsonl").is_file():
            curves[(env, seed)] = [json.loads(x) for x in
                                   (out / f"{env}-s{seed}-curve" / "sft" / "curve.jsonl").read_text().splitlines()]
    lines.append("")
    for key, name in (("sft", "SFT all"), ("control", "control all"), ("grpo", "GRPO all"),
                      ("gain_sft", "GRPO − SFT"), ("gain_control", "GRPO − control"),
                      ("sft_type_loss", "SFT-type loss"), ("wall", "wall s")):
        v = [r[key] for r in rows]
        lines.append(f"{name}: min {min(v):.1f} / mean {sum(v) / len(v):.1f} / max {max(v):.1f}")
    lines.append("")
    lines.append("criteria: " + ("all met in every run" if not fails else "NOT met: " + "; ".join(fails)))
    if curves:
        lines += ["", "SFT: first step from which each sub-skill stays >= 90% on held-out items of the SFT data's "
                  "kind (course_outside: a course outside 3-12 months)",
                  "| run | " + " | ".join(SKILL_CROSSINGS) + " | right reading sampled, last |",
                  "|---" * (len(SKILL_CROSSINGS) + 2) + "|"]
        latest = {}
        for (env, seed), curve in curves.items():
            cross = {k: crossing(curve, k) for k in SKILL_CROSSINGS}
            for k, v in cross.items():
                latest[k] = max(latest.get(k) or 0, v if v is not None else 10**9)
            lines.append(f"| {env} seed {seed} | " + " | ".join(str(v) if v is not None else "never"
                                                                 for v in cross.values())
                         + f" | {curve[-1]['right_reading_sampled']:.2f} |")
        budget = curves[next(iter(curves))][-1]["step"]
        worst = max(v for v in latest.values())
        lines.append(f"latest crossing {worst if worst < 10**9 else 'never'} of a {budget}-step budget"
                     + (f" ({budget / worst:.1f}x)" if worst < 10**9 else ""))
    return "\n".join(lines) + "\n"


def plot_curves(out: Path, runs: list[tuple[str, int]], path: Path):
    """SFT learning curves of every run, one panel per sub-skill (held-out rate against SFT step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (*SKILL_CROSSINGS, "right_reading_sampled")
    fig, grid = plt.subplots(2, (len(keys) + 1) // 2, figsize=(11, 4.6), sharey=True)
    axes = grid.ravel()
    for env, seed in runs:
        f = out / f"{env}-s{seed}-curve" / "sft" / "curve.jsonl"
        if not f.is_file():
            continue
        curve = [json.loads(x) for x in f.read_text().splitlines()]
        for a, k in zip(axes, keys):
            a.plot([r["step"] for r in curve], [r[k] for r in curve], lw=0.9,
                   color="C0" if env == "native" else "C1", alpha=0.7)
    for a, k in zip(axes, keys):
        a.set_title(k, fontsize=8), a.axhline(0.9, color="grey", lw=0.5, ls=":"), a.set_xlabel("SFT step", fontsize=7)
        a.tick_params(labelsize=7), a.grid(alpha=0.3)
    for a in axes[len(keys):]:
        a.set_visible(False)
    fig.suptitle("SFT from the base model, every run (blue: as this machine computes, orange: ATEN_CPU_CAPABILITY=avx2)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--envs", default="native,avx2", help="native, avx2, default (comma-separated)")
    p.add_argument("--out", default="runs/robustness")
    p.add_argument("--curve-every", type=int, default=10)
    p.add_argument("--no-curves", action="store_true")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--set", dest="sets", action="append", default=[], help="passed to train.py")
    p.add_argument("--plot", default="", help="also draw every run's SFT curves into this PNG")
    a = p.parse_args()
    out = (ROOT / a.out) if not Path(a.out).is_absolute() else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(e, int(s)) for e in a.envs.split(",") for s in a.seeds.split(",")]
    sets = [x for s in a.sets for x in ("--set", s)]
    for env, seed in runs if not a.summary_only else []:
        d = out / f"{env}-s{seed}"
        if not (d / "report.json").is_file():
            wall = run([sys.executable, "train.py", "--set", f"run.seed={seed}", "--set", "log.progress=false",
                        "--out", str(d), *sets], env, out / f"{env}-s{seed}.log")
            (d / "wall.json").write_text(json.dumps({"wall_s": round(wall, 1), "env": env}) + "\n")
            print(f"{env} seed {seed}: {wall:.0f} s", flush=True)
        c = out / f"{env}-s{seed}-curve"
        if not a.no_curves and not (c / "sft" / "curve.jsonl").is_file():
            run([sys.executable, "train.py", "--stage", "sft", "--set", f"run.seed={seed}", "--set",
                 f"recipe.curve_every={a.curve_every}", "--set", "log.progress=false", "--out", str(c), *sets],
                env, out / f"{env}-s{seed}-curve.log")
            same = digest(c / "sft" / "hf" / "model.safetensors") == digest(d / "sft" / "hf" / "model.safetensors")
            print(f"{env} seed {seed}: curve recorded; SFT weights {'identical to' if same else 'DIFFER from'} "
                  "the main run's", flush=True)
    text = summarize(out, [r for r in runs if (out / f"{r[0]}-s{r[1]}" / "report.json").is_file()])
    (out / "summary.md").write_text(text)
    print(text)
    if a.plot:
        plot_curves(out, runs, Path(a.plot))


if __name__ == "__main__":
    main()
