"""A whole GRPO step, split into its parts (rollout / reference log-probs / old log-probs / update), with each
sampler path (--paths; default eager and graph), in one process: the tiny GRPO config (or --set model.init=
"preset:qwen2.5-0.5b" for the 0.5B shape) for a few steps each, medians of the steps after the first (which
captures or compiles), and the slowest later step against that median (steady from the second step on?).

    python bench/grpo_step.py                     # CPU: configs/tiny-grpo.toml, 5 steps per sampler path
    python bench/grpo_step.py --steps 8 --set grpo.max_new_tokens=64 --paths eager,graph,compiled
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("time_rollout", "time_reference", "time_old_logprob", "time_update")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-grpo.toml"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--paths", default="eager,graph")
    a = ap.parse_args()
    paths = a.paths.split(",")
    sys.path.insert(0, str(ROOT))
    from psyche.config import load_run_config
    from psyche.grpo.loop import run_grpo
    from psyche.metrics import read_metrics

    results, worst = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            os.environ["PSYCHE_SAMPLER"] = path
            out = Path(tmp) / path
            cfg = load_run_config(a.config, [*a.sets, f"grpo.steps={a.steps}", f"run.out={str(out)!r}",
                                             "log.progress=false", "checkpoint.every=0", "checkpoint.export=false",
                                             "grpo.dump_every=0"])
            run_grpo(cfg)
            rows = read_metrics(out)
            whole = [sum(r[k] for k in PARTS) for r in rows]
            results[path] = {k: statistics.median(r[k] for r in rows[1:]) for k in PARTS}  # step 1 captures
            worst[path] = (whole[0], max(whole[1:]) / statistics.median(whole[1:]))
            print(f"{path}: steps (s) " + " ".join(f"{w:.2f}" for w in whole), flush=True)
    print(f"\nGRPO step parts, medians over steps 2-{a.steps} (s); {a.config} {' '.join(a.sets)}")
    print(f"{'part':18s} " + " ".join(f"{p:>9s}" for p in paths) + f" {'ratio':>7s}")
    for k in [*PARTS, None]:
        vals = [results[p][k] if k else sum(results[p].values()) for p in paths]
        ratio = vals[0] / max(vals[-1], 1e-9)  # the first path's time over the last one's
        print(f"{k or 'whole step':18s} " + " ".join(f"{v:9.3f}" for v in vals) + f" {ratio:6.2f}x")
    for p in paths:
        print(f"{p}: first step {worst[p][0]:.2f} s; slowest later step / median {worst[p][1]:.2f}")


if __name__ == "__main__":
    main()
