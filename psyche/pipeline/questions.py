"""`psyche data questions`: passages -> A-D multiple-choice questions, quality-checked and deduplicated.

Per passage (one item): the generator writes `n` questions as a JSON array (prompts.py "question_user");
`parse_questions` reads it strictly; each valid question goes to the quality checker (prompts.py
"check_user"), whose verdict `parse_verdict` reads; questions that pass and are not near-duplicates of a
kept question are written. A passage is "kept" when at least one of its questions is; else "dropped" with
the first reason in the order unparseable (no JSON list), invalid (a question breaks the format rules),
failed check, check unparseable (no verdict line), duplicate (same normalised question text, or MinHash
near-duplicate of a kept question's text and options). Every question's fate is in the log's detail. A backend
failure on the passage or on any of its checks makes it "failed" (retried by a rerun).

Output records (PCEB-style, ready for `train.py --stage grpo`, or for rationales):
    {"id": "<passage key>-q<i>", "question", "options": {"A".."D"}, "answer": "B" | "ACD", "analysis", "source"}

MC format rules (`check_mcq`, also used for input items by rationales and select):
- question: a non-empty string; options: an object of non-empty, distinct strings keyed by letters;
  generated questions need exactly A, B, C, D (input items: two to five of A-E, as PCEB and CPsyExam have);
  a leading "A." / "A、" / "A:" inside an option's text is removed;
- answer: option letters, possibly separated by spaces , ， 、; each an option, none repeated; stored sorted;
  one letter = single choice, more = multiple choice.
"""

from __future__ import annotations

import json
import re

from psyche.pipeline import prompts as P
from psyche.pipeline.backends import Failure, stable_seed
from psyche.pipeline.clean import NearDuplicateIndex
from psyche.pipeline.io import Journal, Result, Summary, run_step

_THINK = re.compile(r"<think>.*?</think>", re.S)
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_OPTION_PREFIX = re.compile(r"^\s*[A-E]\s*[.、:：)）]\s*")
_ANSWER = re.compile(r"[A-E](?:[\s,，、]*[A-E])*")
DROP_ORDER = ("unparseable", "invalid", "failed check", "check unparseable", "duplicate")
NO_JSON, NOT_LIST, EMPTY = "no JSON array or object found", "JSON is not a list of questions", "an empty list"
UNPARSEABLE = (NO_JSON, NOT_LIST, EMPTY)


# ---------------------------------------------------------------- MC items

def check_mcq(obj, generated: bool = False) -> tuple[dict | None, str]:
    """A question object -> (normalised {question, options, answer, analysis}, "") or (None, why)."""
    if not isinstance(obj, dict):
        return None, "not an object"
    q = obj.get("question")
    if not isinstance(q, str) or not q.strip():
        return None, "no question text"
    opts = obj.get("options")
    if not isinstance(opts, dict):
        return None, "options is not an object"
    letters = sorted(opts)
    if generated and letters != list("ABCD"):
        return None, f"options must be exactly A-D, got {letters}"
    if not generated and (not 2 <= len(letters) <= 5 or any(k not in "ABCDE" or len(k) != 1 for k in letters)):
        return None, f"options must be two to five of A-E, got {letters}"
    clean = {}
    for k in letters:
        v = opts[k]
        if not isinstance(v, str) or not _OPTION_PREFIX.sub("", v).strip():
            return None, f"option {k} is empty or not text"
        clean[k] = _OPTION_PREFIX.sub("", v).strip() if generated else v.strip()
    if generated and len(set(clean.values())) < len(clean):
        return None, "options repeat"
    ans = obj.get("answer")
    if not isinstance(ans, str) or not _ANSWER.fullmatch(ans.strip()):
        return None, f"answer must be option letters, got {ans!r}"
    picked = re.findall(r"[A-E]", ans)
    if len(set(picked)) != len(picked) or any(c not in clean for c in picked):
        return None, f"answer {ans!r} repeats letters or names a missing option"
    analysis = obj.get("analysis") or ""
    if not isinstance(analysis, str):
        return None, "analysis is not text"
    return {"question": q.strip(), "options": clean, "answer": "".join(sorted(picked)),
            "analysis": analysis.strip()}, ""


def to_item(rec, key: str):
    """A PCEB-like dict or a psyche.pceb.Item -> (Item, "") or (None, why). Dicts are checked by check_mcq."""
    from psyche.pceb import Item

    if isinstance(rec, Item):
        if not rec.answer or not rec.options:
            return None, "not a choice item with an answer"
        return rec, ""
    mc, why = check_mcq(rec)
    if mc is None:
        return None, why
    qtype = "single" if len(mc["answer"]) == 1 else "multiple"
    return Item(key, str(rec.get("category") or "generated"), qtype, mc["question"], mc["options"], mc["answer"],
                mc["analysis"], case_text=str(rec.get("case_text") or "")), ""


def question_text(item) -> str:
    """The question as the pipeline's prompts show it: case text, question, "X. option" lines."""
    from psyche.pceb import question_block

    return question_block(item)


# ---------------------------------------------------------------- parsing model output

def _json_value(text: str):
    """The first JSON value found in a fenced block, or between the outermost [ ] or { }; None if none."""
    cands = _FENCE.findall(text)
    for open_, close in (("[", "]"), ("{", "}")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            cands.append(text[i:j + 1])
    for c in cands:
        try:
            return json.loads(c)
        except json.JSONDecodeError:
            continue
    return None


def parse_questions(text: str) -> tuple[list[tuple[int, dict]], list[str]]:
    """Generator output -> ([(position in the output, valid question)], errors). `<think>` blocks are ignored;
    the JSON is an array of question objects, {"questions": [...]}, or one question object."""
    value = _json_value(_THINK.sub("", text))
    if value is None:
        return [], [NO_JSON]
    if isinstance(value, dict):
        value = value.get("questions", [value]) if "question" not in value else [value]
    if not isinstance(value, list):
        return [], [NOT_LIST]
    if not value:
        return [], [EMPTY]
    good, errors = [], []
    for i, obj in enumerate(value):
        mc, why = check_mcq(obj, generated=True)
        if mc is None:
            errors.append(f"question {i}: {why}")
        else:
            good.append((i, mc))
    return good, errors


def parse_verdict(text: str, lang: str = "zh") -> bool | None:
    """The checker's last verdict line: True (pass), False (fail), None (none found)."""
    found = re.findall(P.get(lang, "verdict_pattern"), _THINK.sub("", text))
    if not found:
        return None
    return found[-1].lower() == P.get(lang, "verdict_pass")


def _norm(text: str) -> str:
    return re.sub(r"[\W_]+", "", text.lower())


# ---------------------------------------------------------------- the step

def question_messages(passage: str, n: int, lang: str) -> list[dict]:
    return [{"role": "system", "content": P.get(lang, "question_system")},
            {"role": "user", "content": P.fill(P.get(lang, "question_user"), passage=passage, n=n)}]


def check_messages(passage: str, mc: dict, lang: str) -> list[dict]:
    block = mc["question"] + "\n" + "\n".join(f"{k}. {v}" for k, v in mc["options"].items())
    return [{"role": "system", "content": P.get(lang, "check_system")},
            {"role": "user", "content": P.fill(P.get(lang, "check_user"), passage=passage, question=block,
                                              answer=mc["answer"])}]


def generate_questions(records, journal: Journal, backend, *, checker=None, check: bool = True, n: int = 3,
                       lang: str = "zh", field: str = "text", threshold: float = 0.8, temperature: float = 0.7,
                       top_p: float = 0.9, max_tokens: int = 1024, seed: int = 0, batch_size: int = 8,
                       limit: int | None = None, progress: bool = True) -> Summary:
    """Write questions for the passages [(record, where)] into journal output "out" (rules above).
    `checker` (default: the generator) judges quality unless check=False."""
    checker = checker or backend
    index = NearDuplicateIndex(threshold)
    seen = set()
    for rec in journal.records("out"):
        text = rec["question"] + " " + " ".join(rec["options"].values())
        index.add(str(rec["id"]), text)
        seen.add(_norm(rec["question"]))
    summary = Summary("questions")
    sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens)

    def process(batch):
        todo, results = [], {}
        for key, rec, where in batch:
            passage = rec.get(field)
            if not isinstance(passage, str) or not passage.strip():
                results[key] = Result(key, "dropped", "no text", detail={"where": where})
            else:
                todo.append((key, passage))
        replies = backend.complete([question_messages(p, n, lang) for _, p in todo],
                                   seeds=[stable_seed("questions", seed, k) for k, _ in todo], **sampling)
        parsed, replies_by_key = [], {}  # (key, passage, [mc], errors); key -> generator reply
        for (key, passage), reply in zip(todo, replies):
            if isinstance(reply, Failure):
                results[key] = Result(key, "failed", "backend error", detail={"error": reply.reason})
                continue
            good, errors = parse_questions(reply)
            summary.counts["questions parsed"] += len(good)
            replies_by_key[key] = reply
            parsed.append((key, passage, good, errors))
        flat = [(key, i, passage, mc) for key, passage, good, _ in parsed for i, mc in good]
        verdicts = [True] * len(flat)
        if check and flat:
            verdicts = checker.complete([check_messages(p, mc, lang) for _, _, p, mc in flat],
                                        seeds=[stable_seed("check", seed, k, i) for k, i, _, _ in flat], **sampling)
        by_key = {}
        for (key, i, _, mc), v in zip(flat, verdicts):
            by_key.setdefault(key, []).append((i, mc, v))
        for key, passage, good, errors in parsed:
            cands = by_key.get(key, [])
            failures = [v.reason for _, _, v in cands if isinstance(v, Failure)]
            if failures:
                results[key] = Result(key, "failed", "backend error", detail={"error": failures[0]})
                continue
            why = [f"unparseable: {e}" if e in UNPARSEABLE else f"invalid: {e}" for e in errors]
            kept = []
            for i, mc, v in cands:
                verdict = v if isinstance(v, bool) else parse_verdict(v, lang)
                text = mc["question"] + " " + " ".join(mc["options"].values())
                dup = index.find(text) if verdict else None
                if verdict is None:
                    why.append(f"check unparseable: question {i}: {str(v)[:200]}")
                elif not verdict:
                    why.append(f"failed check: question {i}: {str(v)[:200]}")
                elif _norm(mc["question"]) in seen or dup is not None:
                    why.append(f"duplicate: question {i}" + (f" of {dup[0]}" if dup else ""))
                else:
                    qid = f"{key}-q{i}"
                    index.add(qid, text)
                    seen.add(_norm(mc["question"]))
                    kept.append({"id": qid, **mc, "source": key})
            summary.counts.update("questions " + w.split(":")[0] for w in why if not w.startswith("unparseable"))
            summary.counts["questions kept"] += len(kept)
            if kept:
                results[key] = Result(key, "kept", outputs={"out": kept}, detail={"dropped": why})
            else:
                reason = next(r for r in DROP_ORDER if any(w.startswith(r + ":") for w in why))
                results[key] = Result(key, "dropped", reason,
                                      detail={"dropped": why, "reply": replies_by_key[key][:300]})
        for key, _, _ in batch:
            yield results[key]

    return run_step("questions", records, journal, process, batch_size=batch_size, limit=limit, summary=summary,
                    progress=progress)

