"""Benchmark items: the PCEB tree and CPsyExam, loaded into one small `Item` type, and their prompts.

PCEB (the Psychological Counselor Examination Benchmark of PsycoLLM / Psyche-R1) is a folder of JSON files:

    theory/{single,multiple}/<level>/*.json    lists of {id, question, options{A..D}, answer, analysis}
    moral/{single,multiple}/<level>/*.json     the same
    cases/mix/<level>/*.json                   cases {general_info, case_introduction, questions_and_answers[
                                               {question, options, answer, analysis}]}, questions 单选：/多选：
    cases/essay/<level>/*.json                 cases whose questions_and_answers are {question, answer} QA pairs

Item ids are stable and documented: `<path relative to the benchmark root>#<n>` for theory/moral items and
`<path>#<case n>.<question n>` for case items, n counted from 0 in file order, e.g.
`theory/single/second/14 理论单选.json#0` and `cases/mix/third/14-16 案例混合选择.json#3.2`.

Data quirks handled here (each reported by the loader, and written into the item's `note`):
- gold answers with trailing U+2003 / U+00A0 / newline: stripped (str.strip());
- a case choice item's type is decided by its answer's length (one letter = single), because two items'
  单选/多选 prefix contradicts their answer; the contradiction is reported;
- an empty gold answer is kept (the counts include it) and reported; the scorer skips it;
- theory items with fewer than four options are kept as published.
Kangxi radicals in the text (⼼ for 心) are left in the prompt as published; text metrics NFKC-normalise.

CPsyExam (CAS-SIAT-XinHai/CPsyExam) ships `cpsyexam.zip` with `{train,dev,test}/<subject>.json` lists of
{subject_name, question_type (single|multi), kind, question, options A..E, answer, explanation, id}; the test
split has no answers. Its ids are `<split>/<subject file>#<n>` (the dataset's own `id` hashes repeat, so they
are kept in `Item.ref` for the leaderboard file only).
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

LETTERS = "ABCDE"
PCEB_PARTS = ("theory", "moral", "cases/mix", "cases/essay")


class BenchmarkError(ValueError):
    """A benchmark or predictions file that cannot be read; the message names the file (and line)."""


@dataclass
class Item:
    id: str
    category: str  # PCEB: case | moral | theory | case_qa; CPsyExam: kg | ca
    qtype: str  # single | multiple | qa
    question: str
    options: dict[str, str] = field(default_factory=dict)  # letter -> text (empty for qa)
    answer: str = ""  # gold letters ("ABD"), or the reference text for qa
    analysis: str = ""  # the benchmark's explanation, if any
    case_text: str = ""  # case items: general info + case introduction; else ""
    subject: str = ""  # CPsyExam subject file stem, e.g. "KG-GEE-普通心理学-单项选择题"
    ref: str = ""  # the dataset's own id (CPsyExam hash), used in its leaderboard file
    note: str = ""  # a data quirk found while loading, "" if none


# ---------------------------------------------------------------- reading

def _read_json(path: Path, text: str | None = None):
    """Parse one JSON file, turning a syntax error into a message with the file and line."""
    try:
        return json.loads(text if text is not None else path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def _need(rec, keys, where: str):
    if not isinstance(rec, dict):
        raise BenchmarkError(f"{where}: expected an object, got {type(rec).__name__}")
    missing = [k for k in keys if k not in rec]
    if missing:
        raise BenchmarkError(f"{where}: missing field(s) {', '.join(missing)}")


def _letters(answer: str) -> str:
    """Gold answer -> its letters, stripped of the stray U+2003 / U+00A0 / newline some answers carry."""
    return answer.strip()


def _options(opts: dict) -> dict[str, str]:
    return {k: str(v).strip() for k, v in sorted(opts.items()) if str(v).strip()}


def case_text(case: dict) -> str:
    return "\n".join(s.strip() for s in (case.get("general_info", ""), case.get("case_introduction", "")) if s)


def pceb_root(root: str | Path) -> Path:
    """Accept the folder holding `benchmark/` or the benchmark folder itself."""
    root = Path(root)
    for cand in (root / "benchmark", root):
        if (cand / "theory").is_dir() and (cand / "cases").is_dir():
            return cand
    raise BenchmarkError(f"{root}: not a PCEB folder (expected theory/, moral/, cases/ under it or under "
                         f"its benchmark/)")


def _load_choice_file(path: Path, rel: str, category: str, qtype: str) -> list[Item]:
    items = []
    for n, rec in enumerate(_read_json(path)):
        _need(rec, ("question", "options", "answer"), f"{path}: item {n}")
        ans = _letters(rec["answer"])
        note = "empty gold answer (skipped when scoring)" if not ans else ""
        items.append(Item(f"{rel}#{n}", category, qtype, rec["question"].strip(), _options(rec["options"]), ans,
                          rec.get("analysis", "").strip(), note=note))
    return items


def _load_case_file(path: Path, rel: str, essay: bool) -> list[Item]:
    items = []
    for c, case in enumerate(_read_json(path)):
        _need(case, ("questions_and_answers",), f"{path}: case {c}")
        text = case_text(case)
        for q, rec in enumerate(case["questions_and_answers"]):
            where = f"{path}: case {c} question {q}"
            if essay:
                _need(rec, ("question", "answer"), where)
                items.append(Item(f"{rel}#{c}.{q}", "case_qa", "qa", rec["question"].strip(), {},
                                  rec["answer"].strip(), case_text=text))
                continue
            _need(rec, ("question", "options", "answer"), where)
            ans = _letters(rec["answer"])
            qtype = "single" if len(ans) == 1 else "multiple"  # split by answer length, not by prefix
            question = rec["question"].strip()
            note = ""
            if not ans:
                note = "empty gold answer (skipped when scoring)"
            elif question.startswith(("单选", "多选")) and question.startswith("单选") != (qtype == "single"):
                note = f"prefix {question[:2]} contradicts answer {ans}; typed {qtype} by answer length"
            items.append(Item(f"{rel}#{c}.{q}", "case", qtype, question, _options(rec["options"]), ans,
                              rec.get("analysis", "").strip(), case_text=text, note=note))
    return items


def load_pceb(root: str | Path, verbose: bool = True) -> list[Item]:
    """Every PCEB item in a fixed order (theory, moral, case choice, case QA; files sorted by path)."""
    base = pceb_root(root)
    items = []
    for part in PCEB_PARTS:
        for path in sorted((base / part).rglob("*.json")):
            rel = path.relative_to(base).as_posix()
            if part == "cases/mix":
                items += _load_case_file(path, rel, essay=False)
            elif part == "cases/essay":
                items += _load_case_file(path, rel, essay=True)
            else:
                items += _load_choice_file(path, rel, part, rel.split("/")[1])
    if not items:
        raise BenchmarkError(f"{base}: no benchmark files found")
    if verbose:
        print_counts(f"pceb ({base})", items)
    return items


# ---------------------------------------------------------------- CPsyExam

def _cpsyexam_files(path: Path, split: str) -> list[tuple[str, str]]:
    """(subject file name, JSON text) for one split, from the published zip or an unpacked folder."""
    if path.is_dir() and (path / "cpsyexam.zip").is_file() and not (path / split).is_dir():
        path = path / "cpsyexam.zip"
    if path.is_file():
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise BenchmarkError(f"{path}: not a zip file") from None
        with zf:
            names = sorted(n for n in zf.namelist() if n.endswith(".json") and n.split("/")[-2:-1] == [split])
            return [(n.split("/")[-1], io.TextIOWrapper(zf.open(n), encoding="utf-8").read()) for n in names]
    folder = path / split
    if not folder.is_dir():
        raise BenchmarkError(f"{path}: no {split}/ folder and no cpsyexam.zip")
    return [(p.name, p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def load_cpsyexam(path: str | Path, split: str = "dev", verbose: bool = True) -> list[Item]:
    """CPsyExam choice items of one split. category: kg | ca (the subject's prefix); qtype single | multiple.
    Empty options (E is often "") are dropped; the test split's items have answer ""."""
    path = Path(path)
    files = _cpsyexam_files(path, split)
    if not files:
        raise BenchmarkError(f"{path}: no {split} files")
    items = []
    for name, text in files:
        where = f"{path}:{split}/{name}"
        subject = name.removesuffix(".json")
        for n, rec in enumerate(_read_json(Path(where), text)):
            _need(rec, ("question", "options", "question_type"), f"{where}: item {n}")
            qtype = {"single": "single", "multi": "multiple"}.get(rec["question_type"])
            if qtype is None:
                raise BenchmarkError(f"{where}: item {n}: unknown question_type {rec['question_type']!r}")
            ans = _letters(rec.get("answer") or "")
            note = ""
            if ans and (len(ans) == 1) != (qtype == "single"):
                note = f"question_type {rec['question_type']} but answer {ans}"
            items.append(Item(f"{split}/{name}#{n}", subject.split("-")[0].lower(), qtype, rec["question"].strip(),
                              _options(rec["options"]), ans, (rec.get("explanation") or "").strip(),
                              subject=subject, ref=str(rec.get("id", n)), note=note))
    if verbose:
        print_counts(f"cpsyexam {split} ({path})", items)
    return items


def print_counts(title: str, items: list[Item], file=None):
    """One line per (category, type) and one per data quirk, on stderr."""
    file = file or sys.stderr
    counts = Counter((it.category, it.qtype) for it in items)
    print(f"{title}: {len(items)} items", file=file)
    for (cat, qtype), n in sorted(counts.items()):
        print(f"  {cat:8s} {qtype:8s} {n:5d}", file=file)
    for it in items:
        if it.note:
            print(f"  note {it.id}: {it.note}", file=file)


# ---------------------------------------------------------------- prompts

# Psyche-R1's own chat prompt (the wording of its released scripts): evaluation style "psyche", GRPO's
# prompt_style "psyche" and `psyche chat` use it, with its sampling settings.
PSYCHE_SYSTEM = (
    "你是一名心理学专家。请回答以下心理学案例题目，请逐步思考，仔细分析给定的心理学案例，首先给出你的推理过程，"
    "以及得出该推理结论的详细解释和事实理由，解释你是从什么事实中得出结论的，然后给出答案。"
    "注意，推理过程需要包含在 <think> 和 </think> 之间。"
)
PSYCHE_USER_PREFIX = "你必须在<think>和</think>标签内给出你的推理过程，然后，在</think>标签后给出最终的答案。\n\n以下是我的问题：\n"
PSYCHE_TEMPERATURE, PSYCHE_TOP_P = 0.7, 0.9

# The exam style: PCEB ships no prompt script, so this follows the C-Eval-style zero-shot template its family of
# Chinese exam benchmarks uses (CPsyExam's simple template): a system line naming the exam and question type, the
# question with "X. option" lines, and "答案：" to answer after.
EXAM_SYSTEM = "以下是中国关于{subject}考试的{kind}，请{task}。"
KIND = {"single": "单项选择题", "multiple": "多项选择题", "qa": "案例问答题"}
TASK = {"single": "选出其中唯一的正确答案", "multiple": "选出其中所有的正确答案（正确答案有两个或两个以上）",
        "qa": "根据案例回答问题"}
TYPE_LINE = {"single": "（单项选择题）", "multiple": "（多项选择题，正确答案有两个或两个以上）"}


def question_block(item: Item) -> str:
    """Case text (if any), the question, then one "X. text" line per option.

    Non-case choice questions get a type line, since their text does not say single or multiple; case choice
    questions keep their own 单选：/多选： prefix as published."""
    parts = []
    if item.case_text:
        parts.append(f"案例：\n{item.case_text}\n")
    head = "" if item.category in ("case", "case_qa") else TYPE_LINE.get(item.qtype, "")
    parts.append(head + item.question)
    parts += [f"{k}. {v}" for k, v in item.options.items()]
    return "\n".join(parts)


def build_prompt(item: Item, style: str = "psyche") -> list[dict]:
    """Chat messages for one item.

    style "psyche": Psyche-R1's system prompt, and the user turn is its fixed prefix + the question block.
    style "pceb": the exam template (system names the exam and type) + question block + "\\n答案：".
    """
    body = question_block(item)
    if style == "psyche":
        return [{"role": "system", "content": PSYCHE_SYSTEM}, {"role": "user", "content": PSYCHE_USER_PREFIX + body}]
    if style == "pceb":
        subject = item.subject.split("-")[-2] if item.subject.count("-") >= 2 else "心理咨询师"
        system = EXAM_SYSTEM.format(subject=subject, kind=KIND[item.qtype], task=TASK[item.qtype])
        return [{"role": "system", "content": system}, {"role": "user", "content": body + "\n答案："}]
    raise ValueError(f"unknown prompt style {style!r}; choose psyche or pceb")
