"""The built-in task: determinism, disjoint splits, answers that follow from the item's own text (recomputed here
with independent arithmetic), balanced gold letters, the teachers' slip and the challenge items it defines, the
grading of replies step by step, prompt/target format."""

import random
import re
from collections import Counter

import pytest

from psyche.evaluate import accuracy_summary, extract_answer
from psyche.pceb import Item, build_prompt
from psyche.scales import DURATIONS, PRACTICE_SCALES, SCALES, XU
from psyche.task import (SKILLS, TYPES, Teacher, balance, case_of, course_read, explain, fact_keys, grade,
                         group_by_type, is_challenge, item_to_sft_messages, item_type_of, letter_counts, make_splits,
                         option_lines, sft_target, slip, slip_applies, task_prompt)

DURATION = re.compile(r"(半|两|\d+)(个多月|个月|周|年半|年多|年)")


@pytest.fixture(scope="module")
def splits():
    return make_splits(0, n_train=800, n_test=200)


def months(num: str, unit: str) -> float:
    """A duration read from the text, in months, by its own arithmetic (not the generator's table)."""
    n = 0.5 if num == "半" else 2 if num == "两" else int(num)
    return {"周": n / 4.3, "个月": n, "个多月": n + 0.5, "年": 12 * n, "年多": 12 * n + 3, "年半": 12 * n + 6}[unit]


def xu_scores(text: str) -> tuple[int, int, int]:
    """(course, distress, social) recomputed from a vignette: Xu Youxin's cut points, the phrase vocabulary."""
    found = DURATION.findall(text)
    assert len(found) == 1, text
    m = months(*found[0])
    course = 1 if m < 3 else 2 if m <= 12 else 3
    (d,) = [s for p, s in XU.dims[0].phrases.items() if p in text]
    (s,) = [s for p, s in XU.dims[1].phrases.items() if p in text]
    return course, d, s


def xu_level(total: int) -> str:
    return "不够神经症" if total == 3 else "可疑神经症" if total <= 5 else "神经症"


def statement_holds(stmt: str, scores, total) -> bool:
    if m := re.fullmatch(r"(病程|精神痛苦|社会功能)评(\d)分", stmt):
        return int(m[2]) == scores[("病程", "精神痛苦", "社会功能").index(m[1])]
    if m := re.fullmatch(r"总分为(\d)分", stmt):
        return int(m[1]) == total
    m = re.fullmatch(r"属于(\S+)", stmt)
    assert m and m[1] in XU.levels, stmt
    return m[1] == xu_level(total)


def test_same_seed_same_items_other_seed_other_items():
    a, b = make_splits(3, 120, 40), make_splits(3, 120, 40)
    assert a == b
    c = make_splits(4, 120, 40)
    assert [it.case_text for it in a[0]] != [it.case_text for it in c[0]]
    assert fact_keys(XU, 3, 0.25) != fact_keys(XU, 4, 0.25)


def test_splits_are_disjoint_and_cover_every_class(splits):
    train, test = splits
    assert len(train) == 800 and len(test) == 200
    assert not {it.ref for it in train} & {it.ref for it in test}  # fact keys
    assert not {it.case_text for it in train} & {it.case_text for it in test}
    assert len({it.id for it in train + test}) == 1000
    all_scores = {(c, d, s) for c in (1, 2, 3) for d in (1, 2, 3) for s in (1, 2, 3)}
    keys = fact_keys(XU, 0, 0.25)
    for part in ("train", "test"):
        assert {xu_scores(f"{a}，{b}，{c}") for a, b, c in keys[part]} == all_scores
    for items in splits:
        assert set(group_by_type(items)) == set(TYPES)
        assert {xu_level(sum(xu_scores(it.case_text))) for it in items if item_type_of(it) == "level"} == set(XU.levels)


def test_answers_and_rationales_follow_from_the_text(splits):
    for it in splits[0] + splits[1]:
        scores = xu_scores(it.case_text)
        total = sum(scores)
        reasoning = it.analysis.split("\n")[0]  # the scoring line; the option lines follow
        assert [int(x) for x in re.findall(r"评(\d)分", reasoning)] == list(scores)
        m = re.search(r"总分(\d)分，为(\S+?)。", reasoning)
        assert int(m[1]) == total and m[2] == xu_level(total), it
        kind = item_type_of(it)
        if kind == "total":
            assert it.options[it.answer] == f"{total}分" and f"{total - 1}分" in it.options.values()
        elif kind == "level":
            assert it.options[it.answer] == xu_level(total)
        elif kind == "score":
            (asked,) = re.findall(r"的(\S+?)评分为", it.question)
            assert it.options[it.answer] == f"{scores[('病程', '精神痛苦', '社会功能').index(asked)]}分"
        else:
            truth = "".join(k for k, v in it.options.items() if statement_holds(v, scores, total))
            assert truth == it.answer and 2 <= len(truth) <= 3
        lines = option_lines(it.analysis)
        assert [ln.split(".", 1)[0] for ln in lines] == list("ABCD")
        for ln in lines:
            k, rest = ln.split(".", 1)
            marked = ln.endswith(f"√选{k}")
            opt, ref = rest.removesuffix(f"√选{k}").split("，应为")
            assert opt == it.options[k] and marked == (k in it.answer) and ln.count("√") == marked
        assert len(set(it.options.values())) == 4 and list(it.options) == list("ABCD")
        assert it.qtype == ("multiple" if kind == "statements" else "single")
        assert "按许又新神经症评定法" in it.question


def test_gold_letters_balanced_per_type():
    train, test = make_splits(1, n_train=4000, n_test=400)
    for items in (train, test):
        for kind, group in group_by_type(items).items():
            counts = letter_counts(group)
            assert max(counts.values()) - min(counts.values()) <= 0.02 * len(group), (kind, counts)
            if kind != "statements":  # the correct option text lands in every place, not in a fixed one
                assert Counter(it.options["A"] == it.options[it.answer] for it in group)[True] == len(group) // 4


def test_the_slip_and_the_challenge_items(splits):
    """The slip scores a middle-bin course (3-12 months) as the lowest bin; an item is a challenge item exactly
    when that changes its answer, which happens only where the slip applies; the teachers fail exactly those at
    temperature 0, and elsewhere the slipped rationale still ends in the key's answer."""
    teacher = Teacher(0.7)
    train = splits[0]
    for it in train:
        c, d, s = xu_scores(it.case_text)
        assert slip_applies(it) == (c == 2)
        assert slip(case_of(it).scores) == ((1 if c == 2 else c), d, s)
        slipped, answer = explain(it, slip(case_of(it).scores))
        assert is_challenge(it) == (answer != it.answer)
        assert not is_challenge(it) or slip_applies(it)
        assert (teacher.greedy(it) != it.answer) == is_challenge(it)
        if slip_applies(it):
            assert slipped != it.analysis and "评1分" in slipped.split("；")[0]
        if item_type_of(it) == "total" and slip_applies(it):
            assert is_challenge(it)  # the total is off by one: always a wrong answer
    kinds = Counter((item_type_of(it), is_challenge(it)) for it in train)
    assert all(kinds[(t, True)] > 0 and kinds[(t, False)] > 0 for t in TYPES), kinds
    assert 0.15 < sum(map(is_challenge, train)) / len(train) < 0.3
    # sampled rationales: the slip in a share `confusion` of them where it applies, never elsewhere
    rng = random.Random(0)
    middle = [it for it in train if slip_applies(it)]
    share = sum(teacher.write(it, rng)[0] != it.analysis for it in middle) / len(middle)
    assert abs(share - 0.7) < 0.06
    assert all(teacher.write(it, rng)[0] == it.analysis for it in train if not slip_applies(it))
    assert Teacher(0.3).greedy(middle[0]) == middle[0].answer  # a teacher whose likely reading is the right one


def test_grade_judges_each_step_on_the_reply_own_earlier_steps(splits):
    it = next(i for i in splits[1] if item_type_of(i) == "total" and slip_applies(i))
    assert grade(it, sft_target(it)) == dict.fromkeys(SKILLS, True)
    slipped, answer = explain(it, slip(case_of(it).scores))
    g = grade(it, f"<think>{slipped}</think>{answer}")
    assert not g["course"] and not g["correct"]  # the slip is counted once, where it happens ...
    assert all(g[k] for k in ("dim1", "dim2", "sum", "level", "lines", "letters"))  # ... the rest follows it
    other = next(k for k in "ABCD" if k != it.answer)
    g = grade(it, sft_target(it).rsplit("</think>", 1)[0] + f"</think>{other}")
    assert g["lines"] and not g["letters"] and not g["correct"]
    assert grade(it, "乱码") == dict.fromkeys(SKILLS, False)
    wrong_sum = sft_target(it).replace(f"总分{sum(case_of(it).scores)}分", "总分2分", 1)
    assert not grade(it, wrong_sum)["sum"] and grade(it, wrong_sum)["course"]
    assert course_read(sft_target(it)) == 2 and course_read(slipped) == 1 and course_read("没有") is None


def test_messages_and_think_format(splits):
    for it in splits[1]:
        prompt = task_prompt(it)
        msgs = item_to_sft_messages(it)
        assert msgs[:-1] == prompt and [m["role"] for m in msgs] == ["user", "assistant"]
        user = prompt[0]["content"]
        assert it.case_text in user and it.question in user
        assert all(f"{k}.{v}" in user for k, v in it.options.items())
        reply = msgs[1]["content"]
        assert re.fullmatch(r"<think>[^<>]+</think>[A-D]{1,3}", reply, re.S)
        assert reply == f"<think>{it.analysis}</think>{it.answer}"
        assert extract_answer(reply, it.qtype) == it.answer
        assert item_to_sft_messages(it, "别的理由")[1]["content"] == f"<think>别的理由</think>{it.answer}"
    gold = {it.id: item_to_sft_messages(it)[1]["content"] for it in splits[1]}
    s = accuracy_summary(splits[1], gold)
    assert s["smcq_acc"] == 100.0 and s["mmcq_strict"] == 100.0 and s["missing"] == 0.0
    assert splits[1][0].case_text in build_prompt(splits[1][0])[1]["content"]


def test_type_helpers_and_balance(splits):
    train = splits[0]
    bare = Item(train[0].id, "case", "single", "q")
    assert item_type_of(bare) == item_type_of(train[0])
    with pytest.raises(ValueError):
        item_type_of(Item("x", "case", "single", "q"))
    biased = [it for it in train if "D" in it.answer] + [it for it in train if "D" not in it.answer][::5]
    pool = balance(biased, seed=0)
    cells = Counter((item_type_of(it), it.answer) for it in pool)
    assert len(cells) == 3 * 4 + 10 and len(set(cells.values())) == 1
    assert max(letter_counts(pool).values()) == min(letter_counts(pool).values())
    assert balance(biased, seed=0) == pool


def test_practice_scales_are_other_rules():
    """The base model's corpus never teaches Xu Youxin's rule: no practice scale shares its phrases, its course
    cut points or its level thresholds (one shares its level names); no cut point falls on a duration phrase."""
    xu_phrases = set(XU.dims[0].phrases) | set(XU.dims[1].phrases)
    for scale in PRACTICE_SCALES:
        assert not xu_phrases & (set(scale.dims[0].phrases) | set(scale.dims[1].phrases)), scale.name
        assert scale.course_cuts != XU.course_cuts and scale.level_cuts != XU.level_cuts
        assert not set(scale.levels) & set(XU.levels) or scale.level_cuts != XU.level_cuts
        assert [sum(s == k for s in dim.phrases.values()) for dim in scale.dims for k in (1, 2, 3)] == [2] * 6
    for scale in SCALES.values():
        assert all(m not in scale.course_cuts for m in DURATIONS.values())
        assert {scale.course_score(d) for d in DURATIONS} == {1, 2, 3}
        items, _ = make_splits(0, n_train=40, n_test=0, scale=scale)
        assert all(it.id.startswith(scale.key + "/") and case_of(it).scale is scale for it in items)
