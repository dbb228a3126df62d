"""The built-in task: procedurally generated counsellor-exam case items, and the LLM teachers that explain them.

Each item is a short PCEB-style case vignette (求助者，女，28岁，…) scored with one rule of psyche/scales.py
(Xu Youxin's neurosis rating for the task; the practice scales for the base model's corpus), with the duration
in varied surface forms (周, 个月, 半年, 年多, …) and each severity stated by a phrase from a fixed vocabulary.
Items are `psyche.pceb.Item`s, category "case", so the PCEB scoring code and prompts apply unchanged.

Item types (`item_type_of`), every one asked of every scale:
    total       单选 the total score (options are numbers; one of them is the total minus one, the usual slip)
    level       单选 the level the total falls in
    statements  多选 which statements about the case hold (4 of: the three scores, the total, the level)
    score       单选 one of the three scores on its own

The reference rationale (`Item.analysis`) spells out the three scores, the total and the level in one fixed
format, then goes through the options one line each exactly as the prompt writes them, followed by what the
rationale says on that option's topic, marking with √ the one(s) that agree and naming the letter chosen:

    病程8个月，评2分；精神痛苦中度，评2分；社会功能严重受损，评3分；总分7分，为神经症。
    A.6分，应为7分
    B.7分，应为7分√选B

Teachers. Psyche-R1's SFT rationales were written by LLMs and kept when their final answer matched the key;
its GRPO questions are the ones that several LLMs all answered wrong. Here `Teacher` stands in for those LLMs
with one systematic, realistic confusion: a course of 3-12 months scored as if it were under 3 months (病程 1
point instead of 2) in a share `confusion` of its rationales (0.7 by default: the teachers' most likely reading).
Where the slip does not change the answer (a level question whose total stays in the same band, a question on
another score) the rationale passes the answer filter with its wrong line in it, as LLM rationales do (right
answer, wrong reasoning). Where it does change the answer, every teacher answering at temperature 0 gets the
item wrong: those are the challenge items (`is_challenge`). So the SFT data shows the right course score for
3-12 months in about 30% of its rationales and the wrong one in 70%, and never an item where the difference
matters: a model trained on it samples the right reading with some probability and answers greedily with the
wrong one, and more SFT only fits the teachers' mixture better. The answer key, which GRPO optimises, prefers
the right reading on every challenge item.

Splits are disjoint by the case's *facts*: the triple (duration phrase, first severity phrase, second severity
phrase) that decides every answer. Within each score triple the fact keys are ranked by a seeded hash and a
`holdout` share (at least one) goes to test, so a test vignette never states, in training, the same combination
of decisive phrases (fillers aside), while every score triple occurs in both splits.
Gold letters are balanced per item type: single-choice golds cycle A-D, multiple-choice golds cycle the ten
2- and 3-letter answer sets (each letter in 6 of 10).

Where GRPO's reward comes from: not from `grade` here, which only judges replies step by step for the learning
curves and the report. psyche/recipe.py writes the GRPO prompts with their answer keys (data/grpo.jsonl) and
sets grpo.rewards = ["format", "accuracy"] with weights [0.1, 1.0]; those are the registered functions of
psyche/rewards.py (the <think>...</think> format, and the extracted letters against the key), which
psyche/grpo/loop.py calls on every completion.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from psyche.pceb import Item
from psyche.scales import DURATIONS, SCALES, XU, Scale

LETTERS = "ABCD"
TYPES = ("total", "level", "statements", "score")
INSTRUCTION = "先推理再作答。"  # the one fixed line of every prompt; the model is tiny, so no system prompt
TOPICS = ("course", "dim1", "dim2", "total", "level")  # what an option line is about

# filler pools: no score-bearing words in them
JOBS = ("公司职员", "教师", "会计", "护士", "工程师", "销售员")
TRIGGERS = ("工作调动", "与同事争吵", "考试失利", "失恋", "家人生病", "搬家")
SYMPTOMS = ("情绪低落、失眠", "紧张担心", "反复检查门锁", "心慌、坐立不安", "食欲下降")
ONSETS = ("{d}前因{t}开始{s}。", "因{t}，近{d}来{s}。", "{t}后{s}，已持续{d}。")
FILLERS = ("", "性格内向。", "无躯体疾病。", "家族无精神病史。")
MULTI_GOLDS = ("AB", "AC", "AD", "BC", "BD", "CD", "ABC", "ABD", "ACD", "BCD")  # each letter in 6 of 10


def question(scale: Scale, item_type: str, dim: int = 0) -> str:
    """The question line; `dim` (0 course, 1, 2 the severities) for the score type."""
    ask = {"total": "单选：按{n}，该求助者的总分为？", "level": "单选：按{n}，该求助者的问题属于？",
           "statements": "多选：按{n}，以下说法正确的是？", "score": "单选：按{n}，该求助者的{d}评分为？"}
    return ask[item_type].format(n=scale.name, d=scale.labels[dim])


# ---------------------------------------------------------------- cases and readings


@dataclass(frozen=True)
class Case:
    """One vignette and the facts that decide its answers."""
    scale: Scale
    text: str
    duration: str
    phrase1: str
    phrase2: str

    @property
    def scores(self) -> tuple[int, int, int]:
        s = self.scale
        return s.course_score(self.duration), s.dims[0].phrases[self.phrase1], s.dims[1].phrases[self.phrase2]

    @property
    def key(self) -> str:
        """The fact key the splits are disjoint on."""
        return f"{self.duration}|{self.phrase1}|{self.phrase2}"


def slip(scores: tuple[int, int, int]) -> tuple[int, int, int]:
    """The teachers' confusion: a course in the middle bin (3-12 months for Xu) scored as the lowest."""
    c, a, b = scores
    return (1 if c == 2 else c), a, b


def make_case(scale: Scale, rng: random.Random, duration: str, phrase1: str, phrase2: str) -> Case:
    """A vignette stating the given facts, with the person, onset wording, order and filler drawn from `rng`."""
    head = f"求助者，{rng.choice('男女')}，{rng.randint(16, 55)}岁，{rng.choice(JOBS)}。"
    onset = rng.choice(ONSETS).format(d=duration, t=rng.choice(TRIGGERS), s=rng.choice(SYMPTOMS))
    facts = [phrase1, phrase2]
    rng.shuffle(facts)
    return Case(scale, head + onset + "，".join(facts) + "。" + rng.choice(FILLERS), duration, phrase1, phrase2)


def case_of(item: Item) -> Case:
    """The case an item was made from (its scale from the id, its facts from `ref`)."""
    duration, p1, p2 = item.ref.split("|")
    return Case(scale_of(item), item.case_text, duration, p1, p2)


def scale_of(item: Item) -> Scale:
    key = item.id.split("/")[0]
    if key not in SCALES:
        raise ValueError(f"{item.id}: not a task item (ids start with one of {', '.join(SCALES)})")
    return SCALES[key]


def rationale(case: Case, reading: tuple[int, int, int]) -> str:
    """The scoring line of a rationale that reads the case's scores as `reading` (course, severity 1, 2)."""
    s = case.scale
    c, a, b = reading
    total = c + a + b
    d1, d2 = s.dims
    return (f"病程{case.duration}，评{c}分；{d1.label}{d1.words[a - 1]}{d1.suffix}，评{a}分；"
            f"{d2.label}{d2.words[b - 1]}{d2.suffix}，评{b}分；总分{total}分，为{s.level_of(total)}。")


def fact_keys(scale: Scale, seed: int, holdout: float) -> dict[str, list[tuple[str, str, str]]]:
    """{"train": [...], "test": [...]} fact triples (duration, phrase 1, phrase 2): within each score triple, the
    keys ranked by sha256(seed, key) and the first max(1, round(holdout * n)) go to test."""
    d1, d2 = scale.dims
    groups = defaultdict(list)
    for dur in DURATIONS:
        for p1 in d1.phrases:
            for p2 in d2.phrases:
                groups[(scale.course_score(dur), d1.phrases[p1], d2.phrases[p2])].append((dur, p1, p2))
    out = {"train": [], "test": []}
    for scores in sorted(groups):
        keys = sorted(groups[scores], key=lambda k: hashlib.sha256(f"{seed}|{'|'.join(k)}".encode()).hexdigest())
        n_test = max(1, round(holdout * len(keys)))
        out["test"] += keys[:n_test]
        out["train"] += keys[n_test:]
    return out


# ---------------------------------------------------------------- items


def _place(rng: random.Random, correct: str, distractors: list[str], gold: str) -> dict[str, str]:
    """Options A-D with `correct` at letter `gold` and the distractors shuffled into the other places."""
    rest = list(distractors)
    rng.shuffle(rest)
    rest.insert(LETTERS.index(gold), correct)
    return dict(zip(LETTERS, rest))


def _statement(scale: Scale, topic: str, value) -> str:
    if topic == "total":
        return f"总分为{value}分"
    if topic == "level":
        return f"属于{value}"
    return f"{scale.labels[TOPICS.index(topic)]}评{value}分"


def _truth(scale: Scale, reading: tuple[int, int, int]) -> dict[str, str]:
    """What a rationale reading the scores as `reading` says on each topic, as option values are written."""
    total = sum(reading)
    return {"course": f"{reading[0]}分", "dim1": f"{reading[1]}分", "dim2": f"{reading[2]}分",
            "total": f"{total}分", "level": scale.level_of(total)}


STATEMENT = re.compile(r"^(?:(?P<label>\S+?)评(?P<score>\d)分|总分为(?P<total>\d)分|属于(?P<level>\S+))$")


def option_topics(item: Item) -> dict[str, str]:
    """Letter -> the topic its option is about (TOPICS), read from the item's question and option texts."""
    scale, kind = scale_of(item), item_type_of(item)
    if kind in ("total", "level"):
        return dict.fromkeys(item.options, kind)
    if kind == "score":
        (dim,) = [i for i, lab in enumerate(scale.labels) if f"的{lab}评分" in item.question]
        return dict.fromkeys(item.options, TOPICS[dim])
    out = {}
    for k, text in item.options.items():
        m = STATEMENT.match(text)
        out[k] = ("total" if m["total"] else "level" if m["level"] else TOPICS[scale.labels.index(m["label"])])
    return out


def _option_value(text: str, topic: str, kind: str) -> str:
    """The value an option states on its topic, written as `_truth` writes it ("3分", "神经症")."""
    if kind != "statements":
        return text
    m = STATEMENT.match(text)
    return m["level"] if topic == "level" else f"{m['total'] or m['score']}分"


def explain(item: Item, reading: tuple[int, int, int]) -> tuple[str, str]:
    """(rationale, answer letters) of a reasoner that reads the item's case as `reading`: the scoring line,
    then each option with the rationale's value for its topic, the agreeing ones marked √ and named."""
    case, kind = case_of(item), item_type_of(item)
    truth, topics = _truth(case.scale, reading), option_topics(item)
    lines, marked = [], ""
    for k, text in item.options.items():
        ref = truth[topics[k]]
        agree = _option_value(text, topics[k], kind) == ref
        marked += k if agree else ""
        lines.append(f"\n{k}.{text}，应为{ref}" + (f"√选{k}" if agree else ""))
    return rationale(case, reading) + "".join(lines), marked


def make_item(case: Case, item_type: str, gold: str, rng: random.Random, item_id: str, dim: int = 0) -> Item:
    """One item of `item_type` about `case`, its gold answer being the letters `gold` (`dim`: the score type's
    score, 0 course, 1-2 the severities). `analysis` is the reference rationale (the right reading)."""
    scale, scores = case.scale, case.scores
    truth = _truth(scale, scores)
    if item_type == "total":
        t = sum(scores)
        # the total minus one (a slip in one score) is always a distractor, as exam writers aim distractors at
        # the usual mistakes; the other two come from a few points around
        pool = [v for v in range(max(0, t - 4), min(9, t + 3) + 1) if v not in (t, t - 1)]
        options = _place(rng, f"{t}分", [f"{t - 1}分"] + [f"{v}分" for v in rng.sample(pool, 2)], gold)
    elif item_type == "level":
        lvl = truth["level"]
        fourth = rng.choice([v for v in scale.level_distractors if v not in scale.levels])
        options = _place(rng, lvl, [v for v in scale.levels if v != lvl] + [fourth], gold)
    elif item_type == "score":
        s = scores[dim]
        options = _place(rng, f"{s}分", [f"{v}分" for v in (0, 1, 2, 3) if v != s], gold)
    elif item_type == "statements":
        topics = rng.sample(TOPICS, 4)
        options = {}
        for k, tp in zip(LETTERS, topics):
            if k in gold:
                value = truth[tp].removesuffix("分")
            elif tp == "total":
                t = sum(scores)
                value = rng.choice([v for v in range(3, 10) if 0 < abs(v - t) <= 2])
            elif tp == "level":
                value = rng.choice([v for v in scale.levels if v != truth["level"]])
            else:
                value = rng.choice([v for v in (1, 2, 3) if v != scores[TOPICS.index(tp)]])
            options[k] = _statement(scale, tp, value)
    else:
        raise ValueError(f"unknown item type {item_type!r}; choose from {', '.join(TYPES)}")
    item = Item(item_id, "case", "multiple" if len(gold) > 1 else "single", question(scale, item_type, dim), options,
                gold, "", case_text=case.text, subject=item_type, ref=case.key)
    item.analysis, marked = explain(item, scores)
    assert marked == gold, (item_id, marked, gold)
    return item


def _golds(item_type: str, n: int, rng: random.Random) -> list[str]:
    """n gold answers cycling through every letter (or answer set) equally, the cycle order shuffled."""
    cycle = list(MULTI_GOLDS if item_type == "statements" else LETTERS)
    out = []
    while len(out) < n:
        rng.shuffle(cycle)
        out += cycle
    return out[:n]


def make_items(scale: Scale, seed: int, n: int, split: str, keys: list[tuple[str, str, str]], types=TYPES) -> list[Item]:
    """n items (types in equal shares, the first types taking the remainder) on cases drawn from `keys`, shuffled.

    Fact triples are drawn so each type's target class is balanced: `level` cycles the three levels, `score` the
    nine (score asked, value) pairs; `total` and `statements` draw a triple uniformly. No (vignette, type, score
    asked) repeats."""
    rng = random.Random(f"psyche-task|{scale.key}|{seed}|{split}")
    by_level, by_score = defaultdict(list), defaultdict(list)
    for k in keys:
        case = Case(scale, "", *k)
        by_level[scale.level_of(sum(case.scores))].append(k)
        for dim, s in enumerate(case.scores):
            by_score[(dim, s)].append(k)
    items, seen = [], set()
    for j, item_type in enumerate(types):
        count = n // len(types) + (j < n % len(types))
        for i, gold in enumerate(_golds(item_type, count, rng)):
            dim = (i // 3) % 3 if item_type == "score" else 0
            for _ in range(100):
                if item_type == "level":
                    key = rng.choice(by_level[scale.levels[i % 3]])
                elif item_type == "score":
                    key = rng.choice(by_score[(dim, 1 + i % 3)])
                else:
                    key = rng.choice(keys)
                case = make_case(scale, rng, *key)
                if (case.text, item_type, dim) not in seen:
                    break
            else:
                raise RuntimeError(f"{split}: cannot find a new {item_type} vignette; ask for fewer items")
            seen.add((case.text, item_type, dim))
            items.append(make_item(case, item_type, gold, rng, f"{scale.key}/{split}/{item_type}/{i:05d}", dim))
    rng.shuffle(items)
    return items


def make_splits(seed: int = 0, n_train: int = 4000, n_test: int = 400, scale: Scale = XU, holdout: float = 0.25,
                types=TYPES) -> tuple[list[Item], list[Item]]:
    """Disjoint (train, test) item lists of `scale`, deterministic for `seed`; the splits share no fact key."""
    keys = fact_keys(scale, seed, holdout)
    return (make_items(scale, seed, n_train, "train", keys["train"], types),
            make_items(scale, seed, n_test, "test", keys["test"], types))


# ---------------------------------------------------------------- teachers and challenge items


@dataclass(frozen=True)
class Teacher:
    """An LLM teacher that writes rationales with one confusion (`slip`) in a share `confusion` of them."""
    confusion: float = 0.7

    def write(self, item: Item, rng: random.Random) -> tuple[str, str]:
        """A sampled rationale and the answer it reaches (the slip with probability `confusion`)."""
        scores = case_of(item).scores
        return explain(item, slip(scores) if rng.random() < self.confusion else scores)

    def greedy(self, item: Item) -> str:
        """The answer at temperature 0: the teacher's most likely reading."""
        scores = case_of(item).scores
        return explain(item, slip(scores) if self.confusion > 0.5 else scores)[1]


def is_challenge(item: Item) -> bool:
    """The slip changes the answer: teachers answering with their most likely reading get it wrong."""
    scores = case_of(item).scores
    return explain(item, slip(scores))[1] != item.answer


def slip_applies(item: Item) -> bool:
    """The case's course is in the middle bin, where the teachers' reading can slip."""
    return case_of(item).scores[0] == 2


COURSE_LINE = re.compile(r"病程[^，；\n]*，评(\d)分")


def course_read(response: str) -> int | None:
    """The course score a reply writes in its scoring line (None when it writes none)."""
    m = COURSE_LINE.search(response)
    return int(m[1]) if m else None


SCORING_LINE = re.compile(r"病程(?P<dur>[^，；\n]*)，评(?P<c>\d)分；[^，；\n]*，评(?P<a>\d)分；[^，；\n]*，评(?P<b>\d)分；"
                          r"总分(?P<t>\d+)分，为(?P<level>[^。\n]*)。")
SKILLS = ("course", "dim1", "dim2", "sum", "level", "lines", "letters", "correct")


def grade(item: Item, response: str) -> dict[str, bool]:
    """Which steps of the procedure a reply gets right (SKILLS): the three scores it writes against the case's
    (course, dim1, dim2), its total against its own scores (sum), its level against its own total (level), its
    option lines against the lines its own reading gives (lines), its answer against the options it marks
    (letters), and the answer against the key (correct). Each step is judged on the reply's own earlier steps,
    so an early slip is counted once, where it happens."""
    from psyche.evaluate import exact, extract_answer

    out = dict.fromkeys(SKILLS, False)
    pred = extract_answer(response, item.qtype)
    out["correct"] = exact(pred, item.answer)
    m = SCORING_LINE.search(response.split("</think>")[0])
    if not m:
        return out
    scale, truth = scale_of(item), case_of(item).scores
    reading = (int(m["c"]), int(m["a"]), int(m["b"]))
    out.update(course=reading[0] == truth[0], dim1=reading[1] == truth[1], dim2=reading[2] == truth[2],
               sum=int(m["t"]) == sum(reading), level=m["level"] == scale.level_of(int(m["t"])))
    if all(1 <= r <= 3 for r in reading):
        out["lines"] = option_lines(response) == option_lines(explain(item, reading)[0])
    marks = "".join(sorted(set(re.findall(r"√选([A-D])", response.split("</think>")[0]))))
    out["letters"] = bool(marks) and set(pred) == set(marks)
    return out


def skill_grades(model, tokenizer, items: list[Item], *, max_new_tokens: int = 64, batch_size: int = 200,
                 temperature: float = 0.0, seed: int = 0) -> list[dict[str, bool]]:
    """Replies of `model` to `items` (greedy by default), each graded step by step (`grade`)."""
    from psyche.sampler import SamplingParams, generate_texts

    prompts = [tokenizer.encode_chat(task_prompt(it), add_generation_prompt=True)[0] for it in items]
    replies = generate_texts(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             sampling=SamplingParams(temperature), seed=seed)
    return [grade(it, r) for it, r in zip(items, replies)]


def rates(grades: list[dict[str, bool]]) -> dict[str, float]:
    """The fraction of graded replies that get each step right."""
    return {k: sum(g[k] for g in grades) / max(1, len(grades)) for k in SKILLS}


def skill_rates(model, tokenizer, items: list[Item], **kw) -> dict[str, float]:
    """The fraction of `items` whose reply (skill_grades) gets each step of the procedure right (SKILLS)."""
    return rates(skill_grades(model, tokenizer, items, **kw))


def option_lines(text: str) -> list[str]:
    """The option lines of a reply or rationale ("A.6分，应为7分", ...), in order."""
    think = text.split("</think>")[0]
    return [ln.strip() for ln in think.split("\n") if len(ln) > 2 and ln[0] in LETTERS and ln[1] == "."]


# ---------------------------------------------------------------- prompts and targets


def task_prompt(item: Item) -> list[dict]:
    """The chat prompt for SFT, GRPO and evaluation alike: one user turn, instruction + case + question + options."""
    opts = "\n".join(f"{k}.{v}" for k, v in item.options.items())
    return [{"role": "user", "content": f"{INSTRUCTION}\n{item.case_text}\n{item.question}\n{opts}"}]


def sft_target(item: Item, analysis: str | None = None) -> str:
    """The assistant reply SFT trains on: a rationale inside <think>…</think> (the item's own reference one, or
    a teacher's), then the answer letters."""
    return f"<think>{item.analysis if analysis is None else analysis}</think>{item.answer}"


def item_to_sft_messages(item: Item, analysis: str | None = None) -> list[dict]:
    return task_prompt(item) + [{"role": "assistant", "content": sft_target(item, analysis)}]


# ---------------------------------------------------------------- reporting helpers


def item_type_of(item: Item) -> str:
    """The item's type (total / level / statements / score), from `subject`, else from its id."""
    if item.subject in TYPES:
        return item.subject
    part = item.id.split("/")
    if len(part) == 4 and part[0] in SCALES and part[2] in TYPES:
        return part[2]
    raise ValueError(f"{item.id}: not a task item")


def group_by_type(items: list[Item]) -> dict[str, list[Item]]:
    """Items by type, in TYPES order (types without items left out)."""
    groups = defaultdict(list)
    for it in items:
        groups[item_type_of(it)].append(it)
    return {t: groups[t] for t in TYPES if groups[t]}


def balance(items: list[Item], seed: int = 0, n_per_cell: int | None = None) -> list[Item]:
    """Equal counts per (item type, gold answer) cell: each cell cut to the smallest cell's size (or `n_per_cell`),
    keeping a seeded random choice; the result shuffled. For a challenge pool selected from model failures, which
    otherwise inherits the failing model's letter bias."""
    cells = defaultdict(list)
    for it in items:
        cells[(item_type_of(it), it.answer)].append(it)
    k = min(len(v) for v in cells.values()) if n_per_cell is None else n_per_cell
    rng = random.Random(f"balance|{seed}")
    out = []
    for cell in sorted(cells):
        out += rng.sample(cells[cell], min(k, len(cells[cell])))
    rng.shuffle(out)
    return out


def letter_counts(items: list[Item]) -> Counter:
    """How often each letter is (part of) a gold answer."""
    return Counter(c for it in items for c in it.answer)


if __name__ == "__main__":  # python -m psyche.task: one item of each type, the challenge share
    train, test = make_splits(0, n_train=2000, n_test=400)
    for kind, group in group_by_type(train).items():
        it = next(i for i in group if slip_applies(i))
        print(f"--- {kind} ({it.qtype}, gold {it.answer}, challenge {is_challenge(it)})")
        for m in item_to_sft_messages(it):
            print(f"[{m['role']}] {m['content']}")
        print("[teacher's slip]", explain(it, slip(case_of(it).scores)))
    for kind, group in group_by_type(train).items():
        print(kind, f"challenge {sum(map(is_challenge, group)) / len(group):.2f}",
              f"slip applies {sum(map(slip_applies, group)) / len(group):.2f}")
