"""SFT data: records from JSONL/JSON files -> chat messages -> token ids with assistant-only loss masks ->
batches, packed or padded.

Formats (one per record; `format = "auto"` decides per record from its keys):
- messages: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
- sharegpt: {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...], "system"?: str}
- alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
            user turn = instruction + "\\n" + input (when input is non-empty)
- pceb:     {"question", "options": {"A": ..., ...}, "answer", "analysis"?}
            user turn = question + one "A. option" line per option; assistant turn =
            "<think>{analysis}</think>{answer}" (just the answer when there is no analysis).

Policies:
- Loss: only assistant turns (content + closing <|im_end|>, every turn of a dialogue) are targets.
- Truncation to `max_length` tokens: "drop" (default) skips longer samples; "right" cuts the end, keeping the
  prompt; a sample with no target token left is dropped either way. Dropped counts are reported.
- Packing (default; measured faster, see bench/sft.py): samples are packed whole into rows of at most
  `max_length` tokens by best-fit decreasing; attention stays inside each sample and positions restart
  (doc_ids). A sample is never split across rows.
- Padding (packing = false): one sample per row, right-padded to the longest row of its micro-batch, with
  length grouping: each epoch's shuffled samples are cut into mega-batches of 16 global batches, each sorted
  by length, so a global batch holds samples of similar length. Right padding needs no attention mask: with
  causal attention no real token sees a pad.
- Order: every epoch reshuffles (seeded by seed and epoch); a global batch's rows are sorted by length and
  dealt to ranks and micro-batches round-robin, so ranks get similar work. The batch of step s is a pure
  function of (data, seed, s): resuming at step s needs nothing more than s.
- Any malformed record is an error naming file and line; nothing is skipped silently.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from psyche.jsonl import jsonl_lines

IGNORE = -100  # label of positions that carry no loss
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
MEGA_BATCHES = 16  # length grouping window, in global batches


class DataError(ValueError):
    """A data file or record that cannot be used; the message starts with `file:line`."""


# ---- reading files ----

TOO_DEEP = "nested too deeply to read"  # json's parser recurses once per level: Python's limit ends it


def read_utf8(path: Path) -> str:
    """The file's text; a DataError naming the file and line of the first byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); save the "
                        "file as UTF-8") from None


def _json_array(text: str, path: Path):
    """(item, line) for each element of a top-level JSON array, with the line where the element starts."""
    dec = json.JSONDecoder()
    n = len(text)

    def skip(i):
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip(0)
    if i >= n or text[i] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        except RecursionError:
            raise DataError(f"{path}:1: invalid JSON: {TOO_DEEP}") from None
        yield obj, 1  # a single object
        return
    i = skip(i + 1)
    while i < n and text[i] != "]":
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        except RecursionError:
            raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: invalid JSON: {TOO_DEEP}") from None
        yield obj, text.count("\n", 0, i) + 1
        i = skip(end)
        if i < n and text[i] == ",":
            i = skip(i + 1)
        elif i < n and text[i] != "]":
            raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: invalid JSON: expected ',' or ']'")
    if i >= n:
        raise DataError(f"{path}:{text.count(chr(10)) + 1}: invalid JSON: unterminated array")


def read_records(path: str | Path):
    """Yield (record, "file:line") from a .jsonl file (one object per line, blank lines ignored) or a .json
    file (an array of objects, or one object)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = read_utf8(path)
    if path.suffix == ".json":
        items = _json_array(text, path)
    else:
        def jsonl():
            for lineno, line in enumerate(jsonl_lines(text), 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), lineno
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON (column {e.colno}): {e.msg}") from None
                except RecursionError:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {TOO_DEEP}") from None
        items = jsonl()
    for obj, line in items:
        where = f"{path}:{line}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield obj, where


# ---- records -> messages ----

def detect_format(rec: dict, where: str) -> str:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec:
        return "alpaca"
    if "question" in rec and "options" in rec:
        return "pceb"
    raise DataError(f"{where}: cannot tell the record's format from its keys {sorted(rec)}; expected "
                    "'messages', 'conversations', 'instruction' or 'question'+'options'")


def _text(rec: dict, key: str, where: str, required=True) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise DataError(f"{where}: missing {key!r}")
        return ""
    if not isinstance(rec[key], str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def format_mc_prompt(question: str, options: dict) -> str:
    """A multiple-choice question as one user turn: the question, then one `A. text` line per option."""
    return question.strip() + "\n" + "\n".join(f"{k}. {str(v).strip()}" for k, v in options.items())


def mc_target(answer: str, analysis: str = "") -> str:
    """`<think>{analysis}</think>{answer}` (the answer alone when there is no analysis). Answers are stripped:
    some PCEB answers end in U+2003 or U+00A0."""
    answer, analysis = answer.strip(), analysis.strip()
    return f"<think>{analysis}</think>{answer}" if analysis else answer


def to_messages(rec: dict, fmt: str, where: str) -> list[dict]:
    """One record -> validated chat messages (roles system/user/assistant, string contents, system first,
    at least one assistant turn)."""
    if fmt == "auto":
        fmt = detect_format(rec, where)
    if fmt == "messages":
        msgs = rec.get("messages")
        if not isinstance(msgs, list):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    elif fmt == "sharegpt":
        conv = rec.get("conversations")
        if not isinstance(conv, list):
            raise DataError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
        msgs = [{"role": "system", "content": _text(rec, "system", where)}] if rec.get("system") else []
        for i, t in enumerate(conv):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise DataError(f"{where}: conversation turn {i} needs 'from' and 'value', got {t!r}")
            if t["from"] not in SHAREGPT_ROLES:
                raise DataError(f"{where}: conversation turn {i}: unknown 'from' {t['from']!r}; "
                                f"expected one of {sorted(SHAREGPT_ROLES)}")
            msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    elif fmt == "alpaca":
        user = _text(rec, "instruction", where)
        inp = _text(rec, "input", where, required=False)
        if inp.strip():
            user = f"{user}\n{inp}"
        msgs = [{"role": "system", "content": _text(rec, "system", where)}] if rec.get("system") else []
        for i, pair in enumerate(rec.get("history") or []):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise DataError(f"{where}: history[{i}] must be [user, assistant] strings")
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec, "output", where)}]
    elif fmt == "pceb":
        opts = rec.get("options")
        if not isinstance(opts, dict) or not opts:
            raise DataError(f"{where}: 'options' must be a non-empty object like {{\"A\": ..., \"B\": ...}}")
        answer = _text(rec, "answer", where)
        if not answer.strip():
            raise DataError(f"{where}: empty 'answer'")
        msgs = [{"role": "user", "content": format_mc_prompt(_text(rec, "question", where), opts)},
                {"role": "assistant", "content": mc_target(answer, _text(rec, "analysis", where, required=False))}]
    else:
        raise DataError(f"{where}: unknown format {fmt!r}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content', got {m!r}")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: message {i} is missing {key!r}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "system" and i != 0:
            raise DataError(f"{where}: message {i} is a system message; only the first message may be one")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant turn, so nothing to learn from")
    return msgs


def load_messages(paths, fmt: str = "auto") -> list[tuple[list[dict], str]]:
    """Every record of every file as (messages, "file:line")."""
    if not paths:
        raise DataError("data.paths is empty: give at least one JSONL/JSON file")
    out = []
    for p in paths:
        n0 = len(out)
        out += [(to_messages(rec, fmt, where), where) for rec, where in read_records(p)]
        if len(out) == n0:
            raise DataError(f"{p}: empty dataset (no records)")
    return out


# ---- messages -> samples ----

@dataclass
class Samples:
    """Tokenised samples: ids[i] (L_i,) int32 and mask[i] (L_i,) bool, mask = token is a loss target."""
    ids: list[np.ndarray]
    mask: list[np.ndarray]
    sources: list[str]
    n_records: int
    n_dropped: int
    n_truncated: int

    def __len__(self):
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)

    def fingerprint(self) -> str:
        """Hash of every token and mask: tells a resumed run whether its data changed."""
        h = hashlib.sha1()
        for x, m in zip(self.ids, self.mask):
            h.update(x.tobytes())
            h.update(np.packbits(m).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        n_tok = int(self.lengths.sum())
        n_tgt = int(sum(int(m.sum()) for m in self.mask))
        return (f"{self.n_records} records -> {len(self)} samples ({self.n_dropped} dropped as too long, "
                f"{self.n_truncated} truncated), {n_tok:,} tokens, {n_tgt:,} targets, "
                f"mean length {n_tok / max(1, len(self)):.0f}")


def tokenize(messages_list, tokenizer, max_length: int, truncation: str = "drop",
             system: str = "default") -> Samples:
    """(messages, where) pairs -> Samples, applying the truncation policy (see the module docstring)."""
    if truncation not in ("drop", "right"):
        raise DataError(f"unknown truncation policy {truncation!r} (drop | right)")
    sys_prompt = None if system == "default" else system
    ids, masks, sources = [], [], []
    dropped = truncated = 0
    for msgs, where in messages_list:
        x, m = tokenizer.encode_chat(msgs, system=sys_prompt)
        if len(x) > max_length:
            if truncation == "drop":
                dropped += 1
                continue
            x, m = x[:max_length], m[:max_length]
            truncated += 1
        if sum(m[1:]) == 0:  # position 0 is never predicted
            dropped += 1
            continue
        ids.append(np.asarray(x, dtype=np.int32))
        masks.append(np.asarray(m, dtype=bool))
        sources.append(where)
    if not ids:
        raise DataError(f"no usable samples: all {len(messages_list)} records were dropped "
                        f"(longer than max_length={max_length} with truncation={truncation!r})")
    return Samples(ids, masks, sources, len(messages_list), dropped, truncated)


# ---- packing and batching ----

def pack(lengths, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices grouped into rows of total length <= capacity. Deterministic
    (ties broken by index)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row index)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens > row capacity {capacity}")
        j = bisect.bisect_left(free, (n, -1))  # the tightest row it still fits in
        if j < len(free):
            space, r = free.pop(j)
            rows[r].append(i)
        else:
            space, r = capacity, len(rows)
            rows.append([i])
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long: the next token where it is a target, IGNORE elsewhere
    doc_ids: torch.Tensor | None  # (B, T) long, packed rows only: sample index within the row
    n_tokens: int  # real (non-pad) tokens

    def to(self, device):
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.labels), mv(self.doc_ids), self.n_tokens)

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


def collate(rows: list[list[int]], samples: Samples, pad_id: int, packed: bool) -> Batch:
    """Rows of sample indices -> a Batch padded on the right to its longest row.

    labels[t] = ids[t + 1] where mask[t + 1] within the same sample; the last token of a sample predicts
    nothing (it would predict the next sample's first token)."""
    lens = [sum(len(samples.ids[i]) for i in row) for row in rows]
    B, T = len(rows), max(lens)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    doc_ids = torch.zeros((B, T), dtype=torch.long) if packed else None
    for b, row in enumerate(rows):
        t = 0
        for d, i in enumerate(row):
            x, m = torch.from_numpy(samples.ids[i]).long(), torch.from_numpy(samples.mask[i])
            L = len(x)
            input_ids[b, t:t + L] = x
            labels[b, t:t + L - 1] = torch.where(m[1:], x[1:], IGNORE)
            if packed:
                doc_ids[b, t:t + L] = d
            t += L
        if packed and t < T:
            doc_ids[b, t:] = len(row)  # the pad tail is its own document
    return Batch(input_ids, labels, doc_ids, sum(lens))


class SFTBatches:
    """The batch schedule: which rows make the global batch of each step, and which of them each rank's
    micro-batches hold.

    global_batch rows per step are dealt as chunks of micro_batch rows: chunk c goes to rank c % world as its
    micro-batch c // world. accumulation = global_batch / (micro_batch * world).
    """

    def __init__(self, samples: Samples, *, global_batch: int, micro_batch: int, world_size: int, packing: bool,
                 max_length: int, pad_id: int, seed: int):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} rows is not a multiple of micro_batch ({micro_batch}) "
                             f"x ranks ({world_size})")
        self.samples, self.G, self.micro, self.world = samples, global_batch, micro_batch, world_size
        self.packing, self.pad_id, self.seed = packing, pad_id, seed
        self.accum = global_batch // (micro_batch * world_size)
        lengths = samples.lengths
        self.units = pack(lengths, max_length) if packing else [[i] for i in range(len(samples))]
        self.unit_len = np.array([int(lengths[u].sum()) for u in self.units], dtype=np.int64)
        self.steps_per_epoch = len(self.units) // global_batch
        if self.steps_per_epoch == 0:
            kind = "packed rows" if packing else "samples"
            raise DataError(f"the dataset makes {len(self.units)} {kind}, fewer than one global batch "
                            f"({global_batch}); lower sft.global_batch or add data")
        self._epoch, self._plan = None, None

    def _epoch_plan(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, G) unit indices; each global batch sorted by length, longest first."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n = self.steps_per_epoch * self.G
            order = rng.permutation(len(self.units))[:n]
            if not self.packing:  # length grouping within mega-batches
                mega = self.G * MEGA_BATCHES
                order = np.concatenate([c[np.argsort(-self.unit_len[c], kind="stable")]
                                        for c in np.split(order, range(mega, n, mega))])
            plan = order.reshape(self.steps_per_epoch, self.G)
            if not self.packing:
                plan = plan[rng.permutation(self.steps_per_epoch)]
            plan = np.stack([g[np.argsort(-self.unit_len[g], kind="stable")] for g in plan])
            self._epoch, self._plan = epoch, plan
        return self._plan

    def position(self, step: int) -> dict:
        """Data position before optimizer step `step` (0-based)."""
        return {"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch}

    def global_rows(self, step: int) -> list[list[int]]:
        pos = self.position(step)
        return [self.units[u] for u in self._epoch_plan(pos["epoch"])[pos["batch"]]]

    def micro_batches(self, step: int, rank: int) -> list[Batch]:
        """This rank's `accum` micro-batches for optimizer step `step` (0-based)."""
        rows = self.global_rows(step)
        chunks = [rows[c:c + self.micro] for c in range(0, self.G, self.micro)]
        mine = chunks[rank::self.world]
        return [collate(ch, self.samples, self.pad_id, self.packing) for ch in mine]
