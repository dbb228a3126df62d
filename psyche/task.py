"""The built-in task: procedurally generated counsellor-exam case items on Xu Youxin's neurosis scoring.

Xu Youxin's rule (许又新神经症评定法, taught in the Chinese counsellor exam) scores three things and adds them:

    course (病程)               < 3 months = 1, 3-12 months = 2, > 1 year = 3
    mental distress (精神痛苦)   mild 1, moderate 2, severe 3
    social function (社会功能)   mild 1, moderate 2, severe 3
    total 3 = 不够神经症, 4-5 = 可疑神经症, >= 6 = 神经症

Each item is a short PCEB-style case vignette (求助者，女，28岁，…) built from small phrase pools, with the
duration in varied surface forms (周, 个月, 半年, 年多, …) and the distress and social-function severities stated
by descriptive phrases from a fixed vocabulary (two phrases per level, so a ~1M-parameter model can learn them).
Items are `psyche.pceb.Item`s, category "case", so the PCEB scoring code and prompts apply unchanged.

Item types (`item_type_of`):
    total       SFT   单选 the total score (options are numbers)
    level       SFT   单选 the neurosis level
    statements  SFT   多选 which statements about the case hold (course / distress score, total, level; 2-3 true)
    social      challenge  单选 the social-function score on its own
Every rationale (`Item.analysis`) spells out all sub-scores in one fixed format, e.g.
"病程8个月，评2分；精神痛苦中度，评2分；社会功能严重受损，评3分；总分7分，为神经症。" So the social-function
score is in every SFT rationale but never asked as a question by an SFT type: GRPO, from the answer key alone, has
to learn to surface a skill the SFT model already has (the design that worked in the prototypes). The embedded
default (psyche/recipe.py) still puts a few challenge items (40 of ~1,500) into the seed SFT data: measured on this
task, a question type SFT never asks is answered with near-certainty as the nearest one it asks (the total), so
no sample shows the skill and GRPO has nothing to reinforce; seen rarely, it is answered right in some samples and
wrong in others, which GRPO sharpens into the greedy answer.

The rationale then goes through the options, one line each exactly as the prompt writes them, followed by what
the rationale says on that option's topic, and marks with √ the one(s) that agree, naming the letter chosen
("\nA.6分，应为7分\nB.7分，应为7分√选B").
What was measured on 2 cores (hidden 128, 4 layers, batch 16, lr 3e-3, SFT-type items): with the answer letter
right after the rationale, the letter stayed at chance past 2,000 steps while the sub-scores were right after 750;
with option lines marked √ but no stated reference, accuracy crept to ~0.6 by 1,750 steps (the √ needs an equality
test between an option and a number far back); with the reference written next to each option the comparison is
local, and accuracy jumps between 2,000 and 2,500 steps to total 0.95-1.0, level 0.85-0.93, statements 0.5-0.7
(3,000 steps). The lines are written like the prompt's option lines so that they tokenize to the same tokens.
The last hop, from the marked lines to the answer letters, was then the weak one (statements: the right lines
marked 0.93, answer letters equal to the marked lines 0.49); with "选B" after the mark the answer copies the
letters that follow 选, and letters equal to the marked lines rose to 0.96-1.0 for every type (2,000 steps).

Splits are disjoint by the case's *facts*: the triple (duration phrase, distress phrase, social phrase) that
decides every answer. Within each score triple the fact keys are ranked by a seeded hash and a `holdout` share
(at least one) goes to test, so a test vignette never states, in training, the same combination of decisive
phrases (fillers aside), while every score triple, and so every gold class, occurs in both splits.
Gold letters are balanced per item type: single-choice golds cycle A-D, multiple-choice golds cycle the ten
2- and 3-letter answer sets (each letter in 6 of 10).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from psyche.evaluate import extract_answer
from psyche.pceb import Item

LETTERS = "ABCD"
SFT_TYPES = ("total", "level", "statements")
CHALLENGE_TYPES = ("social",)
TYPES = SFT_TYPES + CHALLENGE_TYPES
INSTRUCTION = "先推理再作答。"  # the one fixed line of every prompt; the model is tiny, so no system prompt

# ---------------------------------------------------------------- vocabulary (surface form -> score)

COURSE_PHRASES = {  # never exactly 3 months or 1 year, where textbooks differ on the boundary
    "2周": 1, "3周": 1, "半个月": 1, "1个月": 1, "2个月": 1, "1个多月": 1,
    "4个月": 2, "5个月": 2, "半年": 2, "7个月": 2, "8个月": 2, "10个月": 2,
    "1年多": 3, "1年半": 3, "2年": 3, "两年多": 3, "3年": 3, "5年": 3,
}
DISTRESS_PHRASES = {
    "自觉苦恼，能自行调节": 1, "心里烦闷，能主动摆脱": 1,
    "痛苦明显，需他人开导才能缓解": 2, "自己摆脱不了，需借助他人帮助": 2,
    "痛苦不堪，他人安慰也无济于事": 3, "极度痛苦，完全无法摆脱": 3,
}
SOCIAL_PHRASES = {
    "工作效率略有下降": 1, "尚能照常上班": 1,
    "工作效率明显下降": 2, "不得不减少工作量": 2,
    "无法正常上班": 3, "已请病假在家": 3,
}
DISTRESS_WORD = {1: "轻度", 2: "中度", 3: "重度"}
SOCIAL_WORD = {1: "轻度", 2: "中度", 3: "严重"}
LEVELS = ("不够神经症", "可疑神经症", "神经症")
LEVEL_DISTRACTOR = "精神病性障碍"  # fourth option of the level question, never correct

# filler pools: no score-bearing words in them
JOBS = ("公司职员", "教师", "会计", "护士", "工程师", "销售员")
TRIGGERS = ("工作调动", "与同事争吵", "考试失利", "失恋", "家人生病")
SYMPTOMS = ("情绪低落、失眠", "紧张担心", "反复检查门锁", "心慌、坐立不安")
ONSETS = ("{d}前因{t}开始{s}。", "因{t}，近{d}来{s}。", "{t}后{s}，已持续{d}。")
FILLERS = ("", "性格内向。", "无躯体疾病。", "家族无精神病史。")

QUESTIONS = {
    "total": "单选：该求助者的总分为？",
    "level": "单选：该求助者的问题属于？",
    "statements": "多选：以下说法正确的是？",
    "social": "单选：该求助者的社会功能评分为？",
}
MULTI_GOLDS = ("AB", "AC", "AD", "BC", "BD", "CD", "ABC", "ABD", "ACD", "BCD")  # each letter in 6 of 10


def level_of(total: int) -> str:
    """The neurosis level of a total score: 3 不够神经症, 4-5 可疑神经症, >= 6 神经症."""
    return LEVELS[0] if total <= 3 else LEVELS[1] if total <= 5 else LEVELS[2]


def _by_score(vocab: dict) -> dict[int, list[str]]:
    out = defaultdict(list)
    for phrase, score in vocab.items():
        out[score].append(phrase)
    return dict(out)


# ---------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One vignette and the facts that decide its answers."""
    text: str
    duration: str
    distress: str
    social: str

    @property
    def scores(self) -> tuple[int, int, int]:
        return COURSE_PHRASES[self.duration], DISTRESS_PHRASES[self.distress], SOCIAL_PHRASES[self.social]

    @property
    def total(self) -> int:
        return sum(self.scores)

    @property
    def key(self) -> str:
        """The fact key the splits are disjoint on."""
        return f"{self.duration}|{self.distress}|{self.social}"


def rationale(case: Case) -> str:
    """The fixed-format reasoning every item of this case shares (what SFT trains on inside <think>)."""
    c, d, s = case.scores
    return (f"病程{case.duration}，评{c}分；精神痛苦{DISTRESS_WORD[d]}，评{d}分；社会功能{SOCIAL_WORD[s]}受损，"
            f"评{s}分；总分{case.total}分，为{level_of(case.total)}。")


def make_case(rng: random.Random, duration: str, distress: str, social: str) -> Case:
    """A vignette stating the given facts, with the person, onset wording, order and filler drawn from `rng`."""
    head = f"求助者，{rng.choice('男女')}，{rng.randint(18, 55)}岁，{rng.choice(JOBS)}。"
    onset = rng.choice(ONSETS).format(d=duration, t=rng.choice(TRIGGERS), s=rng.choice(SYMPTOMS))
    facts = [distress, social]
    rng.shuffle(facts)
    return Case(head + onset + "，".join(facts) + "。" + rng.choice(FILLERS), duration, distress, social)


def fact_keys(seed: int, holdout: float) -> dict[str, list[tuple[str, str, str]]]:
    """{"train": [...], "test": [...]} fact triples (duration, distress, social): within each score triple, the
    keys ranked by sha256(seed, key) and the first max(1, round(holdout * n)) go to test."""
    groups = defaultdict(list)
    for dur in COURSE_PHRASES:
        for dis in DISTRESS_PHRASES:
            for soc in SOCIAL_PHRASES:
                groups[(COURSE_PHRASES[dur], DISTRESS_PHRASES[dis], SOCIAL_PHRASES[soc])].append((dur, dis, soc))
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


def _statement(topic: str, case: Case, true: bool, rng: random.Random) -> str:
    """A statement about one topic of the case (never the social-function score: that is the challenge)."""
    c, d, _ = case.scores
    if topic in ("course", "distress"):
        value = c if topic == "course" else d
        value = value if true else rng.choice([v for v in (1, 2, 3) if v != value])
        return f"{'病程' if topic == 'course' else '精神痛苦'}评{value}分"
    if topic == "total":
        value = case.total if true else rng.choice([v for v in range(3, 10) if 0 < abs(v - case.total) <= 2])
        return f"总分为{value}分"
    lvl = level_of(case.total)
    return f"属于{lvl if true else rng.choice([v for v in LEVELS if v != lvl])}"


def option_walk(options: dict[str, str], gold: str, refs: dict[str, str]) -> str:
    """The options again, one per line as in the prompt, each followed by what the rationale says on the option's
    topic, the gold one(s) marked with √ and the letter chosen ("\nA.5分，应为3分\nB.3分，应为3分√选B")."""
    return "".join(f"\n{k}.{v}，应为{refs[k]}" + (f"√选{k}" if k in gold else "") for k, v in options.items())


def make_item(case: Case, item_type: str, gold: str, rng: random.Random, item_id: str) -> Item:
    """One item of `item_type` about `case`, its gold answer being the letters `gold`."""
    analysis = rationale(case)
    c, d, s = case.scores
    if item_type == "total":
        t = case.total
        # distractors may go below the smallest possible total (3): the option values then span 0-9, so the
        # option lines SFT copies include the digits the challenge type's options use (0-3)
        pool = [v for v in range(max(0, t - 4), min(9, t + 3) + 1) if v != t]
        options = _place(rng, f"{t}分", [f"{v}分" for v in rng.sample(pool, 3)], gold)
        refs = dict.fromkeys(LETTERS, f"{t}分")
    elif item_type == "level":
        lvl = level_of(case.total)
        options = _place(rng, lvl, [v for v in LEVELS if v != lvl] + [LEVEL_DISTRACTOR], gold)
        refs = dict.fromkeys(LETTERS, lvl)
    elif item_type == "social":
        options = _place(rng, f"{s}分", [f"{v}分" for v in (0, 1, 2, 3) if v != s], gold)
        refs = dict.fromkeys(LETTERS, f"{s}分")
    elif item_type == "statements":
        topics = ["course", "distress", "total", "level"]
        rng.shuffle(topics)
        options = {k: _statement(tp, case, k in gold, rng) for k, tp in zip(LETTERS, topics)}
        truth = {"course": f"{c}分", "distress": f"{d}分", "total": f"{case.total}分", "level": level_of(case.total)}
        refs = {k: truth[tp] for k, tp in zip(LETTERS, topics)}
    else:
        raise ValueError(f"unknown item type {item_type!r}; choose from {', '.join(TYPES)}")
    analysis += option_walk(options, gold, refs)
    return Item(item_id, "case", "multiple" if len(gold) > 1 else "single", QUESTIONS[item_type], options, gold,
                analysis, case_text=case.text, subject=item_type, ref=case.key)


def _golds(item_type: str, n: int, rng: random.Random) -> list[str]:
    """n gold answers cycling through every letter (or answer set) equally, the cycle order shuffled."""
    cycle = list(MULTI_GOLDS if item_type == "statements" else LETTERS)
    out = []
    while len(out) < n:
        rng.shuffle(cycle)
        out += cycle
    return out[:n]


def make_items(seed: int, n: int, split: str, keys: list[tuple[str, str, str]], types=TYPES) -> list[Item]:
    """n items (types in equal shares, the first types taking the remainder) on cases drawn from `keys`, shuffled.

    Fact triples are drawn so each type's target class is balanced: `level` cycles the three levels, `social` the
    three social scores; `total` and `statements` draw a triple uniformly. No (vignette, type) repeats."""
    rng = random.Random(f"psyche-task|{seed}|{split}")
    by_level, by_social = defaultdict(list), defaultdict(list)
    for k in keys:
        by_level[level_of(COURSE_PHRASES[k[0]] + DISTRESS_PHRASES[k[1]] + SOCIAL_PHRASES[k[2]])].append(k)
        by_social[SOCIAL_PHRASES[k[2]]].append(k)
    items, seen = [], set()
    for j, item_type in enumerate(types):
        count = n // len(types) + (j < n % len(types))
        for i, gold in enumerate(_golds(item_type, count, rng)):
            for _ in range(100):
                if item_type == "level":
                    key = rng.choice(by_level[LEVELS[i % 3]])
                elif item_type == "social":
                    key = rng.choice(by_social[1 + i % 3])
                else:
                    key = rng.choice(keys)
                case = make_case(rng, *key)
                if (case.text, item_type) not in seen:
                    break
            else:
                raise RuntimeError(f"{split}: cannot find a new {item_type} vignette; ask for fewer items")
            seen.add((case.text, item_type))
            items.append(make_item(case, item_type, gold, rng, f"task/{split}/{item_type}/{i:05d}"))
    rng.shuffle(items)
    return items


def make_splits(seed: int = 0, n_train: int = 4000, n_test: int = 400, train_types=TYPES, test_types=TYPES,
                holdout: float = 0.25) -> tuple[list[Item], list[Item]]:
    """Disjoint (train, test) item lists, deterministic for `seed`.

    The splits share no fact key (duration phrase, distress phrase, social phrase); see the module docstring.
    Both mix all types by default (the test set must hold SFT-type and challenge-type items); the pipeline picks
    its SFT and GRPO pools out of train."""
    keys = fact_keys(seed, holdout)
    return (make_items(seed, n_train, "train", keys["train"], train_types),
            make_items(seed, n_test, "test", keys["test"], test_types))


# ---------------------------------------------------------------- prompts and targets


def task_prompt(item: Item) -> list[dict]:
    """The chat prompt for SFT, GRPO and evaluation alike: one user turn, instruction + case + question + options."""
    opts = "\n".join(f"{k}.{v}" for k, v in item.options.items())
    return [{"role": "user", "content": f"{INSTRUCTION}\n{item.case_text}\n{item.question}\n{opts}"}]


def sft_target(item: Item) -> str:
    """The assistant reply SFT trains on: the rationale inside <think>…</think>, then the answer letters."""
    return f"<think>{item.analysis}</think>{item.answer}"


def item_to_sft_messages(item: Item) -> list[dict]:
    return task_prompt(item) + [{"role": "assistant", "content": sft_target(item)}]


# ---------------------------------------------------------------- reporting helpers


def item_type_of(item: Item) -> str:
    """The item's type (total / level / statements / social), from `subject`, else from its id."""
    if item.subject in TYPES:
        return item.subject
    part = item.id.split("/")
    if len(part) == 4 and part[0] == "task" and part[2] in TYPES:
        return part[2]
    raise ValueError(f"{item.id}: not a task item")


def is_challenge(item: Item) -> bool:
    return item_type_of(item) in CHALLENGE_TYPES


def option_lines(text: str) -> list[str]:
    """The option lines of a reply or rationale ("A.6分，应为7分", ...), in order: the part that shows how the
    answer was reached."""
    think = text.split("</think>")[0]
    return [ln.strip() for ln in think.split("\n") if len(ln) > 2 and ln[0] in LETTERS and ln[1] == "."]


def solved(item: Item, response: str) -> bool:
    """Right answer *for the right reason*: the extracted answer equals the gold one and the reply's option lines
    (each option, the reference value it is compared with, and the mark) equal the rationale's. A letter guessed
    right (1 in 4 for single choice) does not count, so a challenge item the selector cannot do does not leak into
    the SFT data by luck."""
    pred = extract_answer(response, item.qtype)
    return bool(pred) and set(pred) == set(item.answer) and option_lines(response) == option_lines(item.analysis)


def group_by_type(items: list[Item]) -> dict[str, list[Item]]:
    """Items by type, in TYPES order (types without items left out)."""
    groups = defaultdict(list)
    for it in items:
        groups[item_type_of(it)].append(it)
    return {t: groups[t] for t in TYPES if groups[t]}


def group_by_kind(items: list[Item]) -> dict[str, list[Item]]:
    """{"sft_type": [...], "challenge": [...]}: the two groups the report gives accuracy for."""
    return {"sft_type": [it for it in items if not is_challenge(it)],
            "challenge": [it for it in items if is_challenge(it)]}


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


# ---------------------------------------------------------------- tokenizer corpus and lengths


def tokenizer_corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """Texts for the task's byte-level BPE: the role line and content of n training-split prompts and replies.

    <think> and </think> are replaced by newlines (train_tokenizer adds them as whole tokens), so the BPE's merges
    go to the task's words. Only training-split facts are used."""
    train, _ = make_splits(seed, n_train=n, n_test=0)
    texts = []
    for it in train:
        texts.append("user\n" + task_prompt(it)[0]["content"])
        texts.append("assistant\n" + sft_target(it).replace("<think>", "\n").replace("</think>", "\n"))
    return texts


def token_lengths(items: list[Item], tokenizer) -> dict:
    """Token counts per item: prompt (ChatML, with the generation prompt) and target (reply + <|im_end|>)."""
    p = [len(tokenizer.encode_chat(task_prompt(it), add_generation_prompt=True)[0]) for it in items]
    t = [len(tokenizer.encode(sft_target(it))) + 1 for it in items]
    both = [a + b for a, b in zip(p, t)]
    return {"prompt_mean": sum(p) / len(p), "prompt_max": max(p), "target_mean": sum(t) / len(t),
            "target_max": max(t), "total_mean": sum(both) / len(both), "total_max": max(both)}


if __name__ == "__main__":  # python -m psyche.task: one item of each type and the token budget
    from psyche.tokenizer import train_tokenizer

    train, test = make_splits(0, n_train=400, n_test=400)
    for kind, group in group_by_type(train).items():
        print(f"--- {kind} ({group[0].qtype}, gold {group[0].answer})")
        for m in item_to_sft_messages(group[0]):
            print(f"[{m['role']}] {m['content']}")
    for vocab in (512, 1024):
        tok = train_tokenizer(tokenizer_corpus(0), vocab_size=vocab)
        stats = token_lengths(test, tok)
        print(f"vocab {vocab}: " + " | ".join(f"{k} {v:.1f}" for k, v in stats.items()))
