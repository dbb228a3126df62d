"""The built-in neurosis-scoring task: determinism, disjoint splits, answers that follow from the item's own text,
balanced gold letters, the challenge question kept out of the SFT types, prompt/target format, token budget."""

import re
from collections import Counter

import pytest

from psyche.evaluate import accuracy_summary, extract_answer
from psyche.pceb import Item, build_prompt
from psyche.task import (CHALLENGE_TYPES, COURSE_PHRASES, DISTRESS_PHRASES, LEVELS, QUESTIONS, SFT_TYPES,
                         SOCIAL_PHRASES, TYPES, balance, fact_keys, group_by_kind, group_by_type,
                         item_to_sft_messages, item_type_of, letter_counts, make_splits, option_lines, solved,
                         task_prompt, token_lengths, tokenizer_corpus)
from psyche.tokenizer import train_tokenizer

DURATION = re.compile(r"(半|两|\d+)(个多月|个月|周|年半|年多|年)")


@pytest.fixture(scope="module")
def splits():
    return make_splits(0, n_train=800, n_test=200)


def months(num: str, unit: str) -> float:
    """A duration read from the text, in months, by its own arithmetic (not the generator's table)."""
    n = 0.5 if num == "半" else 2 if num == "两" else int(num)
    return {"周": n / 4.3, "个月": n, "个多月": n + 0.5, "年": 12 * n, "年多": 12 * n + 3, "年半": 12 * n + 6}[unit]


def parse_case(text: str) -> tuple[int, int, int]:
    """(course, distress, social) scores recomputed from a vignette with the task's phrase vocabulary."""
    found = DURATION.findall(text)
    assert len(found) == 1, text
    m = months(*found[0])
    course = 1 if m < 3 else 2 if m <= 12 else 3
    (d,) = [s for p, s in DISTRESS_PHRASES.items() if p in text]
    (s,) = [s for p, s in SOCIAL_PHRASES.items() if p in text]
    return course, d, s


def level(total: int) -> str:
    return "不够神经症" if total == 3 else "可疑神经症" if total <= 5 else "神经症"


def statement_holds(stmt: str, scores, total) -> bool:
    if m := re.fullmatch(r"病程评(\d)分", stmt):
        return int(m[1]) == scores[0]
    if m := re.fullmatch(r"精神痛苦评(\d)分", stmt):
        return int(m[1]) == scores[1]
    if m := re.fullmatch(r"总分为(\d)分", stmt):
        return int(m[1]) == total
    m = re.fullmatch(r"属于(\S+)", stmt)
    assert m and m[1] in LEVELS, stmt
    return m[1] == level(total)


def test_same_seed_same_items_other_seed_other_items():
    a, b = make_splits(3, 120, 40), make_splits(3, 120, 40)
    assert a == b
    c = make_splits(4, 120, 40)
    assert [it.case_text for it in a[0]] != [it.case_text for it in c[0]]
    assert fact_keys(3, 0.25) != fact_keys(4, 0.25)


def test_splits_are_disjoint_and_cover_every_class(splits):
    train, test = splits
    assert len(train) == 800 and len(test) == 200
    assert not {it.ref for it in train} & {it.ref for it in test}  # fact keys
    assert not {it.case_text for it in train} & {it.case_text for it in test}
    assert len({it.id for it in train + test}) == 1000
    keys = fact_keys(0, 0.25)
    all_scores = {(c, d, s) for c in (1, 2, 3) for d in (1, 2, 3) for s in (1, 2, 3)}
    for part in ("train", "test"):
        assert {(COURSE_PHRASES[a], DISTRESS_PHRASES[b], SOCIAL_PHRASES[c]) for a, b, c in keys[part]} == all_scores
    for items in splits:  # both splits mix SFT-type and challenge-type items, every level occurs
        assert set(group_by_type(items)) == set(TYPES)
        assert {level(sum(parse_case(it.case_text))) for it in items if item_type_of(it) == "level"} == set(LEVELS)


def test_answers_and_rationales_follow_from_the_text(splits):
    for it in splits[0] + splits[1]:
        scores = parse_case(it.case_text)
        total = sum(scores)
        reasoning = it.analysis.split("\n")[0]  # the scoring line; the option lines follow
        sub = [int(x) for x in re.findall(r"评(\d)分", reasoning)]
        m = re.search(r"总分(\d)分，为(\S+?)。", reasoning)
        assert sub == list(scores) and int(m[1]) == total and m[2] == level(total), it
        kind = item_type_of(it)
        if kind == "total":
            assert it.options[it.answer] == f"{total}分"
        elif kind == "level":
            assert it.options[it.answer] == level(total)
        elif kind == "social":
            assert it.options[it.answer] == f"{scores[2]}分"
        else:
            truth = "".join(k for k, v in it.options.items() if statement_holds(v, scores, total))
            assert truth == it.answer and 2 <= len(truth) <= 3
        # the rationale ends with the option lines, each with the reference value the rationale gives for its
        # topic, the gold ones marked; an option agrees with its reference exactly when it is gold
        walk = it.analysis.split("为" + level(total) + "。", 1)[1]
        lines = walk.split("\n")[1:]
        assert [ln.split(".", 1)[0] for ln in lines] == list("ABCD")
        for ln in lines:
            k, rest = ln.split(".", 1)
            marked = ln.endswith(f"√选{k}")
            opt, ref = rest.removesuffix(f"√选{k}").split("，应为")
            assert opt == it.options[k] and marked == (k in it.answer) and ln.count("√") == marked
            if kind == "statements":
                said = opt[2:] if opt.startswith("属于") else re.search(r"\d分", opt).group()
                assert (said == ref) == (k in it.answer)
                expect = (level(total) if opt.startswith("属于") else f"{total}分" if opt.startswith("总分")
                          else f"{scores[0 if opt.startswith('病程') else 1]}分")
            else:
                assert (opt == ref) == (k in it.answer)
                expect = {"total": f"{total}分", "level": level(total), "social": f"{scores[2]}分"}[kind]
            assert ref == expect, (ln, it.analysis)
        assert len(set(it.options.values())) == 4 and list(it.options) == list("ABCD")
        assert it.qtype == ("multiple" if kind == "statements" else "single")


def test_gold_letters_balanced_per_type():
    train, test = make_splits(1, n_train=4000, n_test=400)
    for items in (train, test):
        for kind, group in group_by_type(items).items():
            counts = letter_counts(group)
            assert max(counts.values()) - min(counts.values()) <= 0.02 * len(group), (kind, counts)
            if kind != "statements":  # the correct option text lands in every place, not in a fixed one
                assert Counter(it.options["A"] == it.options[it.answer] for it in group)[True] == len(group) // 4


def test_challenge_question_never_asked_by_sft_types(splits):
    for it in splits[0] + splits[1]:
        if item_type_of(it) in SFT_TYPES:
            text = it.question + "".join(it.options.values())
            assert "社会功能" not in text and it.question != QUESTIONS["social"]
            assert "社会功能" in it.analysis  # ... but every SFT rationale spells the score out
        else:
            assert it.question == QUESTIONS["social"]


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
    # the PCEB scorer and prompt builder take the items as they are
    gold = {it.id: item_to_sft_messages(it)[1]["content"] for it in splits[1]}
    s = accuracy_summary(splits[1], gold)
    assert s["smcq_acc"] == 100.0 and s["mmcq_strict"] == 100.0 and s["missing"] == 0.0
    assert splits[1][0].case_text in build_prompt(splits[1][0])[1]["content"]


def test_type_helpers_and_balance(splits):
    train = splits[0]
    kinds = group_by_kind(train)
    assert {item_type_of(it) for it in kinds["challenge"]} == set(CHALLENGE_TYPES)
    assert len(kinds["sft_type"]) + len(kinds["challenge"]) == len(train)
    bare = Item(train[0].id, "case", "single", "q")
    assert item_type_of(bare) == item_type_of(train[0])
    with pytest.raises(ValueError):
        item_type_of(Item("x", "case", "single", "q"))
    # a pool biased towards D, as a probe model's failures were: balance() evens it out per (type, gold)
    biased = [it for it in train if "D" in it.answer] + [it for it in train if "D" not in it.answer][::5]
    pool = balance(biased, seed=0)
    cells = Counter((item_type_of(it), it.answer) for it in pool)
    assert len(cells) == 3 * 4 + 10 and len(set(cells.values())) == 1
    assert max(letter_counts(pool).values()) == min(letter_counts(pool).values())
    assert balance(biased, seed=0) == pool


@pytest.mark.parametrize("vocab", [512, 1024])
def test_token_lengths_within_budget(vocab, splits):
    tok = train_tokenizer(tokenizer_corpus(0, n=800), vocab_size=vocab)
    stats = token_lengths(splits[1], tok)
    assert stats["total_max"] < 220, stats
    if vocab == 1024:  # the task's phrases become one or two tokens; the embedded default's max_length is 160
        assert stats["total_max"] < 120, stats
        for phrase in list(DISTRESS_PHRASES) + list(SOCIAL_PHRASES):  # in context: after 。 or ，
            assert max(len(tok.encode(sep + phrase)) for sep in "。，") <= 2, phrase


def test_solved_needs_the_rationale_not_a_lucky_letter(splits):
    """Selection counts an item as solved only with the right answer *and* the rationale's option lines."""
    for it in splits[1][:40]:
        gold = item_to_sft_messages(it)[1]["content"]
        assert solved(it, gold) and len(option_lines(gold)) == 4
        lines = option_lines(gold)
        unmarked = gold.replace("√", "")  # the right letter, but no option judged: a guess
        assert not solved(it, unmarked)
        other = next(k for k in "ABCD" if k not in it.answer)
        assert not solved(it, gold.rsplit("</think>", 1)[0] + "</think>" + other)
        assert not solved(it, gold.replace(lines[0], lines[0].replace("应为", "应是")))
