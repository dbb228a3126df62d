"""The data pipeline: each step against a real tiny psyche model (in process, and behind `psyche serve` through
the HTTP client), scripted backends where an exact answer is needed, resumability, and client retries."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from psyche.pceb import Item
from psyche.pipeline.backends import Backend, CallableBackend, Failure, LocalBackend, OpenAIBackend
from psyche.pipeline.clean import clean_records, clean_text
from psyche.pipeline.cli import data
from psyche.pipeline.empathy import rewrite_dialogues
from psyche.pipeline.io import Journal, PipelineError, Result, item_key, read_records, run_step
from psyche.pipeline.questions import generate_questions, parse_questions
from psyche.pipeline.rationales import write_rationales
from psyche.pipeline.select import select_challenges, select_step
from psyche.serve import make_server
from psyche.tokenizer import Tokenizer
from psyche.weights import load_pretrained

FAST = dict(temperature=1.0, top_p=1.0, max_tokens=12)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    model, _ = load_pretrained(tiny_ckpt)
    return model, Tokenizer.from_dir(tiny_ckpt)


@pytest.fixture(scope="module")
def server(tiny):
    srv = make_server(*tiny, "tiny", port=0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()
    srv.engine.stop()


@pytest.fixture(params=["local", "http"])
def real(request, tiny):
    """The tiny random model in process, or behind `psyche serve` through the HTTP client."""
    if request.param == "local":
        return LocalBackend(model=tiny[0], tokenizer=tiny[1], batch_size=8)
    return OpenAIBackend(request.getfixturevalue("server"), "tiny", timeout=60, max_retries=0, concurrency=4)


def jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def add_up(s):
    """Every input record is accounted for exactly once."""
    assert s.read == (s.done_before + s.repeated + s.not_reached + s.status["kept"] + s.status["dropped"]
                      + s.status["failed"])


class Scripted(Backend):
    """A real Backend whose replies come from a function of the messages; records what it was asked."""

    def __init__(self, fn, name="scripted"):
        self.fn, self.name, self.asked = fn, name, []

    def complete(self, messages_batch, *, temperature=0.7, top_p=0.9, max_tokens=512, seeds=None):
        self.asked += messages_batch
        return [self.fn(m) for m in messages_batch]


def user(m):
    return m[-1]["content"]


def system(m):
    return m[0]["content"] if m[0]["role"] == "system" else ""


MC = [
    {"id": "q1", "question": "焦虑的核心特征是什么？", "options": {"A": "过度担忧", "B": "情绪高涨", "C": "幻觉", "D": "记忆丧失"},
     "answer": "A", "analysis": ""},
    {"id": "q2", "question": "下列属于认知行为疗法技术的是？", "options": {"A": "自由联想", "B": "认知重构", "C": "释梦",
                                                             "D": "行为实验"}, "answer": "BD "},
    {"id": "q3", "question": "埃里克森提出了几个心理社会发展阶段？", "options": {"A": "四", "B": "六", "C": "八", "D": "十"},
     "answer": "C"},
]


# ---------------------------------------------------------------- clean

def test_clean_text_rules():
    text, removed = clean_text("焦虑很常见😊！！！详见https://ex.com/a?b=1。关注我们的公众号领取资料。认知疗法(CBT)认为,想法影响情绪...")
    assert text == "焦虑很常见！详见。认知疗法（CBT）认为，想法影响情绪……"
    assert removed == {"links": 1, "emoji": 1, "ad_sentences": 1}
    assert clean_text("广告心理学研究消费者 心理。扫描下方二维码 加入QQ群\n⼼理")[0] == "广告心理学研究消费者心理。\n心理"
    assert clean_text("Anxiety is common... See www.foo.com [docs](https://d.org/x). Click here!")[0] == \
        "Anxiety is common... See docs."


PASSAGES = [
    {"text": "焦虑是一种常见的情绪反应，表现为过度担忧、紧张不安以及自主神经功能紊乱，持续时间较长时需要专业评估。"},
    {"text": "焦虑是一种常见的情绪反应，表现为过度担忧、紧张不安以及自主神经功能紊乱，持续时间较长时需要专业评估！"},  # near-dup
    {"text": "短文本。"},  # too short
    {"id": "cbt", "text": "认知行为疗法认为，个体的情绪和行为受到其对事件的认知评价影响，通过识别和修正自动思维可以改善情绪。"},
    {"text": "焦虑是一种常见的情绪反应，表现为过度担忧、紧张不安以及自主神经功能紊乱，持续时间较长时需要专业评估。"},  # same key
    {"content": "没有 text 字段"},
    {"text": "埃里克森将人格发展分为八个阶段，每个阶段都有特定的心理社会危机需要解决，顺利解决会形成相应的积极品质。"},
]


def test_clean_step_dedup_reasons_and_resume(tmp_path):
    inp = jsonl(tmp_path / "raw.jsonl", PASSAGES)
    whole = tmp_path / "whole.jsonl"
    with Journal({"out": whole}) as j:
        s = clean_records(read_records(inp), j, progress=False)
    add_up(s)
    assert (s.status["kept"], s.repeated) == (3, 1)
    assert dict((r, n) for (_, r), n in s.reasons.items()) == {"near-duplicate": 1, "too short": 1, "no text": 1}
    log = lines(whole.with_name("whole.log.jsonl"))
    dup = next(e for e in log if e["reason"] == "near-duplicate")
    assert dup["detail"]["of"] == item_key(PASSAGES[0]) and dup["detail"]["jaccard"] >= 0.8
    # the same through the command, interrupted by --limit and resumed: the same output, nothing twice
    out = tmp_path / "cli.jsonl"
    for limit in ("2", "3", None):
        res = CliRunner().invoke(data, ["clean", str(inp), str(out), "--quiet"] + (["--limit", limit] if limit else []))
        assert res.exit_code == 0, res.output
    assert lines(out) == lines(whole)
    assert "6 already done" in res.output and "1 kept" in res.output
    assert len(lines(out.with_name("cli.log.jsonl"))) == len(PASSAGES) - 1


# ---------------------------------------------------------------- questions

def test_questions_real_backend_records_drops_with_reasons(tmp_path, real):
    inp = jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "text": p["text"]} for i, p in enumerate(PASSAGES[:3])])
    out = tmp_path / "q.jsonl"
    with Journal({"out": out}) as j:
        s = generate_questions(read_records(inp), j, real, n=2, batch_size=2, progress=False, **FAST)
    add_up(s)
    log = lines(out.with_name("q.log.jsonl"))
    assert sorted(e["key"] for e in log) == ["p0", "p1", "p2"]
    assert all(e["status"] == "dropped" and e["reason"] == "unparseable" and e["detail"]["reply"] for e in log)
    with Journal({"out": out}) as j:  # a rerun has nothing left to do
        again = generate_questions(read_records(inp), j, real, n=2, progress=False, **FAST)
    assert again.done_before == 3 and sum(again.status.values()) == 0


def test_questions_parse_check_dedup_scripted(tmp_path):
    good = {"question": "焦虑的核心特征是？", "options": {"A": "A. 过度担忧", "B": "幻觉", "C": "妄想", "D": "遗忘"},
            "answer": "A", "analysis": "焦虑以担忧为核心。"}
    multi = {"question": "属于认知疗法的技术有？", "options": {"A": "认知重构", "B": "释梦", "C": "行为实验", "D": "自由联想"},
             "answer": "C, A"}
    bad = {"question": "缺选项", "options": {"A": "x", "B": "y"}, "answer": "A"}
    rejected = {"question": "一个审核不通过的题？", "options": {"A": "1", "B": "2", "C": "3", "D": "4"}, "answer": "B"}

    def gen(m):
        if "审核" in user(m):  # the quality check
            return "理由：题目有误。\n结论：不合格" if "审核不通过" in user(m) else "理由：题目清楚。\n结论：合格"
        if "第二段" in user(m):
            return "好的：\n```json\n" + json.dumps([good], ensure_ascii=False) + "\n```"  # a duplicate of p0's
        if "第三段" in user(m):
            return "我不会写 JSON。"
        return json.dumps([good, multi, bad, rejected], ensure_ascii=False)

    assert parse_questions(json.dumps({"questions": [good]}, ensure_ascii=False))[0][0][1]["options"]["A"] == "过度担忧"
    inp = jsonl(tmp_path / "p.jsonl", [{"id": "p0", "text": "第一段"}, {"id": "p1", "text": "第二段"},
                                       {"id": "p2", "text": "第三段"}])
    out = tmp_path / "q.jsonl"
    with Journal({"out": out}) as j:
        s = generate_questions(read_records(inp), j, Scripted(gen), progress=False)
    add_up(s)
    kept = lines(out)
    assert [(q["id"], q["answer"]) for q in kept] == [("p0-q0", "A"), ("p0-q1", "AC")]
    assert kept[0]["options"]["A"] == "过度担忧" and kept[0]["source"] == "p0"
    log = {e["key"]: e for e in lines(out.with_name("q.log.jsonl"))}
    assert log["p1"]["reason"] == "duplicate" and log["p2"]["reason"] == "unparseable"
    why = log["p0"]["detail"]["dropped"]
    assert any(w.startswith("invalid: question 2") for w in why) and any(w.startswith("failed check: question 3")
                                                                            for w in why)
    assert s.counts["questions kept"] == 2 and s.counts["questions failed check"] == 1
    pytest.importorskip("psyche.data")
    from psyche.data import to_messages

    for q in kept:  # train.py reads them as PCEB-style items
        msgs = to_messages(q, "auto", "q")
        assert msgs[-1]["content"].endswith(q["answer"])


# ---------------------------------------------------------------- rationales

def rationale_script(m):
    """Round 0 (the built-in prompt): right for q1 and q2, wrong for q3. Revision proposals: "PROMPT-1", then
    "PROMPT-2". Under PROMPT-1 the answer stays right (accepted); under PROMPT-2 it goes wrong (rejected)."""
    if "<prompt>" in user(m):
        return "不足：依据不充分。\n<prompt>PROMPT-2 请更充分地分析</prompt>" if "PROMPT-1" in user(m) else \
            "<prompt>PROMPT-1 请逐项分析</prompt>"
    gold = {"焦虑": "A", "认知行为": "B、D", "埃里克森": "C"}
    answer = next(v for k, v in gold.items() if k in user(m))
    tag = system(m).split()[0] if system(m).startswith("PROMPT") else "R0"
    if "埃里克森" in user(m) or tag == "PROMPT-2":
        answer = "D"
    return f"<think>{tag}: 逐项分析……</think>答案：{answer}"


def test_rationales_keep_only_gold_and_iterate(tmp_path):
    noformat = {"id": "q4", "question": "无格式？", "options": {"A": "1", "B": "2"}, "answer": "B"}
    inp = jsonl(tmp_path / "mc.jsonl", MC + [noformat, {"id": "bad", "question": "没有选项", "answer": "A"}])
    out = tmp_path / "r.jsonl"
    backend = Scripted(lambda m: "只说答案B" if "无格式" in user(m) else rationale_script(m))
    with Journal({"out": out}) as j:
        s = write_rationales(read_records(inp), j, backend, rounds=2, progress=False)
    add_up(s)
    kept = {r["id"]: r for r in lines(out)}
    assert set(kept) == {"q1", "q2"}
    assert kept["q1"]["analysis"] == "PROMPT-1: 逐项分析……"  # round 1 accepted, round 2 rejected
    assert kept["q1"]["rationale_rounds"] == 1 and kept["q2"]["answer"] == "BD"
    log = {e["key"]: e for e in lines(out.with_name("r.log.jsonl"))}
    assert log["q3"]["reason"] == "wrong answer" and log["q4"]["reason"] == "no rationale"
    assert log["bad"]["reason"] == "invalid item"
    hist = log["q1"]["detail"]["history"]
    assert [h["accepted"] for h in hist] == [True, True, False] and hist[2]["pred"] == "D"
    assert log["q1"]["detail"]["prompt"].startswith("PROMPT-1")
    assert s.counts["rounds accepted"] == 2 and s.counts["rounds rejected"] == 2


def test_rationales_real_backend_mechanics(tmp_path, real):
    out = tmp_path / "r.jsonl"
    with Journal({"out": out}) as j:
        s = write_rationales(read_records(jsonl(tmp_path / "mc.jsonl", MC[:2])), j, real, rounds=1, progress=False,
                             **FAST)
    add_up(s)
    log = lines(out.with_name("r.log.jsonl"))
    assert len(log) == 2 and len(lines(out)) == s.status["kept"]
    assert all(e["reason"] in ("no rationale", "no answer", "wrong answer", "") for e in log)


# ---------------------------------------------------------------- empathy

DIALOGUES = [
    {"id": "d1", "messages": [{"role": "user", "content": "我最近总是失眠。"}, {"role": "assistant", "content": "建议规律作息。"},
                              {"role": "user", "content": "试过了，没用。"}, {"role": "assistant", "content": "可以尝试放松训练。"}]},
    {"id": "d2", "question": "考试前很紧张怎么办？", "answer": "多复习。"},
    {"id": "d3", "messages": [{"role": "user", "content": "只有用户"}]},
]


def test_empathy_scripted(tmp_path):
    def fn(m):
        if "放松训练" in user(m):
            return "好的"  # no <reply> block: the whole dialogue is dropped
        return "<reply>听起来这段时间你真的很辛苦，" + user(m).split("原回复：\n")[1] + "</reply>"

    out = tmp_path / "e.jsonl"
    with Journal({"out": out}) as j:
        s = rewrite_dialogues(read_records(jsonl(tmp_path / "d.jsonl", DIALOGUES)), j, Scripted(fn), progress=False)
    add_up(s)
    assert lines(out) == [{"id": "d2", "messages": [{"role": "user", "content": "考试前很紧张怎么办？"},
                                                    {"role": "assistant", "content": "听起来这段时间你真的很辛苦，多复习。"}]}]
    log = {e["key"]: e for e in lines(out.with_name("e.log.jsonl"))}
    assert log["d1"]["reason"] == "no <reply> block" and log["d1"]["detail"]["turns"][0]["turn"] == 3
    assert log["d3"]["reason"] == "invalid dialogue"


def test_empathy_real_backend_mechanics(tmp_path, real):
    out = tmp_path / "e.jsonl"
    with Journal({"out": out}) as j:
        s = rewrite_dialogues(read_records(jsonl(tmp_path / "d.jsonl", DIALOGUES)), j, real, progress=False, **FAST)
    add_up(s)
    assert len(lines(out.with_name("e.log.jsonl"))) == 3 and len(lines(out)) == s.status["kept"]


# ---------------------------------------------------------------- select

def letter(ch, name):
    return Scripted(lambda m: f"<think>想一想</think>答案是{ch}", name=name)


def test_select_rules_scripted():
    items = [dict(MC[0]), Item("it2", "theory", "single", "题？", {"A": "1", "B": "2", "C": "3", "D": "4"}, "B"),
             dict(MC[2]), dict(MC[1]), {"question": "坏", "options": {}, "answer": "A"}]
    sa, sb = letter("A", "always-A"), letter("B", "always-B")
    challenge, rest, recs = select_challenges(items, [sa, sb], k=2)
    assert rest == [items[0], items[1]] and challenge == [items[2], items[3]]  # partial "B" of "BD" is wrong
    assert [r["status"] for r in recs] == ["non_challenge", "non_challenge", "challenge", "challenge", "invalid"]
    assert recs[0]["answers"] == {"always-A": ["A", "A"]}  # solved by the first selector: B not asked
    assert recs[1]["answers"] == {"always-A": ["A", "A"], "always-B": ["B", "B"]}
    assert len(sb.asked) == 2 * 3
    _, _, recs = select_challenges(items[:3], [sa, CallableBackend(lambda m, s: Failure("HTTP 500"), "down")], k=1)
    assert [r["status"] for r in recs] == ["non_challenge", "failed", "failed"]


def test_select_with_psyche_models_local_and_served(tmp_path, tiny, server):
    items = [Item(f"i{i}", "theory", "single", f"第{i}题：焦虑属于哪类情绪？", {"A": "负性", "B": "正性", "C": "中性", "D": "无"},
                  "A") for i in range(3)] + [dict(MC[1])]
    selectors = [LocalBackend(model=tiny[0], tokenizer=tiny[1], name="tiny-local"),
                 OpenAIBackend(server, "tiny", max_retries=0, name="tiny-http")]
    challenge, rest, recs = select_challenges(items, selectors, k=2, early_stop=False, **FAST)
    assert len(challenge) + len(rest) == len(items) and all(r["status"] != "failed" for r in recs)
    assert all(len(r["answers"]["tiny-local"]) == 2 and len(r["answers"]["tiny-http"]) == 2 for r in recs)
    for r, it in zip(recs, items):  # the pool follows the rule
        assert (it in challenge) == (sum(r["correct"].values()) == 0)
    # the command, through the HTTP client: pools in the formats train.py reads, resumable
    inp = jsonl(tmp_path / "mc.jsonl", MC)
    ch, nc = tmp_path / "grpo.jsonl", tmp_path / "sft.jsonl"
    args = ["select", str(inp), "--challenge", str(ch), "--non-challenge", str(nc), "--selector",
            f"tiny@{server}", "-k", "2", "--max-tokens", "8", "--quiet", "--retries", "0"]
    res = CliRunner().invoke(data, args)
    assert res.exit_code == 0, res.output
    pools = lines(ch) + lines(nc)
    assert sorted(r["id"] for r in pools) == ["q1", "q2", "q3"]
    assert all(set(r) >= {"question", "options", "answer"} for r in pools)
    res = CliRunner().invoke(data, args)
    assert "3 already done" in res.output and lines(ch) + lines(nc) == pools


# ---------------------------------------------------------------- the commands

def test_commands_with_local_and_http_backends(tmp_path, tiny_ckpt, server):
    passages = jsonl(tmp_path / "p.jsonl", [{"id": "p0", "text": PASSAGES[0]["text"]}])
    mc, dialogues = jsonl(tmp_path / "mc.jsonl", MC[:1]), jsonl(tmp_path / "d.jsonl", DIALOGUES[1:2])
    common = ["--max-tokens", "8", "--quiet", "--retries", "0"]
    for spec in (f"local:{tiny_ckpt}", f"tiny@{server}"):
        for cmd, inp, extra in (("questions", passages, ["-n", "1", "--lang", "en"]),
                                ("rationales", mc, ["--rounds", "1"]), ("empathy", dialogues, [])):
            out = tmp_path / f"{cmd}-{spec[:5]}.jsonl"
            res = CliRunner().invoke(data, [cmd, str(inp), str(out), "--backend", spec, *common, *extra])
            assert res.exit_code == 0, res.output
            assert f"{cmd}: 1 read" in res.output and len(lines(out.with_name(out.stem + ".log.jsonl"))) == 1
    res = CliRunner().invoke(data, ["empathy", str(dialogues), str(tmp_path / "x.jsonl"), "--backend", "nonsense"])
    assert res.exit_code == 2 and "local:PATH or MODEL@" in res.output


# ---------------------------------------------------------------- resumability

class Interrupt(Exception):
    pass


def test_interrupted_step_resumes_without_repeats_or_losses(tmp_path):
    items = [{"id": f"k{i}", "question": f"焦虑题{i}？", "options": {"A": "对", "B": "错"}, "answer": "A"} for i in range(7)]
    inp = jsonl(tmp_path / "mc.jsonl", items)
    out = tmp_path / "r.jsonl"
    asked = []

    def make(fail_after):
        def fn(m):
            if fail_after is not None and len(asked) >= fail_after:
                raise Interrupt("simulated crash")
            asked.append(user(m).split("？")[0][-1])  # the item number
            return "<think>分析</think>答案：A"
        return Scripted(fn)

    with pytest.raises(Interrupt):
        with Journal({"out": out}) as j:
            write_rationales(read_records(inp), j, make(4), rounds=0, batch_size=1, progress=False)
    first = [r["id"] for r in lines(out)]
    assert first == ["k0", "k1", "k2", "k3"]
    asked_first = list(asked)
    with Journal({"out": out}) as j:
        s = write_rationales(read_records(inp), j, make(None), rounds=0, batch_size=1, progress=False)
    assert s.done_before == 4 and s.status["kept"] == 3
    assert asked[len(asked_first):] == ["4", "5", "6"]  # no item asked again
    assert [r["id"] for r in lines(out)] == [f"k{i}" for i in range(7)]  # none lost, none twice


def test_journal_repairs_a_torn_commit(tmp_path):
    out = tmp_path / "o.jsonl"

    def commit_all(keys):
        with Journal({"out": out}) as j:
            return run_step("t", [({"id": k}, "x") for k in keys], j,
                            lambda b: (Result(k, "kept", outputs={"out": [{"id": k}]}) for k, _, _ in b),
                            progress=False)

    commit_all(["a", "b"])
    with open(out, "a") as f:  # a crash after writing c's output, before its log line
        f.write(json.dumps({"id": "c"}) + "\n{\"id\": \"d")
    with open(out.with_name("o.log.jsonl"), "a") as f:  # and a torn log line
        f.write('{"key": "c", "sta')
    s = commit_all(["a", "b", "c", "d"])
    assert s.done_before == 2 and s.status["kept"] == 2
    assert [r["id"] for r in lines(out)] == ["a", "b", "c", "d"]
    with open(out, "w") as f:  # an output shorter than its log accounts for was edited: refuse
        f.write(json.dumps({"id": "a"}) + "\n")
    with pytest.raises(PipelineError, match="accounts for 4"):
        Journal({"out": out})
    out.with_name("o.log.jsonl").unlink()  # an output without its log: refuse, unless starting again
    with pytest.raises(PipelineError, match="--overwrite"):
        Journal({"out": out})
    with Journal({"out": out}, overwrite=True) as j:
        assert not j.done and j.records("out") == []


def test_jsonl_readers_split_lines_at_newline_only(tmp_path):
    """U+2028, U+2029 and U+0085 are legal raw inside JSON strings, and json.dumps(ensure_ascii=False) writes them
    raw: every JSONL reader keeps them as text (str.splitlines() would cut the record there)."""
    from psyche.metrics import MetricsLogger, read_metrics
    from psyche.pceb import Item
    from psyche.recipe import _jsonl, read_items

    text = "第一行\u2028第二行\u2029第三段\x85完"
    inp = jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": text}, {"id": "b", "text": "x"}])
    assert [(r["text"], w) for r, w in read_records(inp)] == [(text, f"{inp}:1"), ("x", f"{inp}:2")]
    out = tmp_path / "o.jsonl"
    step = lambda b: (Result(k, "kept", outputs={"out": [r]}, detail={"note": text}) for k, r, _ in b)  # noqa: E731
    with Journal({"out": out}) as j:
        run_step("t", read_records(inp), j, step, progress=False)
    with Journal({"out": out}) as j:  # reopened: the log and the outputs read back whole
        assert j.done == {"a": "kept", "b": "kept"} and j.records("out")[0]["text"] == text

    log = MetricsLogger(tmp_path)
    for s in (1, 2, 3):
        log.log(s, {"note": text})
    log.close()
    assert [r["note"] for r in read_metrics(tmp_path)] == [text] * 3
    MetricsLogger(tmp_path, resume_step=2).close()  # truncating keeps the lines whole
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]

    item = Item(id="i1", category="theory", qtype="single", question=text, options={"A": text, "B": "b"}, answer="A")
    _jsonl(tmp_path / "items.jsonl", [vars(item)])  # the recipe's own writer
    assert read_items(tmp_path / "items.jsonl") == [item]


def test_input_that_is_not_utf8_or_nested_too_deeply_names_file_and_line(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a"}\n{"id": "caf\xe9"}\n')
    with pytest.raises(PipelineError, match=rf"^{p}:2: not UTF-8 text \(byte 0xe9"):
        read_records(p)
    p.write_text('{"id": "a"}\n{"x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(PipelineError, match=rf"^{p}:2: invalid JSON: nested too deeply"):
        read_records(p)


# ---------------------------------------------------------------- the HTTP client against a misbehaving server

class Misbehaving(BaseHTTPRequestHandler):
    """/v1 -> 500 always; /slow/v1 -> answers after 1 s; /flaky/v1 -> 500 twice, then a reply; /bad/v1 -> 400."""
    hits = {}

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        n = Misbehaving.hits[self.path] = Misbehaving.hits.get(self.path, 0) + 1
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        if self.path.startswith("/flaky") and n > 2:
            body, status = {"choices": [{"message": {"role": "assistant", "content": "<think>x</think>答案：A"}}]}, 200
        elif self.path.startswith("/bad"):
            body, status = {"error": {"message": "bad field"}}, 400
        else:
            body, status = {"error": {"message": "internal"}}, 500
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass


@pytest.fixture
def misbehaving():
    Misbehaving.hits = {}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def client(url, **kw):
    b = OpenAIBackend(url, "m", max_retries=2, backoff=0.05, timeout=0.3, concurrency=2, **kw)
    b.delays = []
    b.sleep = b.delays.append  # record the backoff instead of sleeping
    return b


def test_client_retries_with_backoff_then_reports_per_item(misbehaving, tmp_path):
    msgs = [[{"role": "user", "content": "x"}]] * 2
    b = client(misbehaving + "/v1")
    out = b.complete(msgs)
    assert all(isinstance(r, Failure) and "gave up after 3 attempts: HTTP 500: internal" in r.reason for r in out)
    assert b.attempts == 6 and sorted(b.delays) == [0.05, 0.05, 0.1, 0.1]
    slow = client(misbehaving + "/slow/v1")
    assert "timed out" in slow.complete(msgs[:1])[0].reason and slow.attempts == 3
    flaky = client(misbehaving + "/flaky/v1")
    assert flaky.complete(msgs[:1]) == ["<think>x</think>答案：A"] and flaky.delays == [0.05, 0.1]
    bad = client(misbehaving + "/bad/v1")
    assert "HTTP 400: bad field" in bad.complete(msgs[:1])[0].reason and bad.attempts == 1  # 4xx: no retry
    # in a step: every item is reported as failed, the step finishes, and a rerun tries them again
    inp = jsonl(tmp_path / "mc.jsonl", MC)
    out_path = tmp_path / "r.jsonl"
    for run in range(2):
        with Journal({"out": out_path}) as j:
            s = write_rationales(read_records(inp), j, client(misbehaving + "/v1"), progress=False)
        assert s.status["failed"] == 3 and s.done_before == 0
    log = lines(out_path.with_name("r.log.jsonl"))
    assert len(log) == 6 and all("HTTP 500" in e["detail"]["history"][0]["error"] for e in log)
    with Journal({"challenge": tmp_path / "c.jsonl", "non_challenge": tmp_path / "n.jsonl"}) as j:
        s = select_step(read_records(inp), j, [client(misbehaving + "/flaky/v1")], progress=False)
    assert s.status["kept"] == 3  # the flaky server answers by now: every item lands in a pool
