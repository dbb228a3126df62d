"""Format and accuracy rewards, and their composition."""

import pytest

from psyche.rewards import REGISTRY, RewardSet, accuracy_elastic_reward, accuracy_reward, format_reward, register

SINGLE = {"answer": "B", "qtype": "single"}
MULTI = {"answer": "ABD", "qtype": "multiple"}


@pytest.mark.parametrize("text,want", [
    ("<think>病程8个月，评2分。</think>B", 1.0),
    ("<think>reasoning</think>\nThe answer is B.<|im_end|>", 1.0),
    ("  <think>r</think> B", 1.0),
    ("<think></think>B", 0.0),  # empty reasoning
    ("<think>   </think>B", 0.0),
    ("<think>r</think>", 0.0),  # no answer
    ("<think>r</think>  \n", 0.0),
    ("B<think>r</think>B", 0.0),  # text before the think block
    ("<think>r</think>B<think>again</think>C", 0.0),  # two blocks
    ("<think>r<think>x</think>B", 0.0),  # nested
    ("<think>unclosed B", 0.0),
    ("B", 0.0),
])
def test_format_reward(text, want):
    assert format_reward("", text, None) == want


@pytest.mark.parametrize("text,item,strict,elastic", [
    ("<think>...</think>B", SINGLE, 1.0, 1.0),
    ("<think>选A还是B？</think>答案：C", SINGLE, 0.0, 0.0),  # letters inside reasoning do not count
    ("<think>x</think>", SINGLE, 0.0, 0.0),  # missing
    ("<think>x</think>ABD", MULTI, 1.0, 1.0),
    ("<think>x</think>A、B", MULTI, 0.0, 2 / 3),  # proper subset: partial credit
    ("<think>x</think>ABC", MULTI, 0.0, 0.0),  # a wrong letter: nothing
    ("<think>x</think>答案是D和B和A", MULTI, 1.0, 1.0),
])
def test_accuracy_rewards(text, item, strict, elastic):
    assert accuracy_reward("", text, item) == strict
    assert accuracy_elastic_reward("", text, item) == pytest.approx(elastic)


def test_qtype_inferred_from_gold_length():
    assert accuracy_reward("", "<think>x</think>AB", {"answer": "AB"}) == 1.0
    assert accuracy_reward("", "<think>x</think>A then B", {"answer": "B"}) == 1.0  # single: the last letter


def test_reward_set_weights_and_parts():
    rs = RewardSet({"format": 0.5, "accuracy": 1.0})
    total, parts = rs("", "<think>x</think>B", SINGLE)
    assert total == 1.5 and parts == {"format": 1.0, "accuracy": 1.0}
    total, parts = rs("", "B", SINGLE)
    assert total == 1.0 and parts == {"format": 0.0, "accuracy": 1.0}
    with pytest.raises(ValueError, match="unknown reward"):
        RewardSet({"lenght": 1.0})


def test_custom_reward_registration():
    @register("short")
    def short(prompt, completion, item):
        return 1.0 if len(completion) < 10 else 0.0

    try:
        assert RewardSet({"short": 2.0})("", "hi", None)[0] == 2.0
    finally:
        REGISTRY.pop("short")
