"""`psyche data empathy`: counselling dialogues -> the same dialogues with empathetic counsellor replies.

Input records: {"messages": [{role, content}, ...]} (any number of turns), or a single exchange as one of
the pairs (question, answer), (input, output), (prompt, response), (query, response), (instruction, output).
Every assistant turn is rewritten on its own (prompts.py "empathy_user"), seeing the dialogue before it as
it was written ("来访者：…" / "咨询师：…" lines, the last MAX_CONTEXT characters) and the original reply.
`parse_reply` takes the last <reply>...</reply> of the answer and refuses it when it is empty, shorter than
`min_chars`, longer than `max_ratio` x the original (+ 200 characters), or carries chat-format tokens.
A dialogue is kept only when every assistant turn was rewritten; else it is dropped with the first turn's
reason. A backend failure on any turn makes the dialogue "failed" (retried by a rerun).

Output (messages format, for `train.py --stage sft`): {"id", "messages": [...]} with system and user
turns as they were and every assistant turn rewritten.
"""

from __future__ import annotations

import re

from psyche.pipeline import prompts as P
from psyche.pipeline.backends import Failure, stable_seed
from psyche.pipeline.io import Journal, Result, Summary, run_step

PAIRS = (("question", "answer"), ("input", "output"), ("prompt", "response"), ("query", "response"),
         ("instruction", "output"))
MAX_CONTEXT = 3000
_REPLY = re.compile(r"<reply>(.*?)</reply>", re.S)
_CHAT_TOKENS = re.compile(r"<\|im_(start|end)\|>|<\|endoftext\|>|</?reply>")


def to_dialogue(rec: dict) -> tuple[list[dict] | None, str]:
    """A record -> (messages, "") or (None, why)."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, "messages is not a non-empty list"
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                return None, f"message {i} is not {{role: system|user|assistant, content: text}}"
        if not any(m["role"] == "assistant" for m in msgs):
            return None, "no assistant turn"
        return [{"role": m["role"], "content": m["content"]} for m in msgs], ""
    for q, a in PAIRS:
        if isinstance(rec.get(q), str) and isinstance(rec.get(a), str) and rec[q].strip() and rec[a].strip():
            return [{"role": "user", "content": rec[q]}, {"role": "assistant", "content": rec[a]}], ""
    return None, "no messages and no (question, answer)-like pair"


def render_context(msgs: list[dict], lang: str) -> str:
    names = {"user": P.get(lang, "client"), "assistant": P.get(lang, "counsellor")}
    colon = "：" if lang == "zh" else ": "
    text = "\n".join(f"{names[m['role']]}{colon}{m['content'].strip()}" for m in msgs if m["role"] in names)
    return text[-MAX_CONTEXT:]


def parse_reply(text: str, original: str, min_chars: int = 5, max_ratio: float = 4.0) -> tuple[str | None, str]:
    """(rewritten reply, "") or (None, why)."""
    found = [m.strip() for m in _REPLY.findall(text.split("</think>")[-1])]
    found = [m for m in found if m]
    if not found:
        return None, "no <reply> block"
    r = found[-1]
    if _CHAT_TOKENS.search(r):
        return None, "chat tokens in reply"
    if len(r) < min_chars:
        return None, "too short"
    if len(r) > max_ratio * len(original) + 200:
        return None, "too long"
    return r, ""


def empathy_messages(context: str, reply: str, lang: str) -> list[dict]:
    return [{"role": "system", "content": P.get(lang, "empathy_system")},
            {"role": "user", "content": P.fill(P.get(lang, "empathy_user"), context=context, reply=reply)}]


def rewrite_dialogues(records, journal: Journal, backend, *, lang: str = "zh", min_chars: int = 5,
                      max_ratio: float = 4.0, temperature: float = 0.7, top_p: float = 0.9, max_tokens: int = 1024,
                      seed: int = 0, batch_size: int = 8, limit: int | None = None,
                      progress: bool = True) -> Summary:
    """Rewrite the dialogues [(record, where)] into journal output "out" (rules above)."""
    summary = Summary("empathy")
    sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens)

    def process(batch):
        results, dialogues, turns = {}, {}, []  # turns: (key, message index, messages)
        for key, rec, where in batch:
            msgs, why = to_dialogue(rec)
            if msgs is None:
                results[key] = Result(key, "dropped", "invalid dialogue", detail={"where": where, "error": why})
                continue
            dialogues[key] = msgs
            turns += [(key, j, empathy_messages(render_context(msgs[:j], lang), m["content"], lang))
                      for j, m in enumerate(msgs) if m["role"] == "assistant"]
        replies = backend.complete([t[2] for t in turns], seeds=[stable_seed("empathy", seed, k, j)
                                                                  for k, j, _ in turns], **sampling)
        rewritten: dict[str, dict] = {key: {} for key in dialogues}
        for (key, j, _), reply in zip(turns, replies):
            rewritten[key][j] = reply
        for key, msgs in dialogues.items():
            new, problems, failure, ok = [dict(m) for m in msgs], [], None, 0
            for j, reply in sorted(rewritten[key].items()):
                if isinstance(reply, Failure):
                    failure = failure or reply.reason
                    continue
                text, why = parse_reply(reply, msgs[j]["content"], min_chars, max_ratio)
                if text is None:
                    problems.append({"turn": j, "why": why, "reply": reply[:300]})
                else:
                    new[j]["content"] = text
                    ok += 1
            summary.counts["turns rewritten"] += ok
            if failure:
                results[key] = Result(key, "failed", "backend error", detail={"error": failure})
            elif problems:
                results[key] = Result(key, "dropped", problems[0]["why"], detail={"turns": problems})
            else:
                results[key] = Result(key, "kept", outputs={"out": [{"id": key, "messages": new}]},
                                      detail={"turns": len(rewritten[key])})
        for key, _, _ in batch:
            yield results[key]

    return run_step("empathy", records, journal, process, batch_size=batch_size, limit=limit, summary=summary,
                    progress=progress)
