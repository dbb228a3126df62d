"""Rewards for GRPO: Psyche-R1's format reward and multiple-choice accuracy, composable with weights.

A reward function is any callable `(prompt: str, completion: str, item: dict | Item) -> float`, registered
by name so a run config can say `rewards = ["format", "accuracy"]` with `reward_weights = [0.1, 1.0]`. Answers are extracted with the
PCEB scoring rules (psyche.evaluate.extract_answer): regular expressions only, model text is never run.
"""

from __future__ import annotations

import math
import re
from typing import Callable

from psyche.evaluate import credit, exact, extract_answer

RewardFn = Callable[[str, str, object], float]
REGISTRY: dict[str, RewardFn] = {}

# Reasoning inside one <think>...</think> at the start, then a non-empty answer after it, nothing else.
FORMAT_RE = re.compile(r"^\s*<think>(?P<think>(?:(?!</?think>).)+)</think>(?P<answer>(?:(?!</?think>).)*\S(?:(?!</?think>).)*)$",
                       re.S)


def register(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        REGISTRY[name] = fn
        return fn
    return deco


def _field(item, key, default=""):
    return item.get(key, default) if isinstance(item, dict) else getattr(item, key, default)


def _qtype(item) -> str:
    q = _field(item, "qtype", "")
    if q:
        return q
    return "multiple" if len(str(_field(item, "answer")).strip()) > 1 else "single"


@register("format")
def format_reward(prompt: str, completion: str, item=None) -> float:
    """1 when the completion is `<think>reasoning</think>answer` (non-empty reasoning and answer, one think
    block, nothing before it), else 0. A trailing end-of-turn marker is ignored."""
    text = completion.removesuffix("<|im_end|>").removesuffix("<|endoftext|>")
    m = FORMAT_RE.match(text)
    return 1.0 if m and m.group("think").strip() else 0.0


@register("accuracy")
def accuracy_reward(prompt: str, completion: str, item) -> float:
    """Strict: 1 when the extracted letters equal the gold set, else 0 (missing answers score 0)."""
    pred = extract_answer(completion, _qtype(item))
    return 1.0 if exact(pred, str(_field(item, "answer")).strip()) else 0.0


@register("accuracy_elastic")
def accuracy_elastic_reward(prompt: str, completion: str, item) -> float:
    """PCEB's elastic credit: 1 exact, |pred|/|gold| for a proper subset of the gold letters, else 0."""
    return credit(extract_answer(completion, _qtype(item)), str(_field(item, "answer")).strip())


class RewardError(RuntimeError):
    """A reward function that raised or returned a non-finite value; the message names the function and the
    sample, and the run stops before that reward reaches an advantage (or a checkpoint)."""


class RewardSet:
    """A weighted sum of registered reward functions; keeps each function's value for logging."""

    def __init__(self, weights: dict[str, float]):
        unknown = [k for k in weights if k not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown reward function(s) {unknown}; registered: {sorted(REGISTRY)}")
        if not weights:
            raise ValueError("at least one reward function is needed")
        self.weights = dict(weights)

    def __call__(self, prompt: str, completion: str, item, where: str = "") -> tuple[float, dict[str, float]]:
        """(weighted total, {name: value}). `where` names the sample in errors (e.g. its prompt's file:line)."""
        parts = {name: self._one(name, prompt, completion, item, where) for name in self.weights}
        return sum(self.weights[n] * v for n, v in parts.items()), parts

    @staticmethod
    def _one(name: str, prompt: str, completion: str, item, where: str) -> float:
        sample = f"{where or 'a sample'} (completion {completion[:60]!r}{'...' if len(completion) > 60 else ''})"
        try:
            value = float(REGISTRY[name](prompt, completion, item))
        except Exception as e:  # chained: PSYCHE_DEBUG=1 shows the function's own traceback
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e} on {sample}") from e
        if not math.isfinite(value):
            raise RewardError(f"reward function {name!r} returned {value} on {sample}")
        return value
