"""Training metrics: one JSON line per step in RUN_DIR/metrics.jsonl, optional TensorBoard scalars, and the
dense one-line step summary printed to the console.

Generic over keys: the SFT loop logs a handful, GRPO about forty; nothing here knows which.
Only rank 0 writes (other ranks get a disabled logger).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from psyche.jsonl import jsonl_lines

METRICS_NAME = "metrics.jsonl"


def _jsonable(v):
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()  # 0-d tensors and numpy scalars
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf; "nan" / "inf" / "-inf" keep the line valid JSON
    return v


class MetricsLogger:
    """`.log(step, {...})` appends `{"step": step, ...}` to RUN_DIR/metrics.jsonl (flushed per line) and, when
    asked, writes every numeric value as a TensorBoard scalar under RUN_DIR/tb.

    resume_step: when resuming from a checkpoint at that step, lines of later steps (written by the run that
    was interrupted after its last checkpoint) are dropped first, so each step appears once.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, enabled: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_NAME
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def _truncate_after(self, step: int):
        keep = []
        for line in jsonl_lines(self.path.read_text(encoding="utf-8")):
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass  # a line cut short by a kill
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every row of RUN_DIR/metrics.jsonl. A last line cut short (a run killed while writing it) is skipped;
    any other line that is not a JSON object is a DataError naming the file and line."""
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return []
    lines = jsonl_lines(path.read_text(encoding="utf-8"))
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break  # cut short by a kill: the step is redone on resume
            from psyche.data import DataError

            raise DataError(f"{path}:{i}: not a metrics row ({e.msg})") from None
        if not isinstance(row, dict):
            from psyche.data import DataError

            raise DataError(f"{path}:{i}: not a metrics row (a JSON {type(row).__name__}, not an object)")
        rows.append(row)
    return rows


# ---- the step line ----

# key -> (label, format); keys not listed print as `key value` with 4 significant digits
_FORMATS = {
    "loss": ("loss", "{:.3f}"),
    "lr": ("lr", "{:.1e}"),
    "grad_norm": ("gnorm", "{:.2f}"),
    "tok_per_s": ("tok/s", None),
}


def human(n: float) -> str:
    """12345 -> '12.3k', 4.2e6 -> '4.2M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.1f}" if isinstance(n, float) else str(n)


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt(k, v) -> str:
    label, fmt = _FORMATS.get(k, (k, None))
    if k == "tok_per_s":
        return f"{label} {human(v)}"
    if isinstance(v, float):
        return f"{label} {fmt.format(v) if fmt else f'{v:.4g}'}"
    return f"{label} {v}"


def step_line(metrics: dict, *, step: int | None = None, total: int | None = None, elapsed: float | None = None,
              keys=None) -> str:
    """`step 12/100 | loss 2.314 | lr 1.0e-05 | gnorm 0.91 | tok/s 12.3k | 0:01:23`.

    keys: which metrics to show, in order (default: all of them, in insertion order).
    """
    parts = []
    if step is not None:
        parts.append(f"step {step}/{total}" if total else f"step {step}")
    for k in keys if keys is not None else metrics:
        if k in metrics and k != "step":
            parts.append(_fmt(k, _jsonable(metrics[k])))
    if elapsed is not None:
        parts.append(duration(elapsed))
    return " | ".join(parts)
