"""`psyche data select`: challenge-question selection (Psyche-R1): questions that every selector LLM gets
wrong go to GRPO; the rest go to SFT.

Rules (`select_challenges`):
- Each selector (a Backend) answers each multiple-choice item k times, with Psyche-R1's chat prompt
  (psyche.pceb.build_prompt, style "psyche" by default) and its own seed per sample (stable_seed of the
  selector's name, the item key and the sample index).
- The answer is read with psyche.evaluate.extract_answer (the text after the last </think>; no letter =
  missing); a sample is correct when its letters equal the gold letters exactly (a partial multiple-choice
  answer is wrong). Model text is only ever matched with regular expressions.
- A selector solves an item when at least one of its k samples is correct (pass@k).
- An item no selector solves is a challenge item (GRPO pool); an item some selector solves is a
  non-challenge item (SFT pool). With early_stop (default), once a selector solves an item the later
  selectors are not asked about it: the outcome is the same, the log shows fewer answers.
- A backend failure on an item that no selector solved leaves it undecided: "failed", in neither pool
  (the command retries it on a rerun). Items that are not valid choice items with an answer are "invalid".

Items may be PCEB-like dicts {question, options{A..}, answer, analysis?} or psyche.pceb.Item objects; the
pools hold the objects given. The command writes each pool as JSONL records (the input record with "id" and
normalised "answer"), which `train.py --stage grpo` (challenge) and `--stage sft` (non-challenge) read.
"""

from __future__ import annotations

from psyche.evaluate import exact, extract_answer, item_letters
from psyche.pipeline.backends import Failure, stable_seed
from psyche.pipeline.io import Journal, Result, Summary, item_key, run_step
from psyche.pipeline.questions import to_item


def _names(selectors) -> list[str]:
    names, seen = [], {}
    for s in selectors:
        n = getattr(s, "name", type(s).__name__)
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return names


def select_challenges(items, selectors, k: int = 1, *, keys: list[str] | None = None, style: str = "psyche",
                      temperature: float = 0.7, top_p: float = 0.9, max_tokens: int = 1024, seed: int = 0,
                      early_stop: bool = True):
    """-> (challenge items, non-challenge items, one record per item).

    A record: {"key", "status": challenge | non_challenge | failed | invalid, "reason", "answers": {selector:
    [letters per sample]}, "correct": {selector: samples correct}, "errors": [backend failures]}."""
    from psyche.pceb import Item, build_prompt

    if not selectors:
        raise ValueError("select_challenges needs at least one selector")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    keys = keys or [it.id if isinstance(it, Item) else item_key(it) for it in items]
    names = _names(selectors)
    records, parsed = [], []
    for obj, key in zip(items, keys):
        item, why = to_item(obj, key)
        rec = {"key": key, "status": "invalid" if item is None else "", "reason": why, "answers": {},
               "correct": {}, "errors": []}
        records.append(rec)
        parsed.append(item)
    solved = [False] * len(items)
    for sel, name in zip(selectors, names):
        ask = [i for i, it in enumerate(parsed) if it is not None and not (early_stop and solved[i])]
        if not ask:
            continue
        prompts = [build_prompt(parsed[i], style) for i in ask for _ in range(k)]
        seeds = [stable_seed("select", seed, name, keys[i], j) for i in ask for j in range(k)]
        replies = sel.complete(prompts, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seeds=seeds)
        for n, i in enumerate(ask):
            it, rec = parsed[i], records[i]
            preds = []
            for reply in replies[n * k:(n + 1) * k]:
                if isinstance(reply, Failure):
                    rec["errors"].append(f"{name}: {reply.reason}")
                    preds.append(None)
                else:
                    preds.append(extract_answer(reply, it.qtype, item_letters(it)))
            good = sum(1 for p in preds if exact(p, it.answer))
            rec["answers"][name], rec["correct"][name] = preds, good
            solved[i] = solved[i] or good > 0
    challenge, rest = [], []
    for obj, item, rec, ok in zip(items, parsed, records, solved):
        if item is None:
            continue
        if ok:
            rec["status"], rec["reason"] = "non_challenge", "solved by " + ", ".join(
                n for n, c in rec["correct"].items() if c)
            rest.append(obj)
        elif rec["errors"]:
            rec["status"], rec["reason"] = "failed", "backend error"
        else:
            rec["status"], rec["reason"] = "challenge", "every selector wrong"
            challenge.append(obj)
    return challenge, rest, records


def select_step(records, journal: Journal, selectors, *, k: int = 1, style: str = "psyche", temperature: float = 0.7,
                top_p: float = 0.9, max_tokens: int = 1024, seed: int = 0, early_stop: bool = True,
                batch_size: int = 16, limit: int | None = None, progress: bool = True) -> Summary:
    """The command: items [(record, where)] -> journal outputs "challenge" and "non_challenge"."""
    summary = Summary("select")

    def process(batch):
        keys = [key for key, _, _ in batch]
        recs = [rec for _, rec, _ in batch]
        _, _, decided = select_challenges(recs, selectors, k, keys=keys, style=style, temperature=temperature,
                                          top_p=top_p, max_tokens=max_tokens, seed=seed, early_stop=early_stop)
        for (key, rec, where), d in zip(batch, decided):
            detail = {"answers": d["answers"], "correct": d["correct"], "errors": d["errors"]}
            if d["status"] == "invalid":
                yield Result(key, "dropped", "invalid item", detail={"where": where, "error": d["reason"]})
            elif d["status"] == "failed":
                yield Result(key, "failed", "backend error", detail=detail)
            else:
                item, _ = to_item(rec, key)
                out = {"id": key, **{k_: v for k_, v in rec.items() if k_ != "id"}, "answer": item.answer}
                pool = d["status"]
                yield Result(key, "kept", pool.replace("_", "-"), outputs={pool: [out]}, detail=detail)

    return run_step("select", records, journal, process, batch_size=batch_size, limit=limit, summary=summary,
                    progress=progress)
