"""A whole GRPO step, split into its parts (rollout / reference log-probs / old log-probs / update), with the
eager and the compiled sampler, in one process: the tiny GRPO config for a few steps each, medians of the
steps after the first (which compiles).

    python bench/grpo_step.py                     # CPU: configs/tiny-grpo.toml, 5 steps per sampler path
    python bench/grpo_step.py --steps 8 --set grpo.max_new_tokens=64
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
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from psyche.config import load_run_config
    from psyche.grpo.loop import run_grpo
    from psyche.metrics import read_metrics

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("eager", "compiled"):
            os.environ["PSYCHE_SAMPLER"] = path
            out = Path(tmp) / path
            cfg = load_run_config(a.config, [*a.sets, f"grpo.steps={a.steps}", f"run.out={str(out)!r}",
                                             "log.progress=false", "checkpoint.every=0", "checkpoint.export=false",
                                             "grpo.dump_every=0"])
            run_grpo(cfg)
            rows = read_metrics(out)[1:]  # the first step compiles
            results[path] = {k: statistics.median(r[k] for r in rows) for k in PARTS}
    print(f"\nGRPO step parts, medians over steps 2-{a.steps} (s); {a.config}")
    print(f"{'part':18s} {'eager':>9s} {'compiled':>9s} {'ratio':>7s}")
    for k in PARTS:
        e, c = results["eager"][k], results["compiled"][k]
        print(f"{k:18s} {e:9.3f} {c:9.3f} {e / max(c, 1e-9):6.2f}x")
    te, tc = sum(results["eager"].values()), sum(results["compiled"].values())
    print(f"{'whole step':18s} {te:9.3f} {tc:9.3f} {te / tc:6.2f}x")


if __name__ == "__main__":
    main()
