"""`psyche eval` end to end on a tiny random model, and `psyche score` on predictions files."""

import json

import pytest
from click.testing import CliRunner

from psyche.cli import main
from test_evaluate import EXPECTED, make_cpsyexam, make_pceb

REPORT_KEYS = {"case_smcq", "case_mmcq_strict", "case_mmcq_elastic", "moral_smcq", "moral_mmcq_strict",
               "moral_mmcq_elastic", "theory_smcq", "theory_mmcq_strict", "theory_mmcq_elastic", "avg", "avg_elastic",
               "case_qa_rouge1", "case_qa_rougeL", "case_qa_bleu4", "missing"}


def run(*args):
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into stdout by default
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_preds(path, responses):
    path.write_text("".join(json.dumps({"id": k, "response": v}, ensure_ascii=False) + "\n"
                            for k, v in responses.items()), encoding="utf-8")


def test_score_cli_table_json_and_errors(tmp_path):
    root, responses = make_pceb(tmp_path)
    write_preds(tmp_path / "a.jsonl", responses)
    (tmp_path / "b").mkdir()
    write_preds(tmp_path / "b" / "predictions.jsonl", {"theory/single/x/a.json#0": "A"})
    r = run("score", "--bench", "pceb", "--data", root, tmp_path / "a.jsonl", tmp_path / "b" / "predictions.jsonl",
            "--json", tmp_path / "out.json")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[2].startswith("| a | 100.00 | 50.00 | 75.00 |") and "(71.53)" in lines[2]
    assert lines[3].startswith("| b | – |")
    assert "b: 16 of 17 items have no prediction" in r.stderr
    both = json.loads((tmp_path / "out.json").read_text())
    assert set(both) == {"a", "b"} and both["a"]["avg"] == pytest.approx(EXPECTED["avg"])

    r = run("score", "--data", root, tmp_path / "a.jsonl", "--json", tmp_path / "one.json")
    one = json.loads((tmp_path / "one.json").read_text())
    assert REPORT_KEYS <= set(one) and one["moral_mmcq_elastic"] == 87.5

    (tmp_path / "bad.jsonl").write_text('{"id": "theory/single/x/a.json#0", "response": "A"}\n{"id": "x"}\n')
    r = run("score", "--data", root, tmp_path / "bad.jsonl")
    assert r.exit_code != 0 and "bad.jsonl:2: missing 'response'" in r.output


def test_score_cli_names_the_line_of_an_id_that_is_not_a_string(tmp_path):
    root, _ = make_pceb(tmp_path)
    (tmp_path / "ids.jsonl").write_text('{"id": "theory/single/x/a.json#0", "response": "A"}\n'
                                        '{"id": ["theory/multiple/x/b.json#0"], "response": "B"}\n')
    r = run("score", "--data", root, tmp_path / "ids.jsonl")
    assert r.exit_code == 1 and "ids.jsonl:2: 'id' must be a string, got list" in r.output


def test_score_cli_cpsyexam(tmp_path):
    path = make_cpsyexam(tmp_path)
    write_preds(tmp_path / "dev.jsonl", {"dev/KG-GEE-普通心理学-单项选择题.json#0": "A"})
    r = run("score", "--bench", "cpsyexam", "--data", path, tmp_path / "dev.jsonl")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[2] == "| dev | 100.00 | – | 100.00 | – | – | – | 100.00 |"
    write_preds(tmp_path / "test.jsonl", {"test/CA-心理诊断-单项选择题.json#0": "答案：C"})
    r = run("score", "--bench", "cpsyexam", "--split", "test", "--data", path, tmp_path / "test.jsonl",
            "--submission", tmp_path / "sub.json")
    assert r.exit_code == 0, r.output
    sub = json.loads((tmp_path / "sub.json").read_text())
    assert sub == {"zero_shot": {"CA-心理诊断-单项选择题": [{"question_id": "h5", "prediction": "C", "n_shot": 0}]}}


def test_eval_end_to_end_tiny_model(tiny_ckpt, tmp_path):
    """`psyche eval --limit` on a tiny random model: predictions, report, and `psyche score` agrees; the batch
    size does not change greedy outputs."""
    pytest.importorskip("psyche.sampler")
    root, _ = make_pceb(tmp_path)
    outs = {}
    for bs in (1, 3):
        out = tmp_path / f"run{bs}"
        r = run("eval", "--model", tiny_ckpt, "--bench", "pceb", "--data", root, "--limit", 1, "--batch-size", bs,
                "--max-new-tokens", 6, "--device", "cpu", "--out", out)
        assert r.exit_code == 0, r.output
        outs[bs] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    lines = outs[1]
    assert len(lines) == 7  # one per category and type: 6 choice groups (theory multiple has 1) + case QA
    assert [ln["response"] for ln in lines] == [ln["response"] for ln in outs[3]]
    first = lines[0]
    assert set(first) >= {"id", "category", "type", "prompt", "response", "extracted", "gold", "credit"}
    assert first["prompt"][0]["role"] == "system" and first["id"] == "theory/multiple/x/b.json#0"
    report = json.loads((tmp_path / "run1" / "report.json").read_text())
    assert REPORT_KEYS <= set(report) and report["n_scored"] == 7
    assert (tmp_path / "run1" / "report.md").read_text().startswith("| Model | Case SMCQ |")

    r = run("score", "--data", root, tmp_path / "run1" / "predictions.jsonl", "--json", tmp_path / "rescored.json")
    rescored = json.loads((tmp_path / "rescored.json").read_text())
    assert {k: rescored[k] for k in REPORT_KEYS} == {k: report[k] for k in REPORT_KEYS}


def test_eval_cpsyexam_test_split_writes_submission(tiny_ckpt, tmp_path):
    pytest.importorskip("psyche.sampler")
    path = make_cpsyexam(tmp_path)
    out = tmp_path / "cpsy"
    r = run("eval", "--model", tiny_ckpt, "--bench", "cpsyexam", "--split", "test", "--data", path,
            "--max-new-tokens", 4, "--prompt", "pceb", "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    sub = json.loads((out / "submission.json").read_text())
    assert list(sub["zero_shot"]) == ["CA-心理诊断-单项选择题"]
    assert sub["zero_shot"]["CA-心理诊断-单项选择题"][0]["question_id"] == "h5"


def test_eval_refuses_a_temperature_too_small_to_divide_by_before_loading(tmp_path):
    """--temperature 1e-6 passes click's range but not the sampler's: a usage error naming the option, before
    any model is read (the model directory here holds none)."""
    root, _ = make_pceb(tmp_path)
    (tmp_path / "empty").mkdir()
    r = run("eval", "--model", tmp_path / "empty", "--bench", "pceb", "--data", root, "--temperature", 1e-6)
    assert r.exit_code == 2 and "--temperature" in r.stderr and "at least 1e-05" in r.stderr, r.stderr
