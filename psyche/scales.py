"""Scoring rules of the built-in exam items: Xu Youxin's neurosis rating (the task) and four practice scales.

Every rule has the same shape, which is also the shape of its items' rationales:

    course (病程)    the duration stated in the case, in months, cut into three bins: 1 / 2 / 3 points
    two severities  each stated by a descriptive phrase from a fixed vocabulary (two phrases per level): 1 / 2 / 3
    total           the sum, 3-9; two cut points give one of three levels

Xu Youxin's rule (许又新神经症评定法, taught in the Chinese counsellor exam) is the task that SFT and GRPO train on:

    course (病程)               < 3 months = 1, 3-12 months = 2, > 1 year = 3
    mental distress (精神痛苦)   mild 1, moderate 2, severe 3
    social function (社会功能)   mild 1, moderate 2, severe 3
    total 3 = 不够神经症, 4-5 = 可疑神经症, >= 6 = 神经症

The practice scales (`PRACTICE_SCALES`) are made up for the base model's corpus (psyche/base.py): other
symptoms, other phrases, other course cut points, other level thresholds and names. Two of them rate
severities under the task's names (精神痛苦, 社会功能) from other phrases, and one (a made-up neurosis screen)
ends in the task's three level names at other thresholds: the base model knows the field's words, in right and
wrong answers, as an LLM does, and not Xu Youxin's phrases, cut points or thresholds. A model pretrained on them
reads a case, scores it, adds, compares options and answers by letter, but does not know Xu Youxin's rule:
the situation of an instruction-tuned LLM that has seen many exams but not this rule. Nothing clinical is
claimed for them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Duration phrases and their length in months. No phrase lies on a cut point of any scale below, where the
# bin would be ambiguous (textbooks differ on whether exactly 3 months or 1 year is in or out).
DURATIONS = {
    "2周": 0.5, "3周": 0.7, "半个月": 0.5, "1个月": 1.0, "1个多月": 1.5, "2个月": 2.0,
    "4个月": 4.0, "5个月": 5.0, "半年": 6.0, "7个月": 7.0, "8个月": 8.0, "10个月": 10.0,
    "1年多": 15.0, "1年半": 18.0, "2年": 24.0, "两年多": 27.0, "3年": 36.0, "5年": 60.0,
}


@dataclass(frozen=True)
class Dimension:
    """A severity rated 1-3 from the phrase the case uses: `label` + `words[score - 1]` + `suffix` in the
    rationale ("社会功能" "严重" "受损")."""
    label: str
    phrases: dict  # phrase -> score (two phrases per score)
    words: tuple[str, str, str]
    suffix: str = ""


@dataclass(frozen=True)
class Scale:
    key: str  # the first part of its items' ids ("xu/train/total/00012")
    name: str  # as the question names it: "按{name}，…"
    course_cuts: tuple[float, float]  # months: below the first = 1, up to the second = 2, above = 3
    dims: tuple[Dimension, Dimension]
    levels: tuple[str, str, str]
    level_cuts: tuple[int, int]  # total <= first -> levels[0], <= second -> levels[1], else levels[2]
    level_distractors: tuple[str, ...]  # the fourth option of a level question is one of these, never correct

    def course_score(self, duration: str) -> int:
        m = DURATIONS[duration]
        return 1 if m < self.course_cuts[0] else 2 if m <= self.course_cuts[1] else 3

    def level_of(self, total: int) -> str:
        a, b = self.level_cuts
        return self.levels[0] if total <= a else self.levels[1] if total <= b else self.levels[2]

    @property
    def labels(self) -> tuple[str, str, str]:
        return ("病程", self.dims[0].label, self.dims[1].label)


XU = Scale(
    key="xu",
    name="许又新神经症评定法",
    course_cuts=(3, 12),
    dims=(Dimension("精神痛苦", {"自觉苦恼，能自行调节": 1, "心里烦闷，能主动摆脱": 1,
                                 "痛苦明显，需他人开导才能缓解": 2, "自己摆脱不了，需借助他人帮助": 2,
                                 "痛苦不堪，他人安慰也无济于事": 3, "极度痛苦，完全无法摆脱": 3},
                    ("轻度", "中度", "重度")),
          Dimension("社会功能", {"工作效率略有下降": 1, "尚能照常上班": 1,
                                 "工作效率明显下降": 2, "不得不减少工作量": 2,
                                 "无法正常上班": 3, "已请病假在家": 3},
                    ("轻度", "中度", "严重"), "受损")),
    levels=("不够神经症", "可疑神经症", "神经症"),
    level_cuts=(3, 5),
    level_distractors=("精神病性障碍",),
)

# Diagnoses that the practice scales' level questions offer as their never-correct fourth option.
DIAGNOSES = ("神经症", "可疑神经症", "不够神经症", "精神病性障碍", "惊恐障碍", "人格障碍", "适应障碍")

PRACTICE_SCALES = (
    Scale(
        key="sleep",
        name="睡眠问题评定",
        course_cuts=(0.8, 6.5),
        dims=(Dimension("入睡困难", {"偶尔入睡稍慢": 1, "半小时内能入睡": 1,
                                     "常需一小时以上才能入睡": 2, "每周有几晚难以入睡": 2,
                                     "几乎每晚彻夜难眠": 3, "需服药才能勉强入睡": 3},
                        ("轻度", "中度", "重度")),
              Dimension("日间精神", {"白天精神尚可": 1, "午后略感疲乏": 1,
                                     "白天常打瞌睡": 2, "上课时注意力难以集中": 2,
                                     "白天无法坚持学习": 3, "整日昏沉无力": 3},
                        ("轻度", "中度", "严重"), "受影响")),
        levels=("睡眠尚可", "轻度睡眠问题", "严重睡眠问题"),
        level_cuts=(4, 6),
        level_distractors=DIAGNOSES,
    ),
    Scale(
        key="screen",
        name="神经症简易筛查",
        course_cuts=(1.2, 9),
        dims=(Dimension("精神痛苦", {"偶有紧张": 1, "略感不安": 1,
                                     "经常紧张不安": 2, "常因小事担心": 2,
                                     "终日惶恐不安": 3, "紧张到彻夜难眠": 3},
                        ("轻度", "中度", "重度")),
              Dimension("躯体症状", {"偶有手心出汗": 1, "略感胃部不适": 1,
                                     "经常头痛、恶心": 2, "常感心慌胸闷": 2,
                                     "频繁呕吐": 3, "曾因心慌晕倒": 3},
                        ("轻微", "中等", "明显"))),
        levels=("不够神经症", "可疑神经症", "神经症"),  # the task's level names, other thresholds
        level_cuts=(4, 6),
        level_distractors=DIAGNOSES,
    ),
    Scale(
        key="net",
        name="网络使用评定",
        course_cuts=(4.5, 21),
        dims=(Dimension("上网时间", {"每天上网不到1小时": 1, "只在周末上网": 1,
                                     "每天上网三四个小时": 2, "常上网到深夜": 2,
                                     "每天上网十小时以上": 3, "通宵上网不睡觉": 3},
                        ("较短", "较长", "过长")),
              Dimension("家庭冲突", {"偶尔与父母拌嘴": 1, "家人略有不满": 1,
                                     "常因上网与父母争吵": 2, "父母多次没收手机": 2,
                                     "与父母发生肢体冲突": 3, "离家出走两次": 3},
                        ("轻微", "较多", "激烈"))),
        levels=("正常使用", "过度使用", "网络成瘾"),
        level_cuts=(5, 7),
        level_distractors=DIAGNOSES,
    ),
    Scale(
        key="grief",
        name="哀伤反应评定",
        course_cuts=(2.5, 30),
        dims=(Dimension("悲伤程度", {"想起亲人时略感难过": 1, "偶尔独自流泪": 1,
                                     "常常以泪洗面": 2, "一提到亲人就哭泣": 2,
                                     "终日沉浸在悲痛中": 3, "悲痛欲绝，不吃不喝": 3},
                        ("轻度", "中度", "重度")),
              Dimension("社会功能", {"家务尚能料理": 1, "能按时吃饭睡觉": 1,
                                     "家务常常顾不上": 2, "饮食起居不规律": 2,
                                     "生活需他人照顾": 3, "多日不洗漱不进食": 3},
                        ("轻度", "中度", "严重"), "受损")),
        levels=("正常哀伤", "复杂性哀伤倾向", "延长哀伤"),
        level_cuts=(4, 7),
        level_distractors=DIAGNOSES,
    ),
)

SCALES = {s.key: s for s in (XU, *PRACTICE_SCALES)}
