"""Every prompt of the data pipeline, in Chinese (the language of Psyche-R1's data) and English.

Templates are filled with `fill(template, name=value)`, which replaces `{name}` and nothing else, so JSON
examples and braces inside the filled text are safe. Each prompt states the output format its parser expects;
the parsers (regex / json only; model text is never executed) are named beside each prompt.

Challenge selection asks with Psyche-R1's own chat prompt (psyche.prompts, via psyche.pceb.build_prompt).
"""

from __future__ import annotations

import re

LANGS = ("zh", "en")

ZH = {
    # questions.py: generation -> parse_questions (a JSON array; see its docstring)
    "question_system": "你是一名资深的心理学教师，也是心理咨询师职业资格考试的命题专家。",
    "question_user": """请根据下面的心理学材料，编写{n}道选择题，用于考查对材料中心理学知识的理解。
要求：
1. 每道题有且只有 A、B、C、D 四个选项，选项内容互不相同；
2. 单选题只有一个正确答案；多选题有两个或两个以上正确答案，答案按字母顺序写，如 "ACD"；
3. 题目和答案必须能在材料中找到依据，不要编造材料中没有的事实；
4. 只输出一个 JSON 数组，不要输出其他任何内容，格式如下：
[{"question": "题干", "options": {"A": "……", "B": "……", "C": "……", "D": "……"}, "answer": "B", "analysis": "简要解析"}]

材料：
{passage}""",
    # questions.py: quality check -> parse_verdict (the last "结论：合格/不合格")
    "check_system": "你是一名严谨的心理学考试审题专家。",
    "check_user": """请审核下面这道根据材料编写的选择题。
审核标准：题干清楚、没有歧义；四个选项互不重复；标注的答案正确，并且能由材料支持；考查的是心理学知识。
先用一两句话说明理由，最后单独一行输出“结论：合格”或“结论：不合格”。

材料：
{passage}

题目：
{question}

标注答案：{answer}""",
    "verdict_pattern": r"结论\s*[:：]\s*(不合格|合格)",
    "verdict_pass": "合格",
    # rationales.py: the first rationale prompt (a system prompt that the iteration revises) and the user turn
    "rationale_prompt": ("你是一名心理学专家。请逐步分析下面的心理学选择题：说明题目涉及的心理学概念、理论和事实依据，"
                         "逐一分析每个选项，解释正确选项为什么正确、错误选项为什么错误，然后给出答案。"),
    "rationale_user": """{question}

请把推理过程写在<think>和</think>之间，然后在</think>之后写出答案（选项字母）。""",
    # rationales.py: prompt revision -> parse_prompt (the last <prompt>...</prompt>)
    "revise_system": "你是一名提示词优化专家，擅长改进让模型写出高质量心理学解题推理的指令。",
    "revise_user": """下面是一条让模型解答心理学选择题并写出推理过程的指令，以及模型按这条指令对一道题写出的推理过程。
请先指出这段推理的不足（例如：依据不充分、没有逐一分析选项、概念解释不准确、条理不清），再改写这条指令，使模型写出更准确、更充分、更有条理的推理。
要求：新指令是通用的，不能包含这道题的答案或选项字母；把新指令完整地写在<prompt>和</prompt>之间。

当前指令：
{prompt}

题目：
{question}

推理过程：
{rationale}""",
    # empathy.py: rewriting a counsellor's reply -> parse_reply (the last <reply>...</reply>)
    "empathy_system": "你是一名经验丰富、富有共情能力的心理咨询师。",
    "empathy_user": """下面是一段心理咨询对话和咨询师的一条回复。请在不改变原回复的专业内容和建议的前提下，把它改写得更有共情：
先理解和接纳来访者的感受，用温暖、尊重、不评判的语言回应，再自然地给出原回复中的信息或建议。不要编造新的事实，不要用列表。
把改写后的回复完整地写在<reply>和</reply>之间，不要输出其他内容。

对话：
{context}

原回复：
{reply}""",
    "client": "来访者",
    "counsellor": "咨询师",
}

EN = {
    "question_system": "You are a senior psychology teacher who writes questions for counsellor licensing exams.",
    "question_user": """Write {n} multiple-choice questions that test understanding of the psychology in the passage
below.
Rules:
1. Every question has exactly four options A, B, C, D, all different;
2. A single-answer question has one correct option; a multiple-answer one has two or more, written in letter
order, e.g. "ACD";
3. Questions and answers must be supported by the passage; do not invent facts it does not state;
4. Output one JSON array and nothing else, in this form:
[{"question": "...", "options": {"A": "...", "B": "...", "C": "...", "D": "..."}, "answer": "B", "analysis": "..."}]

Passage:
{passage}""",
    "check_system": "You are a meticulous reviewer of psychology exam questions.",
    "check_user": """Review this multiple-choice question written from the passage.
Criteria: the stem is clear and unambiguous; the four options are distinct; the marked answer is correct and supported
by the passage; it tests psychology knowledge.
Give your reasons in one or two sentences, then end with a line "Verdict: PASS" or "Verdict: FAIL".

Passage:
{passage}

Question:
{question}

Marked answer: {answer}""",
    "verdict_pattern": r"(?i)verdict\s*:\s*(pass|fail)",
    "verdict_pass": "pass",
    "rationale_prompt": ("You are a psychology expert. Analyse the multiple-choice question step by step: name the "
                         "psychological concepts, theories and facts involved, discuss every option, explain why the "
                         "correct options are correct and the others wrong, then give the answer."),
    "rationale_user": """{question}

Write your reasoning between <think> and </think>, then give the answer (option letters) after </think>.""",
    "revise_system": "You are an expert at improving instructions that make a model write high-quality reasoning "
                      "for psychology questions.",
    "revise_user": """Below is an instruction that makes a model answer a psychology multiple-choice question with its
reasoning, and the reasoning the model wrote for one question under it. Point out what the reasoning lacks (e.g.
weak evidence, options not discussed one by one, inaccurate concepts, poor structure), then rewrite the instruction
so the model writes more accurate, thorough and well-organised reasoning.
The new instruction must be general: no answer or option letter of this question. Write it in full between <prompt>
and </prompt>.

Current instruction:
{prompt}

Question:
{question}

Reasoning:
{rationale}""",
    "empathy_system": "You are an experienced, deeply empathetic psychological counsellor.",
    "empathy_user": """Below is a counselling dialogue and one reply of the counsellor. Rewrite the reply to be more
empathetic without changing its professional content or advice: first understand and accept the client's
feelings, answer with warm, respectful, non-judgemental language, then give the information or advice of the
original reply naturally. Do not invent new facts; do not use lists.
Write the rewritten reply in full between <reply> and </reply>, and nothing else.

Dialogue:
{context}

Original reply:
{reply}""",
    "client": "Client",
    "counsellor": "Counsellor",
}

PROMPTS = {"zh": ZH, "en": EN}


def get(lang: str, name: str) -> str:
    if lang not in PROMPTS:
        raise ValueError(f"unknown prompt language {lang!r}; choose one of {LANGS}")
    return PROMPTS[lang][name]


def fill(template: str, **fields) -> str:
    """Replace each `{name}` given; everything else (JSON braces, braces in the values) stays as it is."""
    return re.sub(r"\{(\w+)\}", lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template)
