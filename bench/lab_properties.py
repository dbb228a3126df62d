"""The lab bench's properties over seeds, from the default cells an ablation already ran (no run of its own):

    python bench/lab_properties.py                 # runs/lab/cells/default/s*
    python bench/lab_properties.py --out runs/lab

Per seed: at step 1, the training accuracy, the median per-prompt pass rate, the share of groups whose reward
has zero std (format reward included), the token entropy and the spread of reply lengths within a group (std / mean); whether GRPO is still improving
at half its steps (the 5-step mean accuracy at 50% and 60% of the steps against the end), the entropy at the
end; held-out greedy accuracy of the SFT model and after GRPO; and the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def window(rows, key, end, k=5):
    vals = [r[key] for r in rows[max(0, end - k):end] if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/lab")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from psyche.analysis import read_metrics

    out = Path(a.out)
    cols = ("seed", "acc@1", "pass_p50@1", "zero_std@1", "entropy@1", "len_cv@1", "acc@50%", "acc@60%", "acc@end",
            "entropy@end", "heldout SFT", "heldout GRPO", "wall_s")
    print(" ".join(f"{c:>12s}" for c in cols))
    for d in sorted((out / "cells" / "default").glob("s*")):
        if not (d / "cell.json").is_file():
            print(f"{d.name:>12s} (not finished)")
            continue
        rows = read_metrics(d / "grpo")
        n = len(rows)
        cell = json.loads((d / "cell.json").read_text())
        sft = json.loads((out / "bench" / d.name / "sft_eval.json").read_text())
        r1 = rows[0]
        vals = (d.name, r1["accuracy"], r1["pass_rate_p50"], r1["zero_std_frac"], r1["entropy"],
                r1["length_cv_in_group"], window(rows, "accuracy", n // 2), window(rows, "accuracy", round(0.6 * n)),
                window(rows, "accuracy", n), window(rows, "entropy", n), sft["heldout_accuracy"],
                cell["heldout_accuracy"], cell["wall_s"])
        print(" ".join(f"{v:>12s}" if isinstance(v, str) else f"{v:12.3f}" for v in vals))


if __name__ == "__main__":
    main()
