"""Reading JSONL text line by line, as JSON means it."""

from __future__ import annotations


def jsonl_lines(text: str) -> list[str]:
    r"""The lines of a JSONL text, split at "\n" alone (a trailing "\r" removed), so that the i-th item is line i.

    Not str.splitlines(): that also splits at U+2028, U+2029, U+0085 and other separators, which JSON allows raw
    inside a string and which json.dumps(..., ensure_ascii=False) writes raw. A final newline ends the last
    line; it does not start an empty one.
    """
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines[-1] == "" else lines
