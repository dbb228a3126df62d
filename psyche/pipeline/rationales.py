"""`psyche data rationales`: multiple-choice items -> items with a verified rationale, refined over T rounds.

For each item (Psyche-R1's "rationale iteration"):
0. With the rationale prompt (prompts.py "rationale_prompt", as the system turn) the model writes
   `<think>rationale</think>answer`. `judge` keeps it only when the format holds and the answer after
   `</think>` (psyche.evaluate.extract_answer) is exactly the gold set of letters; otherwise the item is
   dropped ("no rationale" / "no answer" / "wrong answer").
1..T. Each round the model proposes a revised prompt from the current prompt, the question and the current
   rationale ("revise_user"; `parse_prompt` reads the last <prompt>...</prompt>, rejects an empty one, one
   longer than MAX_PROMPT characters, or one that states an answer such as "答案是B" / "answer is B"), and
   the rationale is written again under the new prompt. The new rationale (and prompt) replace the current
   ones only when `judge` accepts it, i.e. the answer stays correct; else the round is rejected and the
   current ones stay. A backend failure during a round rejects that round only (the item keeps its verified
   rationale); a backend failure in round 0 makes the item "failed" (retried by a rerun).
The prompt evolves per item. Every round's outcome is in the log's detail.

Output (PCEB-style, for `train.py --stage sft`, which trains on `<think>{analysis}</think>{answer}`):
    the input record with "id", "answer" (normalised letters), "analysis" = the final rationale and
    "rationale_rounds" = the number of accepted rounds.
"""

from __future__ import annotations

import re

from psyche.evaluate import extract_answer, item_letters
from psyche.pipeline import prompts as P
from psyche.pipeline.backends import Failure, stable_seed
from psyche.pipeline.io import Journal, Result, Summary, run_step
from psyche.pipeline.questions import question_text, to_item

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_PROMPT = 4000
_PROMPT = re.compile(r"<prompt>(.*?)</prompt>", re.S)
_LEAK = re.compile(r"(答案|正确选项|正确答案)\s*(是|为|:|：)\s*[A-E]|\banswer\s*(is|:)\s*[A-E]\b", re.I)


def judge(text: str, item) -> tuple[str | None, str, str]:
    """(rationale or None, predicted letters, why it was refused: "" when accepted)."""
    i, j = text.find(THINK_OPEN), text.rfind(THINK_CLOSE)
    if i < 0 or j < i:
        return None, "", "no rationale"
    rationale = text[i + len(THINK_OPEN):j].strip()
    if not rationale:
        return None, "", "no rationale"
    pred = extract_answer(text[j:], item.qtype, item_letters(item))
    if not pred:
        return None, "", "no answer"
    if set(pred) != set(item.answer):
        return None, pred, "wrong answer"
    return rationale, pred, ""


def parse_prompt(text: str) -> tuple[str | None, str]:
    """(the proposed prompt, "") or (None, why)."""
    found = [m.strip() for m in _PROMPT.findall(text.split(THINK_CLOSE)[-1])]
    found = [m for m in found if m]
    if not found:
        return None, "no <prompt> block"
    p = found[-1]
    if len(p) > MAX_PROMPT:
        return None, f"prompt longer than {MAX_PROMPT} characters"
    if _LEAK.search(p):
        return None, "prompt states an answer"
    return p, ""


def rationale_messages(prompt: str, item, lang: str) -> list[dict]:
    return [{"role": "system", "content": prompt},
            {"role": "user", "content": P.fill(P.get(lang, "rationale_user"), question=question_text(item))}]


def revise_messages(prompt: str, item, rationale: str, lang: str) -> list[dict]:
    return [{"role": "system", "content": P.get(lang, "revise_system")},
            {"role": "user", "content": P.fill(P.get(lang, "revise_user"), prompt=prompt, question=question_text(item),
                                              rationale=rationale)}]


def refine(items: list[tuple[str, object]], backend, *, rounds: int = 2, lang: str = "zh", prompt: str | None = None,
           temperature: float = 0.7, top_p: float = 0.9, max_tokens: int = 1024, seed: int = 0) -> dict:
    """The iteration for [(key, Item)] -> {key: state}; state has status, reason, rationale, prompt, history."""
    sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    start = prompt or P.get(lang, "rationale_prompt")
    states = {k: {"status": "dropped", "reason": "", "rationale": None, "prompt": start, "history": []}
              for k, _ in items}
    replies = backend.complete([rationale_messages(start, it, lang) for _, it in items],
                               seeds=[stable_seed("rationale", seed, k, 0) for k, _ in items], **sampling)
    alive = []
    for (k, it), reply in zip(items, replies):
        st = states[k]
        if isinstance(reply, Failure):
            st.update(status="failed", reason="backend error")
            st["history"].append({"round": 0, "error": reply.reason})
            continue
        rationale, pred, why = judge(reply, it)
        st["history"].append({"round": 0, "pred": pred, "accepted": rationale is not None, "why": why})
        if rationale is None:
            st["reason"] = why
            st["reply"] = reply[:300]
        else:
            st.update(status="kept", rationale=rationale)
            alive.append((k, it))
    for t in range(1, rounds + 1):
        if not alive:
            break
        proposals = backend.complete([revise_messages(states[k]["prompt"], it, states[k]["rationale"], lang)
                                      for k, it in alive],
                                     seeds=[stable_seed("revise", seed, k, t) for k, _ in alive], **sampling)
        retry = []  # (key, item, new prompt)
        for (k, it), reply in zip(alive, proposals):
            new, why = (None, f"backend: {reply.reason}") if isinstance(reply, Failure) else parse_prompt(reply)
            if new is None:
                states[k]["history"].append({"round": t, "accepted": False, "why": why})
            else:
                retry.append((k, it, new))
        replies = backend.complete([rationale_messages(p, it, lang) for _, it, p in retry],
                                   seeds=[stable_seed("rationale", seed, k, t) for k, _, _ in retry], **sampling)
        for (k, it, new), reply in zip(retry, replies):
            st = states[k]
            if isinstance(reply, Failure):
                st["history"].append({"round": t, "accepted": False, "why": f"backend: {reply.reason}"})
                continue
            rationale, pred, why = judge(reply, it)
            st["history"].append({"round": t, "pred": pred, "accepted": rationale is not None, "why": why,
                                  "prompt": new})
            if rationale is not None:
                st.update(rationale=rationale, prompt=new)
    return states


def write_rationales(records, journal: Journal, backend, *, rounds: int = 2, lang: str = "zh",
                     prompt: str | None = None, temperature: float = 0.7, top_p: float = 0.9, max_tokens: int = 1024,
                     seed: int = 0, batch_size: int = 8, limit: int | None = None, progress: bool = True) -> Summary:
    """Rationales for the MC items [(record, where)] into journal output "out" (rules above)."""
    summary = Summary("rationales")

    def process(batch):
        results, items = {}, []
        for key, rec, where in batch:
            item, why = to_item(rec, key)
            if item is None:
                results[key] = Result(key, "dropped", "invalid item", detail={"where": where, "error": why})
            else:
                items.append((key, item))
        states = refine(items, backend, rounds=rounds, lang=lang, prompt=prompt, temperature=temperature,
                        top_p=top_p, max_tokens=max_tokens, seed=seed) if items else {}
        recs, golds = {key: rec for key, rec, _ in batch}, dict(items)
        for key, st in states.items():
            accepted = sum(1 for h in st["history"] if h.get("round", 0) > 0 and h.get("accepted"))
            summary.counts["rounds accepted"] += accepted
            summary.counts["rounds rejected"] += sum(1 for h in st["history"]
                                                     if h.get("round", 0) > 0 and not h.get("accepted"))
            detail = {"history": st["history"], "prompt": st["prompt"]}
            if st["status"] == "kept":
                out = {"id": key, **{k: v for k, v in recs[key].items() if k != "id"}, "answer": golds[key].answer,
                       "analysis": st["rationale"], "rationale_rounds": accepted}
                results[key] = Result(key, "kept", outputs={"out": [out]}, detail=detail)
            else:
                detail["reply"] = st.get("reply", "")
                results[key] = Result(key, st["status"], st["reason"], detail=detail)
        for key, _, _ in batch:
            yield results[key]

    return run_step("rationales", records, journal, process, batch_size=batch_size, limit=limit, summary=summary,
                    progress=progress)
