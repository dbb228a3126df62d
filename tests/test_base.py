"""The shipped base model of the embedded default: it loads, answers in the task's format, knows the practice
scales and not Xu Youxin's rule; its build record is complete; the builder runs end to end."""

import json

import pytest

from psyche.base import BASE_DIR, build, corpus
from psyche.rewards import format_reward
from psyche.sampler import generate_texts
from psyche.task import make_splits, skill_rates, task_prompt
from psyche.tokenizer import Tokenizer
from psyche.weights import load_pretrained


@pytest.fixture(scope="module")
def base():
    model, cfg = load_pretrained(BASE_DIR)
    return model, Tokenizer.from_dir(BASE_DIR), cfg


def test_shipped_base_answers_practice_items(base):
    model, tok, cfg = base
    assert cfg.num_params() < 2_000_000 and cfg.torch_dtype == "float32"
    _, held = corpus(7, 4, 10)  # 40 held-out practice items of a seed the build did not use
    rates = skill_rates(model, tok, held)
    assert rates["correct"] >= 0.7 and rates["sum"] >= 0.95 and rates["letters"] >= 0.9, rates


def test_shipped_base_answers_task_items_in_format_but_does_not_know_the_rule(base):
    model, tok, _ = base
    _, items = make_splits(7, n_train=0, n_test=40)
    prompts = [tok.encode_chat(task_prompt(it), add_generation_prompt=True)[0] for it in items]
    replies = generate_texts(model, tok, prompts, max_new_tokens=64)
    assert sum(format_reward("", r) for r in replies) >= 0.9 * len(items)
    rates = skill_rates(model, tok, items)
    assert rates["correct"] < 0.5 and rates["dim1"] < 0.6, rates  # Xu Youxin's phrases and cut points are new


def test_build_record_is_complete():
    rec = json.loads((BASE_DIR / "build.json").read_text())
    assert rec["command"].startswith("python -m psyche.base")
    assert {"platform", "torch", "cpu_capability"} <= set(rec["machine"])
    assert rec["curve"] and rec["curve"][-1]["step"] == rec["settings"]["steps"]
    assert rec["practice_final"]["correct"] >= 0.7


def test_builder_end_to_end(tmp_path):
    out = tmp_path / "base"
    rec = build(out, steps=4, seed=1, n_per_scale=40, vocab=600, lr=3e-3, batch=8, eval_every=2,
                work=tmp_path / "work", log=lambda *a: None)
    assert [r["step"] for r in rec["curve"]] == [2, 4]
    model, cfg = load_pretrained(out)
    assert cfg.vocab_size % 64 == 0 and (out / "tokenizer.json").is_file()
    assert json.loads((out / "build.json").read_text())["settings"]["steps"] == 4
    weights = (out / "model.safetensors").read_bytes()
    again = build(out, steps=4, seed=1, n_per_scale=40, vocab=600, lr=3e-3, batch=8, eval_every=2,
                  work=tmp_path / "work", log=lambda *a: None)  # same inputs, same weights (deterministic)
    assert again["practice_final"] == rec["practice_final"]
    assert (out / "model.safetensors").read_bytes() == weights
