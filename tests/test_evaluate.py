"""PCEB / CPsyExam loading, extraction, credit, scoring and the report table, on crafted and real data."""

import json
import zipfile

import pytest

from psyche.evaluate import (BenchmarkError, Item, accuracy_summary, build_prompt, credit, cpsyexam_submission,
                             extract_answer, extract_cpsyexam, load_cpsyexam, load_pceb, read_predictions,
                             report_markdown, score_cpsyexam, score_predictions, seed_averages, segment,
                             text_scores)
from psyche.pceb import PSYCHE_SYSTEM, PSYCHE_USER_PREFIX

OPTS = {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}


def choice(answer, q="题目（　　）。"):
    return {"id": 1, "question": q, "options": OPTS, "answer": answer, "analysis": "解析"}


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def make_pceb(root):
    """A small PCEB tree with the real data's quirks, and responses whose scores are known by hand."""
    b = root / "benchmark"
    write_json(b / "theory/single/x/a.json", [choice(a) for a in "ABCD"])
    write_json(b / "theory/multiple/x/b.json", [choice("ABD"), choice("AC"), choice("BCD"), choice("")])
    write_json(b / "moral/single/x/a.json", [choice("C\u2003"), choice("A")])
    write_json(b / "moral/multiple/x/b.json", [choice("AB"), choice("ABCD")])
    case = {"general_info": "求助者，女，28岁。", "case_introduction": "近半年来情绪低落。"}
    write_json(b / "cases/mix/x/c.json", [{**case, "questions_and_answers": [
        {"question": "单选：1．症状是（　　）。", "options": OPTS, "answer": "B\u00a0", "analysis": ""},
        {"question": "多选：2．可以（　　）。", "options": OPTS, "answer": "AC", "analysis": ""},
        {"question": "单选：3．情绪状态是（　　）。", "options": OPTS, "answer": "BCD", "analysis": ""}]}])
    write_json(b / "cases/essay/x/d.json", [{**case, "questions_and_answers": [
        {"question": "1．可考虑哪些诊断？（10 分）", "answer": "焦虑，失眠"},
        {"question": "2．原因？（10 分）", "answer": "焦虑"}]}])
    responses = {
        "theory/single/x/a.json#0": "答案：A", "theory/single/x/a.json#1": "B",
        "theory/single/x/a.json#2": "我不知道", "theory/single/x/a.json#3": "答案：A",
        "theory/multiple/x/b.json#0": "ABD", "theory/multiple/x/b.json#1": "A",
        "theory/multiple/x/b.json#2": "ABC", "theory/multiple/x/b.json#3": "ABCD",
        "moral/single/x/a.json#0": "C", "moral/single/x/a.json#1": "B",
        "moral/multiple/x/b.json#0": "<think>ABCD</think>答案：AB", "moral/multiple/x/b.json#1": "答案：A、B、C",
        "cases/mix/x/c.json#0.0": "B", "cases/mix/x/c.json#0.1": "C", "cases/mix/x/c.json#0.2": "BCD",
        "cases/essay/x/d.json#0.0": "焦虑，抑郁", "cases/essay/x/d.json#0.1": "",
    }
    return root, responses


# Values of make_pceb's responses, worked out by hand.
BLEU_PAIR = 100 * (2 / 3 * 1 / 2 * 0.1 * 0.1) ** 0.25  # p1 2/3, p2 1/2, p3 and p4 smoothed to 0.1/1 (method1)
EXPECTED = {
    "theory_smcq": 100 * 2 / 3,  # 2 exact of 3 answered (one missing)
    "theory_mmcq_strict": 100 / 3, "theory_mmcq_elastic": 50.0,  # credits 1 + 1/2 + 0; empty gold skipped
    "moral_smcq": 50.0, "moral_mmcq_strict": 50.0, "moral_mmcq_elastic": 87.5,  # credits 1 + 3/4
    "case_smcq": 100.0, "case_mmcq_strict": 50.0, "case_mmcq_elastic": 75.0,  # credits 1/2 + 1
    "avg": (100 + 50 + 50 + 50 + 200 / 3 + 100 / 3) / 6, "avg_elastic": (100 + 75 + 50 + 87.5 + 200 / 3 + 50) / 6,
    "case_qa_rouge1": 100 / 3, "case_qa_rougeL": 100 / 3, "case_qa_bleu4": BLEU_PAIR / 2,
    "missing": 1,
}


# ---------------------------------------------------------------- extraction and credit

EXTRACTION = [
    # (response, type, expected)
    ("答案：C", "single", "C"),
    ("The answer is B.", "single", "B"),
    ("Because A is wrong, the answer is (D).", "single", "D"),  # "Because" is a word, not a B
    ("CBT and DSM are relevant here.", "single", ""),  # letters inside words are not answers
    ("我认为A项不对，正确答案是C。", "single", "C"),
    ("答案是C。A项错误是因为……", "single", "A"),  # the rule takes the last letter, even in an explanation
    ("<think>A不对，B也不对，所以选C</think>最终答案：D", "single", "D"),  # after </think> wins
    ("<think>我认为是A</think>", "single", "A"),  # nothing after </think>: fall back to the whole text
    ("<think>truncated reasoning about B", "single", "B"),  # no </think>: the whole text
    ("我不知道。", "single", ""),
    ("", "single", ""),
    ("答案：Ｃ", "single", "C"),  # full-width letter
    ("答案：ABD", "multiple", "ABD"),
    ("答案是A、B和D。", "multiple", "ABD"),
    ("The correct options are A, B and D.", "multiple", "ABD"),
    ("答案：B，D", "multiple", "BD"),
    ("答案：DBA", "multiple", "ABD"),  # sorted
    ("A和C看似正确。最终答案：B、C", "multiple", "BC"),  # the last run
    ("<think>A和C都对</think>答案：B，D", "multiple", "BD"),
    ("答案: A B D", "multiple", "ABD"),
    ("答案：ＡＢＤ", "multiple", "ABD"),
    ("都不对", "multiple", ""),
    ("<think>想一想</think>  焦虑性神经症。 ", "qa", "焦虑性神经症。"),
]


@pytest.mark.parametrize("response,qtype,expected", EXTRACTION)
def test_extract_answer(response, qtype, expected):
    assert extract_answer(response, qtype) == expected


def test_extract_answer_letters_and_bad_type():
    assert extract_answer("答案：E", "single") == ""
    assert extract_answer("答案：E", "single", letters="ABCDE") == "E"
    with pytest.raises(ValueError):
        extract_answer("A", "essay")


@pytest.mark.parametrize("pred,gold,expected", [
    ("A", "A", 1.0), ("B", "A", 0.0), ("", "A", 0.0), ("ABD", "ABD", 1.0), ("DBA", "ABD", 1.0),
    ("A", "ABD", 1 / 3), ("AB", "ABD", 2 / 3), ("ABC", "ABD", 0.0), ("ABCD", "ABD", 0.0), ("A", "", 0.0)])
def test_credit(pred, gold, expected):
    assert credit(pred, gold) == pytest.approx(expected)


CPSY = [
    ("C。因为……", "single", "C"),  # first character
    ("我认为答案是B", "single", "B"),
    ("正确的一项是 D", "single", "D"),
    ("答案：A，另一个答案：B", "single", "AB"),  # all matches of the first pattern, joined (then wrong)
    ("不确定", "single", ""),
    ("<think>A</think>答案为C", "single", "C"),
    ("答案：AC。B错", "multiple", "AC"),
    ("正确选项是B、D。", "multiple", "BD"),
    ("A和B", "multiple", "AB"),  # no answer phrase: every letter
    ("", "multiple", ""),
]


@pytest.mark.parametrize("response,qtype,expected", CPSY)
def test_extract_cpsyexam(response, qtype, expected):
    assert extract_cpsyexam(response, qtype) == expected


# ---------------------------------------------------------------- text metrics


def test_segment_normalises():
    assert segment("焦虑，抑郁") == ["焦虑", ",", "抑郁"]  # NFKC turns ， into ,
    assert segment("⼼理 问题") == segment("心理问题")  # Kangxi radical and space


def test_text_scores_known_pairs():
    s = text_scores("焦虑，抑郁", "焦虑，失眠")  # 3 words each, 2 shared, LCS 2
    assert s["rouge1"] == pytest.approx(200 / 3, abs=1e-5)
    assert s["rougeL"] == pytest.approx(200 / 3, abs=1e-5)
    assert s["bleu4"] == pytest.approx(BLEU_PAIR, abs=1e-6)
    same = text_scores("焦虑", "焦虑")
    assert same["rouge1"] == pytest.approx(100, abs=1e-5) and same["rougeL"] == pytest.approx(100, abs=1e-5)
    assert same["bleu4"] == pytest.approx(100 * 0.1 ** 0.75)  # 1-word sentence: higher orders smoothed
    assert text_scores("⼼理", "心理")["rouge1"] == pytest.approx(100, abs=1e-5)
    for empty in ("", "   ", "\n"):
        assert text_scores(empty, "焦虑") == {"rouge1": 0.0, "rougeL": 0.0, "bleu4": 0.0}
    assert text_scores("...", "焦虑") == {"rouge1": 0.0, "rougeL": 0.0, "bleu4": 0.0}


# ---------------------------------------------------------------- loader on a crafted tree


def test_load_crafted_pceb_ids_and_quirks(tmp_path, capsys):
    root, _ = make_pceb(tmp_path)
    items = load_pceb(root)
    by_id = {it.id: it for it in items}
    assert load_pceb(root / "benchmark", verbose=False) == items  # either folder works
    assert list(by_id)[:4] == [f"theory/multiple/x/b.json#{i}" for i in range(4)]
    assert by_id["moral/single/x/a.json#0"].answer == "C"  # U+2003 stripped
    c2 = by_id["cases/mix/x/c.json#0.2"]
    assert (c2.category, c2.qtype, c2.answer) == ("case", "multiple", "BCD")  # typed by answer length
    assert "contradicts" in c2.note
    assert by_id["cases/mix/x/c.json#0.0"].answer == "B" and by_id["cases/mix/x/c.json#0.0"].qtype == "single"
    assert by_id["cases/mix/x/c.json#0.0"].case_text == "求助者，女，28岁。\n近半年来情绪低落。"
    qa = by_id["cases/essay/x/d.json#0.1"]
    assert (qa.category, qa.qtype, qa.answer, qa.options) == ("case_qa", "qa", "焦虑", {})
    assert "empty gold" in by_id["theory/multiple/x/b.json#3"].note
    err = capsys.readouterr().err
    assert "theory   single       4" in err and "case_qa  qa           2" in err and "contradicts" in err


def test_malformed_benchmark_file_names_file_and_line(tmp_path):
    root, _ = make_pceb(tmp_path)
    bad = root / "benchmark/theory/single/x/a.json"
    bad.write_text('[\n{"question": "q",\n "answer": }\n]', encoding="utf-8")
    with pytest.raises(BenchmarkError, match=r"a\.json:3: invalid JSON"):
        load_pceb(root)
    bad.write_text('[{"question": "q", "options": {}}]', encoding="utf-8")
    with pytest.raises(BenchmarkError, match=r"a\.json: item 0: missing field\(s\) answer"):
        load_pceb(root)
    with pytest.raises(BenchmarkError, match="not a PCEB folder"):
        load_pceb(tmp_path / "benchmark" / "theory")


# ---------------------------------------------------------------- the report


def test_crafted_predictions_give_known_report(tmp_path):
    root, responses = make_pceb(tmp_path)
    items = load_pceb(root, verbose=False)
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps({"id": k, "response": v, "extra": 1}, ensure_ascii=False) + "\n\n"
                            for k, v in responses.items()), encoding="utf-8")
    report = score_predictions(items, read_predictions(path, items))
    for key, value in EXPECTED.items():
        assert report[key] == pytest.approx(value, abs=1e-5), key
    assert report["skipped"] == ["theory/multiple/x/b.json#3"]
    assert report["counts"]["theory_single"] == {"total": 4, "missing": 1, "exact": 2, "credit": 2.0}
    assert report["not_in_predictions"] == 0 and report["n_qa"] == 2
    row = report_markdown({"crafted": report}).splitlines()[2]
    assert row == ("| crafted | 100.00 | 50.00 | 75.00 | 50.00 | 50.00 | 87.50 | 66.67 | 33.33 | 50.00 | 58.33 | "
                   "(71.53) | 33.33 | 33.33 | 12.01 |")


def test_all_gold_gives_100_and_partial_runs_have_no_avg(tmp_path):
    root, _ = make_pceb(tmp_path)
    items = load_pceb(root, verbose=False)
    report = score_predictions(items, {it.id: it.answer for it in items})
    for key in EXPECTED:
        if key not in ("missing", "case_qa_bleu4"):
            assert report[key] == pytest.approx(100, abs=1e-5), key
    assert report["missing"] == 0
    partial = score_predictions(items, {"theory/single/x/a.json#0": "A"})
    assert partial["theory_smcq"] == 100 and partial["moral_smcq"] is None and partial["avg"] is None
    assert partial["not_in_predictions"] == len(items) - 1
    assert "| – |" in report_markdown({"partial": partial})


def test_seed_arithmetic_and_table():
    """Psyche-R1's Qwen2.5-7B-Instruct row: six strict scores average to 57.91, the bracketed value to 64.59."""
    smcq, strict, elastic = [47.57, 87.83, 78.46], [31.64, 59.50, 42.45], [47.49, 71.02, 55.17]
    avg, avg_el = seed_averages(smcq, strict, elastic)
    assert round(avg, 2) == 57.91 and round(avg_el, 2) == 64.59
    rep = {"avg": avg, "avg_elastic": avg_el, "case_qa_rouge1": 20.94, "case_qa_rougeL": 11.28, "case_qa_bleu4": 1.28,
           "missing": 3}
    for cat, s, m, e in zip(("case", "moral", "theory"), smcq, strict, elastic):
        rep.update({f"{cat}_smcq": s, f"{cat}_mmcq_strict": m, f"{cat}_mmcq_elastic": e})
    md = report_markdown({"Qwen2.5-7B-Instruct": rep, "other": rep}).splitlines()
    assert md[0].count("|") == 16  # model + Psyche-R1's 14 columns
    assert md[2] == ("| Qwen2.5-7B-Instruct | 47.57 | 31.64 | 47.49 | 87.83 | 59.50 | 71.02 | 78.46 | 42.45 | "
                     "55.17 | 57.91 | (64.59) | 20.94 | 11.28 | 1.28 |")
    assert md[3].startswith("| other |")
    assert md[-1] == "Missing answers (left out of the denominators): Qwen2.5-7B-Instruct 3, other 3."


def test_accuracy_summary_on_generated_items():
    items = [Item("g0", "synthetic", "single", "q", OPTS, "A"), Item("g1", "synthetic", "single", "q", OPTS, "B"),
             Item("g2", "other", "multiple", "q", OPTS, "ABC"), Item("g3", "other", "multiple", "q", OPTS, "AB"),
             Item("g4", "other", "single", "q", OPTS, "C")]
    s = accuracy_summary(items, {"g0": "A", "g1": "答案：C", "g2": "A、B", "g3": "AB", "g4": "不知道"})
    assert s["smcq_acc"] == 50.0 and s["mmcq_strict"] == 50.0
    assert s["mmcq_elastic"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert s["missing"] == 20.0 and s["n_missing"] == 1 and s["n"] == 5


# ---------------------------------------------------------------- predictions files


@pytest.mark.parametrize("lines,match", [
    (['{"id": "theory/single/x/a.json#0", "response": "A"}', '{"id": 1, "response": '], r"p\.jsonl:2: invalid JSON"),
    (['{"id": "theory/single/x/a.json#0"}'], r"p\.jsonl:1: missing 'response'"),
    (['', '{"response": "A"}'], r"p\.jsonl:2: missing 'id'"),
    (['{"id": "nope#0", "response": "A"}'], r"p\.jsonl:1: unknown id 'nope#0'"),
    (['{"id": "theory/single/x/a.json#0", "response": "A"}'] * 2, r"p\.jsonl:2: duplicate id"),
    (['{"id": "theory/single/x/a.json#0", "response": null}'], r"p\.jsonl:1: 'response' must be a string"),
    (['{"id": ["theory/single/x/a.json#0"], "response": "A"}'], r"p\.jsonl:1: 'id' must be a string, got list"),
    (['{"id": {"n": 0}, "response": "A"}'], r"p\.jsonl:1: 'id' must be a string, got dict"),
    (['{"id": 7, "response": "A"}'], r"p\.jsonl:1: 'id' must be a string, got int"),
])
def test_bad_predictions_name_file_and_line(tmp_path, lines, match):
    root, _ = make_pceb(tmp_path)
    items = load_pceb(root, verbose=False)
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(BenchmarkError, match=match):
        read_predictions(path, items)


# ---------------------------------------------------------------- prompts


def test_prompts(tmp_path):
    root, _ = make_pceb(tmp_path)
    by_id = {it.id: it for it in load_pceb(root, verbose=False)}
    theory, case = by_id["theory/multiple/x/b.json#0"], by_id["cases/mix/x/c.json#0.1"]
    sys_msg, user = build_prompt(theory, "psyche")
    assert sys_msg == {"role": "system", "content": PSYCHE_SYSTEM}
    assert user["role"] == "user" and user["content"].startswith(PSYCHE_USER_PREFIX)
    assert user["content"].endswith("题目（　　）。\nA. 甲\nB. 乙\nC. 丙\nD. 丁") and "多项选择题" in user["content"]
    case_user = build_prompt(case, "psyche")[1]["content"]
    assert "求助者，女，28岁。\n近半年来情绪低落。" in case_user and "多选：2．可以" in case_user
    sys_msg, user = build_prompt(case, "pceb")
    assert "多项选择题" in sys_msg["content"] and user["content"].endswith("D. 丁\n答案：")
    assert "近半年来情绪低落" in user["content"]
    with pytest.raises(ValueError):
        build_prompt(case, "other")


# ---------------------------------------------------------------- CPsyExam on a crafted zip


def make_cpsyexam(tmp_path):
    def rec(i, qtype, answer):
        return {"subject_name": "普通心理学", "question_type": qtype, "kind": "knowledge", "question": f"题{i}",
                "options": {"A": "甲", "B": "乙", "C": "丙", "D": "丁", "E": ""}, "answer": answer,
                "explanation": "", "id": f"h{i}"}
    files = {"dev/KG-GEE-普通心理学-单项选择题.json": [rec(0, "single", "A"), rec(1, "single", "B")],
             "dev/KG-GEE-普通心理学-多项选择题.json": [rec(2, "multi", "AB"), rec(3, "multi", "D")],
             "dev/CA-心理诊断-多项选择题.json": [rec(4, "multi", "ACD")],
             "test/CA-心理诊断-单项选择题.json": [{k: v for k, v in rec(5, "single", "").items() if k != "answer"}]}
    path = tmp_path / "cpsyexam.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, recs in files.items():
            z.writestr(name, json.dumps(recs, ensure_ascii=False))
    for name, recs in files.items():
        write_json(tmp_path / "unpacked" / name, recs)
    return path


def test_cpsyexam_zip_folder_scores_and_submission(tmp_path):
    path = make_cpsyexam(tmp_path)
    items = load_cpsyexam(path, "dev", verbose=False)
    assert load_cpsyexam(tmp_path / "unpacked", "dev", verbose=False) == items
    assert load_cpsyexam(tmp_path, "dev", verbose=False) == items  # a folder holding cpsyexam.zip
    assert [it.id for it in items][0] == "dev/CA-心理诊断-多项选择题.json#0"
    kinds = {(it.category, it.qtype) for it in items}
    assert kinds == {("kg", "single"), ("kg", "multiple"), ("ca", "multiple")}
    assert items[0].options == {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}  # empty E dropped
    assert [it.note != "" for it in items].count(True) == 1  # the multi item with answer D
    by_ref = {it.ref: it.id for it in items}
    responses = {by_ref["h0"]: "A", by_ref["h1"]: "我不知道", by_ref["h2"]: "答案：AB。", by_ref["h3"]: "答案：D",
                 by_ref["h4"]: "答案是A、C。"}
    r = score_cpsyexam(items, responses)
    assert (r["kg_mcqa"], r["kg_mrqa"], r["ca_mcqa"], r["ca_mrqa"]) == (50.0, 100.0, None, 0.0)
    assert r["kg_avg"] == 75.0 and r["ca_avg"] == 0.0 and r["avg"] == 60.0 and r["missing"] == 1
    test_items = load_cpsyexam(path, "test", verbose=False)
    assert len(test_items) == 1 and test_items[0].answer == ""
    sub = cpsyexam_submission(test_items, {test_items[0].id: "<think>…</think>B"})
    assert sub == {"zero_shot": {"CA-心理诊断-单项选择题": [{"question_id": "h5", "prediction": "B", "n_shot": 0}]}}
    with pytest.raises(BenchmarkError, match="no train/ folder"):
        load_cpsyexam(tmp_path / "unpacked", "train")


# ---------------------------------------------------------------- the real files (../shared/data)


def test_real_pceb_counts_and_quirks(shared_data, capsys):
    items = load_pceb(shared_data / "pceb")
    counts = {}
    for it in items:
        counts[(it.category, it.qtype)] = counts.get((it.category, it.qtype), 0) + 1
    assert counts == {("theory", "single"): 1143, ("theory", "multiple"): 784, ("moral", "single"): 152,
                      ("moral", "multiple"): 158, ("case", "single"): 748, ("case", "multiple"): 878,
                      ("case_qa", "qa"): 100}
    assert len({it.id for it in items}) == len(items)
    notes = {it.id: it.note for it in items if it.note}
    assert notes.keys() == {"theory/multiple/simulation/17-18-理论多选.json#106",
                            "cases/mix/third/11-13 案例混合选择.json#15.0",
                            "cases/mix/third/11-13 案例混合选择.json#31.6"}
    choice_answers = [it.answer for it in items if it.qtype != "qa"]
    assert all(set(a) <= set("ABCD") for a in choice_answers) and choice_answers.count("") == 1
    assert "cases/mix/third/14-16 案例混合选择.json#0.0" in {it.id for it in items}
    assert "theory   single    1143" in capsys.readouterr().err
    report = score_predictions(items, {it.id: it.answer for it in items})
    for key in EXPECTED:
        if key not in ("missing", "case_qa_bleu4"):
            assert report[key] == pytest.approx(100, abs=1e-5), key
    assert report["case_qa_bleu4"] == pytest.approx(100) and report["missing"] == 0
    assert report["skipped"] == ["theory/multiple/simulation/17-18-理论多选.json#106"]


def test_real_cpsyexam_counts(shared_data):
    dev = load_cpsyexam(shared_data / "cpsyexam" / "cpsyexam.zip", "dev", verbose=False)
    test = load_cpsyexam(shared_data / "cpsyexam", "test", verbose=False)
    assert len(dev) == 1097 and len(test) == 3902
    assert sum(it.qtype == "single" for it in dev) == 769 and all(it.answer == "" for it in test)
    assert {it.category for it in dev} == {"kg", "ca"}
    r = score_cpsyexam(dev, {it.id: it.answer for it in dev})
    assert r["kg_mrqa"] == 100.0 and r["ca_mcqa"] == 100.0 and r["missing"] == 0
    assert r["kg_mcqa"] == pytest.approx(100 * 763 / 764)  # one "single" item's gold is AC: never matchable
