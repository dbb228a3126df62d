"""Prompts of the Psyche-R1 recipe, in one place (the wording of Psyche-R1's released scripts)."""

PSYCHE_SYSTEM = (
    "你是一名心理学专家。请回答以下心理学案例题目，请逐步思考，仔细分析给定的心理学案例，首先给出你的推理过程，"
    "以及得出该推理结论的详细解释和事实理由，解释你是从什么事实中得出结论的，然后给出答案。"
    "注意，推理过程需要包含在 <think> 和 </think> 之间。"
)
PSYCHE_USER_PREFIX = "你必须在<think>和</think>标签内给出你的推理过程，然后，在</think>标签后给出最终的答案。\n\n以下是我的问题：\n"
PSYCHE_TEMPERATURE, PSYCHE_TOP_P = 0.7, 0.9
