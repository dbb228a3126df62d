"""The Psyche-R1 data pipeline: psychology text -> SFT and GRPO data, with any LLM behind it.

    psyche data clean       raw text -> clean passages (emoji, ads, links out; punctuation; MinHash-LSH dedup)
    psyche data questions   passages -> A-D multiple-choice questions (JSON-parsed, quality-checked, deduplicated)
    psyche data rationales  MC items -> items with a rationale whose answer matches gold, refined over T rounds
    psyche data empathy     counselling dialogues -> the same dialogues with empathetic counsellor replies
    psyche data select      MC items -> challenge pool (every selector wrong: GRPO) and the rest (SFT)

Modules: backends.py (LLM backends: local psyche model, OpenAI-compatible HTTP, a Python function),
prompts.py (every prompt, Chinese and English), io.py (resumable JSONL steps), one module per step, cli.py.
Every step reads JSONL, writes JSONL in the formats train.py reads (messages dialogues; PCEB-style items
{question, options, answer, analysis}), logs each item's fate with a reason, and resumes where it stopped.
"""

from psyche.pipeline.backends import Backend, CallableBackend, Failure, LocalBackend, OpenAIBackend  # noqa: F401
from psyche.pipeline.select import select_challenges  # noqa: F401
