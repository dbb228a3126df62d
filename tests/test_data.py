"""SFT data: formats, errors with file:line, assistant-only targets (packed and padded), truncation, packing and
the batch schedule."""

import json

import numpy as np
import pytest

from psyche.data import (IGNORE, DataError, SFTBatches, collate, load_messages, pack, read_records, to_messages,
                         tokenize)
from psyche.tokenizer import SAMPLE_CORPUS, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(SAMPLE_CORPUS, vocab_size=600)


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return p


U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


# ---- formats ----

def test_formats_become_messages():
    w = "f:1"
    assert to_messages({"messages": [U("q"), A("a")]}, "auto", w) == [U("q"), A("a")]
    assert to_messages({"instruction": "Do", "input": "this", "output": "ok", "system": "S"}, "auto", w) == [
        {"role": "system", "content": "S"}, U("Do\nthis"), A("ok")]
    assert to_messages({"instruction": "Do", "input": "", "output": "ok", "history": [["h", "i"]]}, "alpaca", w) == [
        U("h"), A("i"), U("Do"), A("ok")]
    assert to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                       "auto", w) == [U("q"), A("a")]
    item = {"question": "Which?", "options": {"A": "x", "B": "y"}, "answer": "B\u2003", "analysis": "because"}
    assert to_messages(item, "auto", w) == [U("Which?\nA. x\nB. y"), A("<think>because</think>B")]
    assert to_messages({**item, "analysis": ""}, "pceb", w)[1] == A("B")


def test_json_array_records_carry_their_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},\n'
                 '  {"instruction": "i",\n   "output": "o"}\n]\n')
    assert [w for _, w in read_records(p)] == [f"{p}:2", f"{p}:3"]
    assert len(load_messages([p])) == 2


@pytest.mark.parametrize("rows,line,msg", [
    ([{"messages": [U("q"), A("a")]}, '{"messages": [', {"messages": []}], 2, "invalid JSON"),
    ([{"messages": [U("q"), A("a")]}, {"messages": [{"role": "user"}, A("a")]}], 2, "message 0 is missing 'content'"),
    ([{"messages": [{"content": "q"}, A("a")]}], 1, "message 0 is missing 'role'"),
    ([{"messages": [U("q"), A("a")]}, "", {"messages": [U("q"), U("again")]}], 3, "no assistant turn"),
    ([{"messages": [U("q"), {"role": "bot", "content": "a"}]}], 1, "role 'bot'"),
    ([{"messages": [U("q"), A(3)]}], 1, "content must be a string"),
    ([{"prompt": "q", "completion": "a"}], 1, "cannot tell the record's format"),
    ([{"instruction": "q"}], 1, "missing 'output'"),
    ([{"question": "q", "options": {"A": "x"}, "answer": ""}], 1, "empty 'answer'"),
    (["[1, 2]"], 1, "expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, rows, line, msg):
    p = _jsonl(tmp_path, rows)
    with pytest.raises(DataError) as e:
        load_messages([p])
    assert str(e.value).startswith(f"{p}:{line}: ") and msg in str(e.value)


def test_bad_json_array_names_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n {"instruction": "i", "output": "o"},\n {"instruction": "i" "output": "o"}\n]\n')
    with pytest.raises(DataError, match=rf"{p}:3: invalid JSON"):
        load_messages([p])


def test_line_separators_inside_strings_are_text_not_line_breaks(tmp_path):
    r"""U+2028, U+2029 and U+0085 are legal raw inside a JSON string (ensure_ascii=False writes them raw); only
    "\n" ends a JSONL line, and a CRLF file reads alike."""
    text = "one\u2028two\u2029three\x85four"
    rows = [{"messages": [U(text), A("a")]}, {"messages": [U("q"), A("b")]}]
    p = _jsonl(tmp_path, rows)
    assert "\u2028" in p.read_text(encoding="utf-8")
    assert [(r["messages"][0]["content"], w) for r, w in read_records(p)] == [(text, f"{p}:1"), ("q", f"{p}:2")]
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(p.read_bytes().replace(b"\n", b"\r\n") + b'{"mess\r\n')
    with pytest.raises(DataError, match=rf"^{crlf}:3: invalid JSON"):
        load_messages([crlf])


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_unreadable_text_names_file_and_line(tmp_path, suffix):
    """Bytes that are not UTF-8, and a record nested too deeply for the parser, are DataErrors naming the file
    and the line (the third line in both layouts)."""
    good = json.dumps({"messages": [U("q"), A("a")]}).encode()
    latin1 = '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1")
    deep = ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()

    def write(name, bad):
        f = tmp_path / f"{name}{suffix}"
        f.write_bytes(b"\n".join([good, good, bad]) + b"\n" if suffix == ".jsonl" else
                      b"[" + good + b",\n" + good + b",\n" + bad + b"]\n")
        return f

    p = write("latin1", latin1)
    with pytest.raises(DataError, match=rf"^{p}:3: not UTF-8 text \(byte 0xe9 at offset"):
        load_messages([p])
    p = write("deep", deep)
    with pytest.raises(DataError, match=rf"^{p}:3: invalid JSON: nested too deeply to read$"):
        load_messages([p])


def test_empty_dataset_errors(tmp_path, tok):
    with pytest.raises(DataError, match="empty dataset"):
        load_messages([_jsonl(tmp_path, ["", "  "])])
    with pytest.raises(DataError, match="data.paths is empty"):
        load_messages([])
    with pytest.raises(DataError, match="data file not found"):
        load_messages([tmp_path / "missing.jsonl"])
    msgs = load_messages([_jsonl(tmp_path, [{"messages": [U("a long question " * 20), A("a")]}])])
    with pytest.raises(DataError, match="no usable samples"):
        tokenize(msgs, tok, max_length=16)


# ---- targets ----

DIALOGUES = [
    [{"role": "system", "content": "Be kind."}, U("How are you?"), A("Fine, thanks."), U("再见"), A("再见！")],
    [U("Answer: A or B?"), A("<think>B fits.</think>B")],
    [U("one"), A("two")],
]
ASSISTANT_TEXT = [["Fine, thanks.<|im_end|>", "再见！<|im_end|>"], ["<think>B fits.</think>B<|im_end|>"],
                  ["two<|im_end|>"]]


@pytest.mark.parametrize("packed", [True, False])
def test_only_assistant_tokens_are_targets(tok, packed):
    samples = tokenize([(d, f"x:{i}") for i, d in enumerate(DIALOGUES)], tok, max_length=256)
    rows = [[0, 1, 2]] if packed else [[0], [1], [2]]
    b = collate(rows, samples, tok.pad_id, packed)
    x, y = b.input_ids, b.labels
    tgt = y != IGNORE
    # a target is always the next input token, inside the same sample
    assert (y[:, :-1][tgt[:, :-1]] == x[:, 1:][tgt[:, :-1]]).all()
    if packed:
        assert (b.doc_ids[:, 1:][tgt[:, :-1]] == b.doc_ids[:, :-1][tgt[:, :-1]]).all()
    # the targets of each sample, decoded turn by turn, are exactly its assistant turns
    for s, want in enumerate(ASSISTANT_TEXT):
        if packed:
            r, sel = 0, (b.doc_ids[0] == s) & tgt[0]
        else:
            r, sel = s, tgt[s]
        ids = y[r][sel].tolist()
        assert tok.decode(ids) == "".join(want)
        # the runs of consecutive targets are the turns
        pos = sel.nonzero().flatten().tolist()
        runs = np.split(np.array(ids), np.nonzero(np.diff(pos) != 1)[0] + 1)
        assert [tok.decode(r_.tolist()) for r_ in runs] == want
    assert b.n_tokens == sum(len(i) for i in samples.ids)


def test_truncation_policy(tok):
    long_answer = [U("q"), A("word " * 50)]
    long_prompt = [U("word " * 50), A("a")]
    msgs = [(long_answer, "x:1"), (long_prompt, "x:2"), ([U("q"), A("a")], "x:3")]
    dropped = tokenize(msgs, tok, max_length=24, truncation="drop")
    assert len(dropped) == 1 and dropped.n_dropped == 2 and dropped.sources == ["x:3"]
    right = tokenize(msgs, tok, max_length=24, truncation="right")
    assert len(right) == 2 and right.n_truncated == 2 and right.n_dropped == 1  # the prompt-only one goes
    assert len(right.ids[0]) == 24 and right.mask[0][-1]  # cut at the end, the prompt kept
    full, _ = tok.encode_chat(long_answer)
    assert right.ids[0].tolist() == full[:24]


# ---- packing and schedule ----

def test_pack_best_fit():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=300)
    rows = pack(lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(lengths[r].sum() <= 128 for r in rows)
    assert len(rows) <= np.ceil(lengths.sum() / 128) * 1.1  # near the lower bound
    assert pack(lengths, 128) == rows


def _samples(tok, n=37, seed=0):
    rng = np.random.default_rng(seed)
    msgs = [([U("q " * int(rng.integers(1, 30))), A("a " * int(rng.integers(1, 30)))], f"x:{i}") for i in range(n)]
    return tokenize(msgs, tok, max_length=128)


@pytest.mark.parametrize("packing", [True, False])
def test_schedule_covers_each_unit_once_per_epoch_and_splits_across_ranks(tok, packing):
    s = _samples(tok)
    kw = dict(global_batch=4, packing=packing, max_length=128, pad_id=tok.pad_id, seed=3)
    one = SFTBatches(s, micro_batch=2, world_size=1, **kw)
    assert one.accum == 2
    seen = [tuple(r) for step in range(one.steps_per_epoch) for r in one.global_rows(step)]
    assert len(seen) == len(set(seen)) == one.steps_per_epoch * 4
    # epoch 2 is another order of the same units
    seen2 = [tuple(r) for step in range(one.steps_per_epoch, 2 * one.steps_per_epoch) for r in one.global_rows(step)]
    assert seen2 != seen
    # 2 ranks x 1 micro-batch x 2 rows hold the same rows as 1 rank x 2 micro-batches
    two = SFTBatches(s, micro_batch=2, world_size=2, **kw)
    for step in (0, 5):
        a = [m.input_ids for m in one.micro_batches(step, 0)]
        b = [two.micro_batches(step, r)[0].input_ids for r in (0, 1)]
        assert all((x == y).all() for x, y in zip(a, b))
    # a fresh schedule gives the same batch for a step (resume needs only the step)
    again = SFTBatches(s, micro_batch=2, world_size=1, **kw)
    assert again.global_rows(7) == one.global_rows(7)


def test_schedule_errors(tok):
    s = _samples(tok, n=5)
    with pytest.raises(ValueError, match="not a multiple"):
        SFTBatches(s, global_batch=6, micro_batch=4, world_size=1, packing=False, max_length=128, pad_id=0, seed=0)
    with pytest.raises(DataError, match="fewer than one global batch"):
        SFTBatches(s, global_batch=8, micro_batch=4, world_size=1, packing=False, max_length=128, pad_id=0, seed=0)
