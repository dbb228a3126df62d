"""PCEB and CPsyExam scoring as their authors do it, and Psyche-R1's results table.

Scoring works on any list of `Item`s (loaded from disk or generated) and a dict of responses {item id: text}:

    items = load_pceb("../shared/data/pceb")
    report = score_predictions(items, responses)      # the JSON report (scores in percent)
    print(report_markdown({"my-model": report}))      # Psyche-R1's 14-column table

PCEB rules (as the benchmark's authors score):
- answer extraction: see `extract_answer`; no letter found = "missing";
- credit: 1 for an exact match, |pred|/|gold| when the predicted letters are a proper subset of the gold, else 0;
- strict = exact / (total - missing), elastic = sum(credit) / (total - missing): missing answers leave the
  denominator and are counted; an empty gold answer (one item) is reported and skipped;
- Avg = mean of the six strict scores (Case, Moral, Theory x SMCQ, MMCQ); the bracketed value = mean of the three
  SMCQ scores and the three MMCQ elastic scores;
- Case QA: NFKC, remove whitespace, segment with jieba, ROUGE-1 / ROUGE-L F (the `rouge` package) and BLEU-4
  (nltk sentence_bleu, smoothing method1), each averaged over items and x100; an empty response scores 0.
CPsyExam rules (its repository's evaluator) are in `extract_cpsyexam` and `score_cpsyexam`.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from psyche.pceb import BenchmarkError, Item, build_prompt, load_cpsyexam, load_pceb, print_counts  # noqa: F401

THINK_END = "</think>"
CATEGORIES = ("case", "moral", "theory")

# ---------------------------------------------------------------- extraction and credit


def answer_part(response: str) -> str:
    """The text after the last `</think>` when there is one, else the whole response."""
    i = response.rfind(THINK_END)
    return response if i < 0 else response[i + len(THINK_END):]


def _letter_runs(text: str, letters: str) -> list[str]:
    """Runs of option letters, each run's letters adjacent ("ABD") or joined by 、 , ， 和 "and" or spaces.
    A letter touching another Latin letter is part of a word ("Because", "CBT", "DSM") and is not an answer."""
    L = f"[{letters}]"
    pattern = rf"(?<![A-Za-z]){L}+(?:(?:\s*(?:[、,，]|和|and)\s*|\s+){L}+)*(?![A-Za-z])"
    return re.findall(pattern, text)


def _extract(text: str, qtype: str, letters: str) -> str:
    runs = _letter_runs(unicodedata.normalize("NFKC", text), letters)
    if not runs:
        return ""
    last = [c for c in runs[-1] if c in letters]
    return last[-1] if qtype == "single" else "".join(sorted(set(last)))


def extract_answer(response: str, qtype: str, letters: str = "ABCD") -> str:
    """The answer a response gives, "" when it gives none (a "missing" answer).

    Rule (PCEB's authors', made explicit): look in the text after the last `</think>` if there is one (falling
    back to the whole response when that part has no letter), NFKC-normalised so full-width letters count.
    single: the last option letter; multiple: the last run of option letters, adjacent ("ABD") or joined by
    、 , ， 和 / "and" / spaces, returned sorted ("DBA" -> "ABD"); qa: the answer text itself, stripped.
    Option letters inside words (Because, CBT, DSM) are not answers.
    """
    if qtype == "qa":
        return answer_part(response).strip()
    if qtype not in ("single", "multiple"):
        raise ValueError(f"unknown question type {qtype!r}")
    pred = _extract(answer_part(response), qtype, letters)
    if not pred and THINK_END in response:
        pred = _extract(response, qtype, letters)
    return pred


def exact(pred: str, gold: str) -> bool:
    """The extracted answer is the gold one: the same set of letters, and not empty."""
    return bool(pred) and set(pred) == set(gold)


def credit(pred: str, gold: str) -> float:
    """1 for the same set of letters, |pred|/|gold| when pred is a proper subset of gold, else 0."""
    p, g = set(pred), set(gold)
    if not p or not g:
        return 0.0
    if p == g:
        return 1.0
    return len(p) / len(g) if p < g else 0.0


def item_letters(item: Item) -> str:
    return "ABCDE" if "E" in item.options or "E" in item.answer else "ABCD"


# ---------------------------------------------------------------- choice accuracy


@dataclass
class Tally:
    """Counts for one group of choice items; strict/elastic in percent, None when nothing was answered."""
    total: int = 0
    missing: int = 0
    exact: int = 0
    credit: float = 0.0

    def add(self, pred: str, gold: str):
        self.total += 1
        if not pred:
            self.missing += 1
            return
        c = credit(pred, gold)
        self.exact += c == 1.0
        self.credit += c

    @property
    def answered(self) -> int:
        return self.total - self.missing

    @property
    def strict(self) -> float | None:
        return 100.0 * self.exact / self.answered if self.answered else None

    @property
    def elastic(self) -> float | None:
        return 100.0 * self.credit / self.answered if self.answered else None

    def as_dict(self) -> dict:
        return {"total": self.total, "missing": self.missing, "exact": self.exact, "credit": self.credit}


def mean_or_none(values) -> float | None:
    """The mean, or None if any value is None (a partial run has no Avg)."""
    values = list(values)
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def seed_averages(smcq: list, mmcq_strict: list, mmcq_elastic: list) -> tuple[float | None, float | None]:
    """(Avg, bracketed Avg) as in Psyche-R1's table: mean of the six strict scores, and mean of the three SMCQ
    scores with the three MMCQ elastic scores."""
    return mean_or_none(smcq + mmcq_strict), mean_or_none(smcq + mmcq_elastic)


def accuracy_summary(items: list[Item], responses: dict[str, str]) -> dict:
    """PCEB-rule accuracy over all choice items that have a response, whatever their category.

    Keys: smcq_acc, mmcq_strict, mmcq_elastic (percent, None if no answered item), missing (percent of scored
    choice items with no extractable answer), n, n_single, n_multiple, n_missing."""
    tallies = {"single": Tally(), "multiple": Tally()}
    for it in items:
        if it.qtype in tallies and it.answer and it.id in responses:
            tallies[it.qtype].add(extract_answer(responses[it.id], it.qtype, item_letters(it)), it.answer)
    s, m = tallies["single"], tallies["multiple"]
    n = s.total + m.total
    return {"smcq_acc": s.strict, "mmcq_strict": m.strict, "mmcq_elastic": m.elastic,
            "missing": 100.0 * (s.missing + m.missing) / n if n else 0.0,
            "n": n, "n_single": s.total, "n_multiple": m.total, "n_missing": s.missing + m.missing}


# ---------------------------------------------------------------- Case QA text metrics


def normalize_text(text: str) -> str:
    """NFKC (Kangxi radicals -> CJK characters, full-width -> ASCII), then every whitespace character removed."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text))


def segment(text: str) -> list[str]:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [w for w in jieba.lcut(normalize_text(text)) if w.strip()]


def text_scores(response: str, reference: str) -> dict[str, float]:
    """ROUGE-1 F, ROUGE-L F and BLEU-4 of one answer against its reference, x100, on jieba words.
    An empty response (or reference) scores 0 on all three."""
    import warnings

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge import Rouge

    hyp, ref = segment(response), segment(reference)
    zero = {"rouge1": 0.0, "rougeL": 0.0, "bleu4": 0.0}
    if not hyp or not ref:
        return zero
    try:
        r = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    except ValueError:  # the rouge package splits on "."; a text of only "." has no sentence left
        return zero
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bleu = sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method1)
    return {"rouge1": 100 * r["rouge-1"]["f"], "rougeL": 100 * r["rouge-l"]["f"], "bleu4": 100 * bleu}


# ---------------------------------------------------------------- the PCEB report


def score_item(item: Item, response: str) -> dict:
    """What one prediction line records: the extracted answer and its credit (text scores for QA)."""
    if item.qtype == "qa":
        return {"extracted": extract_answer(response, "qa"), "credit": None,
                **text_scores(answer_part(response), item.answer)}
    pred = extract_answer(response, item.qtype, item_letters(item))
    return {"extracted": pred, "credit": credit(pred, item.answer) if item.answer else None}


def score_predictions(items: list[Item], responses: dict[str, str]) -> dict:
    """The PCEB report for the items that have a response (scores in percent, None where nothing was answered).

    Keys: case_smcq, case_mmcq_strict, case_mmcq_elastic, moral_..., theory_..., avg, avg_elastic, case_qa_rouge1,
    case_qa_rougeL, case_qa_bleu4, missing (count of choice items with no extractable answer), and for the
    record: counts (per category and type), n_scored, n_qa, skipped (ids with an empty gold answer),
    not_in_predictions (items without a response; a full run should have 0)."""
    tallies, qa, skipped, absent = defaultdict(Tally), [], [], 0
    for it in items:
        if it.id not in responses:
            absent += 1
        elif it.qtype == "qa":
            qa.append(text_scores(answer_part(responses[it.id]), it.answer))
        elif not it.answer:
            skipped.append(it.id)
        else:
            tallies[(it.category, it.qtype)].add(extract_answer(responses[it.id], it.qtype, item_letters(it)),
                                                 it.answer)
    r = {}
    for cat in CATEGORIES:
        r[f"{cat}_smcq"] = tallies[(cat, "single")].strict
        r[f"{cat}_mmcq_strict"] = tallies[(cat, "multiple")].strict
        r[f"{cat}_mmcq_elastic"] = tallies[(cat, "multiple")].elastic
    r["avg"], r["avg_elastic"] = seed_averages([r[f"{c}_smcq"] for c in CATEGORIES],
                                               [r[f"{c}_mmcq_strict"] for c in CATEGORIES],
                                               [r[f"{c}_mmcq_elastic"] for c in CATEGORIES])
    for key, name in (("rouge1", "case_qa_rouge1"), ("rougeL", "case_qa_rougeL"), ("bleu4", "case_qa_bleu4")):
        r[name] = sum(s[key] for s in qa) / len(qa) if qa else None
    r["missing"] = sum(t.missing for t in tallies.values())
    r["counts"] = {f"{c}_{q}": t.as_dict() for (c, q), t in sorted(tallies.items())}
    r["n_scored"] = sum(t.total for t in tallies.values()) + len(qa)
    r["n_qa"] = len(qa)
    r["skipped"] = skipped
    r["not_in_predictions"] = absent
    return r


# (header, report key) for Psyche-R1's 14 columns
COLUMNS = [("Case SMCQ", "case_smcq"), ("Case MMCQ", "case_mmcq_strict"), ("Case MMCQ el.", "case_mmcq_elastic"),
           ("Moral SMCQ", "moral_smcq"), ("Moral MMCQ", "moral_mmcq_strict"), ("Moral MMCQ el.", "moral_mmcq_elastic"),
           ("Theory SMCQ", "theory_smcq"), ("Theory MMCQ", "theory_mmcq_strict"),
           ("Theory MMCQ el.", "theory_mmcq_elastic"), ("Avg", "avg"), ("(Avg el.)", "avg_elastic"),
           ("Case QA R-1", "case_qa_rouge1"), ("Case QA R-L", "case_qa_rougeL"), ("Case QA B-4", "case_qa_bleu4")]


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def _table(columns, rows: dict[str, dict], bracketed=()) -> list[str]:
    lines = ["| Model | " + " | ".join(h for h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, rep in rows.items():
        cells = [f"({_fmt(rep.get(k))})" if k in bracketed and rep.get(k) is not None else _fmt(rep.get(k))
                 for _, k in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report_markdown(rows: dict[str, dict]) -> str:
    """Psyche-R1's table, a row per model: Case/Moral/Theory SMCQ, MMCQ strict and elastic; Avg; (the bracketed
    Avg); Case QA R-1, R-L, B-4. Values in percent with two decimals, "–" where a group had no answered item.
    A line under the table gives each model's count of missing answers."""
    lines = _table(COLUMNS, rows, bracketed=("avg_elastic",))
    missing = ", ".join(f"{name} {rep.get('missing', 0)}" for name, rep in rows.items())
    lines.append("")
    lines.append(f"Missing answers (left out of the denominators): {missing}.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CPsyExam, as its repository scores it

# The phrases its single-choice extractor tries, in order; each is followed by an optional 选项 and the letter
# (the two "^" ones and 正确的一项是 take the letter directly).
_CPSY_LEADS = ("^选", "^选项", "答案是", "答案为", "答案应为", "答案选", "答案是:", "答案应该是:", "正确的一项是", "答案为:",
               "答案应为:", "答案:", "答案是：", "答案应该是：", "答案为：", "答案应为：", "答案：")


def _cpsy_pattern(lead: str, letter: str) -> str:
    if lead.startswith("^"):
        return lead + letter
    if lead == "正确的一项是":
        return rf"{lead}\s?{letter}"
    return rf"{lead}\s?选?项?\s?{letter}"


def extract_cpsyexam(response: str, qtype: str, letters: str = "ABCDE") -> str:
    """CPsyExam's extraction (its evaluator's rules), applied to the text after `</think>` (our addition):
    single: the first character if it is a letter; else the matches of the first pattern that matches among
    ^选X, ^选项X, then 答案是/为/应为/选/…[:：] + optional 选项 + X and 正确的一项是X, joined; else "".
    multiple: the letters between 答案|正确选项 + 是|：|为|应该是|应该为 and the next 。 or "." (or the end); if
    that phrase is absent, every option letter in the text; in order of appearance, not deduplicated."""
    text = answer_part(response).strip()
    L = f"([{letters}])"
    if qtype == "single":
        if text[:1] and text[0] in letters:
            return text[0]
        for lead in _CPSY_LEADS:
            found = re.findall(_cpsy_pattern(lead, L), text)
            if found:
                return "".join(found)
        return ""
    m = re.search(r"(答案|正确选项)(?:是|：|为|应该是|应该为)(.*?)(。|\.|$)", text, re.S)
    return "".join(c for c in (m.group(2) if m else text) if c in letters)


CPSY_GROUPS = [("kg", "single", "KG MCQA"), ("kg", "multiple", "KG MRQA"), ("ca", "single", "CA MCQA"),
               ("ca", "multiple", "CA MRQA")]


def score_cpsyexam(items: list[Item], responses: dict[str, str]) -> dict:
    """CPsyExam dev accuracy as its repository computes it: a prediction is right when the extracted letters
    equal the gold string; a missing answer counts as wrong (it stays in the denominator). Accuracy pooled per
    KG/CA x single/multiple (kg_mcqa, kg_mrqa, ca_mcqa, ca_mrqa) and over each of KG, CA and all (kg_avg, ca_avg,
    avg), in percent. `letter_rule` holds the PCEB-rule `accuracy_summary` of the same responses."""
    right, total, missing = defaultdict(int), defaultdict(int), 0
    for it in items:
        if it.id not in responses or not it.answer:
            continue
        pred = extract_cpsyexam(responses[it.id], it.qtype)
        missing += not pred
        for key in ((it.category, it.qtype), (it.category,), ()):
            total[key] += 1
            right[key] += pred == it.answer

    def pct(key):
        return 100.0 * right[key] / total[key] if total[key] else None

    r = {f"{c}_{'mcqa' if q == 'single' else 'mrqa'}": pct((c, q)) for c, q, _ in CPSY_GROUPS}
    r.update(kg_avg=pct(("kg",)), ca_avg=pct(("ca",)), avg=pct(()), missing=missing, n_scored=total[()])
    r["letter_rule"] = accuracy_summary(items, responses)
    return r


def cpsyexam_markdown(rows: dict[str, dict]) -> str:
    cols = [(h, f"{c}_{'mcqa' if q == 'single' else 'mrqa'}") for c, q, h in CPSY_GROUPS]
    cols = cols[:2] + [("KG Avg", "kg_avg")] + cols[2:] + [("CA Avg", "ca_avg"), ("Avg", "avg")]
    return "\n".join(_table(cols, rows)) + "\n"


def cpsyexam_submission(items: list[Item], responses: dict[str, str], n_shot: int = 0) -> dict:
    """Test-split predictions in the form CPsyExam's leaderboard takes (its merge_answers.py output, read by its
    evaluate_submission.py): {"zero_shot": {subject: [{"question_id", "prediction", "n_shot"}, ...]}} with the
    subject file stem as key (its scorer treats subjects containing 单项选择题 as single choice), the dataset's
    own id as question_id and the CPsyExam-extracted letters as prediction."""
    out = defaultdict(list)
    for it in items:
        if it.id in responses:
            out[it.subject].append({"question_id": it.ref, "prediction": extract_cpsyexam(responses[it.id], it.qtype),
                                    "n_shot": n_shot})
    return {"zero_shot" if n_shot == 0 else "five_shot": dict(out)}


# ---------------------------------------------------------------- predictions files


def read_predictions(path: str | Path, items: list[Item] | None = None) -> dict[str, str]:
    """A predictions JSONL -> {id: response}. Each line needs `id` and `response`, both strings (other keys are
    ignored). Malformed JSON, a missing key, an id or response of another type, a duplicate id, or (given
    `items`) an unknown id is an error naming the file and line."""
    path = Path(path)
    known = None if items is None else {it.id for it in items}
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(rec, dict):
                raise BenchmarkError(f"{path}:{lineno}: expected a JSON object")
            for key in ("id", "response"):
                if key not in rec:
                    raise BenchmarkError(f"{path}:{lineno}: missing '{key}'")
            if not isinstance(rec["id"], str):
                raise BenchmarkError(f"{path}:{lineno}: 'id' must be a string, got {type(rec['id']).__name__}")
            if not isinstance(rec["response"], str):
                raise BenchmarkError(f"{path}:{lineno}: 'response' must be a string")
            if known is not None and rec["id"] not in known:
                raise BenchmarkError(f"{path}:{lineno}: unknown id {rec['id']!r} (not an item of this benchmark)")
            if rec["id"] in out:
                raise BenchmarkError(f"{path}:{lineno}: duplicate id {rec['id']!r}")
            out[rec["id"]] = rec["response"]
    return out


def prediction_record(item: Item, messages: list[dict], response: str) -> dict:
    """One line of the predictions JSONL `psyche eval` writes."""
    return {"id": item.id, "category": item.category, "type": item.qtype, "prompt": messages, "response": response,
            **score_item(item, response), "gold": item.answer}


def limit_items(items: list[Item], n: int | None) -> list[Item]:
    """At most n items of each (category, type), in order, so a short run still fills every column."""
    if n is None:
        return items
    seen = defaultdict(int)
    out = []
    for it in items:
        seen[(it.category, it.qtype)] += 1
        if seen[(it.category, it.qtype)] <= n:
            out.append(it)
    return out


# ---------------------------------------------------------------- generation


def generate_responses(model, tokenizer, items: list[Item], style: str = "psyche", batch_size: int = 16,
                       max_new_tokens: int = 1024, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                       log=None) -> dict[str, str]:
    """Responses of `model` to every item's chat prompt: prompts sorted by length and batched, each item with its
    own sampling seed (so results do not depend on the batch size; temperature 0 is greedy). An item whose prompt
    leaves no room for max_new_tokens in the model's context gets "" (it then counts as missing)."""
    from psyche.sampler import SamplingParams, generate_texts, row_seeds

    log = log or (lambda msg: print(msg, file=sys.stderr))
    prompts = [tokenizer.encode(tokenizer.render_chat(build_prompt(it, style), add_generation_prompt=True))
               for it in items]
    room = model.config.max_position_embeddings - max_new_tokens
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    responses = {items[i].id: "" for i in order if len(prompts[i]) > room}
    for i in order:
        if len(prompts[i]) > room:
            log(f"skip {items[i].id}: prompt of {len(prompts[i])} tokens leaves no room for {max_new_tokens}")
    todo = [i for i in order if len(prompts[i]) <= room]
    texts = generate_texts(model, tokenizer, [prompts[i] for i in todo], batch_size=batch_size,
                           max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature, top_p),
                           seed=row_seeds(seed, len(items))[todo], log=log)
    responses.update({items[i].id: t for i, t in zip(todo, texts)})
    return responses
