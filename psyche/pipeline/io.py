"""Reading inputs and writing resumable step outputs (JSONL).

A step reads records, processes the ones not done yet in batches, and commits each item as soon as it is
decided: first its output records (appended to the step's output files, flushed), then one line in the
step's log (flushed). The log, `<first output>.log.jsonl` unless named, is the ledger of what was done:

    {"key": ..., "status": "kept" | "dropped" | "failed", "reason": short category, "n": {output: count},
     "detail": {...}}

Rules:
- An item's key is its record's "id" (string or integer) when it has one, else the first 16 hex digits of
  the SHA-1 of its canonical JSON. Two input records with the same key: the second is skipped and counted.
- Done = keys with a "kept" or "dropped" line; a rerun skips them. "failed" means the backend gave no answer
  (timeout, HTTP error): the item is not done, and a rerun tries it again.
- Opening a step cuts a torn last log line, then cuts each output back to the records the log accounts for:
  an item interrupted after its outputs but before its log line loses those outputs and is redone. So an
  interrupted step, rerun, processes no item twice and loses none. An output holding fewer records than its
  log accounts for was changed by hand: that is an error, as is an output that exists without its log
  (pass overwrite=True, `--overwrite`, to start again).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from psyche.jsonl import jsonl_lines

DONE = ("kept", "dropped")


class PipelineError(ValueError):
    """An input or output file that cannot be used; the message names the file (and line)."""


def item_key(rec: dict) -> str:
    """The record's "id" when it is a string or integer, else a hash of its content."""
    rid = rec.get("id")
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) != "":
        return str(rid)
    return hashlib.sha1(json.dumps(rec, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def read_records(path: str | Path) -> list[tuple[dict, str]]:
    """(record, "file:line") for each object of a .jsonl file (blank lines skipped) or a .json array."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: input file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise PipelineError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); save "
                            "the file as UTF-8") from None
    out = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        except RecursionError:
            raise PipelineError(f"{path}: invalid JSON: nested too deeply to read") from None
        data = data if isinstance(data, list) else [data]
        for i, rec in enumerate(data):
            out.append((rec, f"{path}[{i}]"))
    else:
        for lineno, line in enumerate(jsonl_lines(text), 1):
            if not line.strip():
                continue
            try:
                out.append((json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path}:{lineno}: invalid JSON (column {e.colno}): {e.msg}") from None
            except RecursionError:
                raise PipelineError(f"{path}:{lineno}: invalid JSON: nested too deeply to read") from None
    for rec, where in out:
        if not isinstance(rec, dict):
            raise PipelineError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return out


def _cut_lines(path: Path, keep: int | None = None) -> int:
    """Keep the first `keep` complete lines of a file (all when None), dropping the rest and a torn last line
    (one without its newline); return how many complete lines the file had."""
    data = path.read_bytes() if path.exists() else b""
    lines = data.split(b"\n")[:-1]  # complete lines only
    keep = len(lines) if keep is None else keep
    if len(lines) > keep or (data and not data.endswith(b"\n")):
        with open(path, "wb") as f:
            f.write(b"".join(line + b"\n" for line in lines[:keep]))
    return len(lines)


@dataclass
class Result:
    """What a step decided for one item: its status, a short reason (the summary groups by it), the records
    it adds to each output, and details for the log."""
    key: str
    status: str  # kept | dropped | failed
    reason: str = ""
    outputs: dict = field(default_factory=dict)  # output name -> list of records
    detail: dict = field(default_factory=dict)


class Summary:
    """Counts of one run of a step; `line()` is what the command prints."""

    def __init__(self, step: str):
        self.step, self.read, self.done_before, self.repeated, self.not_reached = step, 0, 0, 0, 0
        self.status: Counter = Counter()
        self.reasons: Counter = Counter()  # (status, reason) -> n
        self.counts: Counter = Counter()  # step-specific counters, e.g. questions generated
        self.written: Counter = Counter()  # output name -> records written

    def add(self, r: Result):
        self.status[r.status] += 1
        if r.status != "kept" or r.reason:
            self.reasons[(r.status, r.reason or "?")] += 1
        for name, recs in r.outputs.items():
            self.written[name] += len(recs)

    def line(self) -> str:
        s = (f"{self.step}: {self.read} read, {self.done_before} already done, {self.repeated} repeated keys, "
             f"{self.status['kept']} kept, {self.status['dropped']} dropped, {self.status['failed']} failed")
        if self.not_reached:
            s += f", {self.not_reached} left for a later run (limit)"
        parts = [s]
        for status in ("kept", "dropped", "failed"):
            why = [f"{reason} {n}" for (st, reason), n in sorted(self.reasons.items()) if st == status]
            if why:
                parts.append(f"  {status}: " + ", ".join(why))
        if self.counts:
            parts.append("  " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        if self.written:
            parts.append("  written: " + ", ".join(f"{k} {v}" for k, v in self.written.items()))
        return "\n".join(parts)


class Journal:
    """The resumable outputs of one step: named JSONL output files plus the log (see the module docstring)."""

    def __init__(self, outputs: dict[str, str | Path], log: str | Path | None = None, overwrite: bool = False):
        if not outputs:
            raise ValueError("a step needs at least one output")
        self.paths = {name: Path(p) for name, p in outputs.items()}
        first = next(iter(self.paths.values()))
        self.log_path = Path(log) if log else first.with_name(first.name.removesuffix(".jsonl") + ".log.jsonl")
        for p in [*self.paths.values(), self.log_path]:
            p.parent.mkdir(parents=True, exist_ok=True)
            if overwrite and p.exists():
                p.unlink()
        self.done: dict[str, str] = {}
        expected: Counter = Counter()
        if self.log_path.exists():
            _cut_lines(self.log_path)  # drops a torn last line
            for i, line in enumerate(jsonl_lines(self.log_path.read_text(encoding="utf-8")), 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PipelineError(f"{self.log_path}:{i}: invalid JSON: {e.msg}") from None
                if entry.get("status") in DONE:
                    self.done[entry["key"]] = entry["status"]
                for name, n in (entry.get("n") or {}).items():
                    expected[name] += n
        else:
            orphans = [str(p) for p in self.paths.values() if p.exists() and p.stat().st_size]
            if orphans:
                raise PipelineError(f"{', '.join(orphans)} exist(s) but the step's log {self.log_path} does not: "
                                    "pass --overwrite to start again, or --log to name the log")
        for name, p in self.paths.items():
            have = _cut_lines(p, expected[name])
            if have < expected[name]:
                raise PipelineError(f"{p}: holds {have} records but {self.log_path} accounts for "
                                    f"{expected[name]}; was it edited? (--overwrite starts again)")
        self._files = {name: open(p, "a", encoding="utf-8") for name, p in self.paths.items()}
        self._log = open(self.log_path, "a", encoding="utf-8")

    def records(self, name: str) -> list[dict]:
        """The records already in an output (e.g. to rebuild a dedup index on resume)."""
        self._files[name].flush()
        text = self.paths[name].read_text(encoding="utf-8")
        return [json.loads(line) for line in jsonl_lines(text) if line.strip()]

    def commit(self, r: Result):
        """Append the item's outputs, then its log line; both flushed before returning."""
        counts = {}
        for name, recs in r.outputs.items():
            if name not in self._files:
                raise KeyError(f"unknown output {name!r}; outputs are {list(self._files)}")
            if recs:
                self._files[name].write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in recs))
                self._files[name].flush()
            counts[name] = len(recs)
        entry = {"key": r.key, "status": r.status, "reason": r.reason, "n": counts, "detail": r.detail}
        self._log.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._log.flush()
        if r.status in DONE:
            self.done[r.key] = r.status

    def close(self):
        for f in [*self._files.values(), self._log]:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_step(step: str, records: list[tuple[dict, str]], journal: Journal, process, *, batch_size: int = 16,
             limit: int | None = None, summary: Summary | None = None, progress: bool = True) -> Summary:
    """Process every input record not done yet, `batch_size` items at a time, at most `limit` new items.

    process(batch: list[(key, record, where)]) yields one Result per item (in any order); each is committed as
    it is yielded. An exception stops the step; everything committed before it stays done."""
    from tqdm import tqdm

    summary = summary or Summary(step)
    todo, seen = [], set()
    for rec, where in records:
        summary.read += 1
        key = item_key(rec)
        if key in journal.done:
            summary.done_before += 1
        elif key in seen:
            summary.repeated += 1
        else:
            seen.add(key)
            todo.append((key, rec, where))
    if limit is not None and len(todo) > limit:
        summary.not_reached = len(todo) - limit
        todo = todo[:limit]
    bar = tqdm(total=len(todo), desc=step, unit="item", disable=not progress, file=sys.stderr)
    try:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            for r in process(batch):
                journal.commit(r)
                summary.add(r)
                bar.update(1)
    finally:
        bar.close()
    return summary
