"""Arithmetic word problems for the GRPO demo: generated from a seed, answered after a marker, rewarded 0/1.

The problems are one-step additions and subtractions of small numbers ("Ann has 7 coins and gets 5 more
..."): easy enough that SmolLM2-135M-Instruct answers some of them right when sampling (about one in five
at temperature 0.7, measured), so that a GRPO group usually holds both right and wrong answers and the
reward can move within a few steps.

Reward rule (`reward`): the model's final answer is the first number after the last `Answer:` marker when
a number follows it, else the last number in the reply; the reward is 1.0 when that number equals the
problem's answer, else 0.0. The fallback to the last number credits a right answer stated without the
marker, which a 135M model often does; a reply without any number gets 0.0.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

MARKER = "Answer:"

NAMES = ["Ann", "Bob", "Carla", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells", "stamps", "eggs"]

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    """One word problem: the question shown to the model and its integer answer."""

    question: str
    answer: int


def make_problems(n: int, seed: int) -> list[Problem]:
    """n problems, a pure function of (n, seed): the same seed gives the same problems."""
    rng = random.Random(f"tlt-arith-{seed}")
    out = []
    for _ in range(n):
        who, what = rng.choice(NAMES), rng.choice(ITEMS)
        if rng.random() < 0.5:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            q = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?"
            ans = a + b
        else:
            a = rng.randint(5, 15)
            b = rng.randint(1, a - 1)
            q = f"{who} has {a} {what} and gives away {b}. How many {what} does {who} have now?"
            ans = a - b
        out.append(Problem(q, ans))
    return out


def user_message(problem: Problem) -> str:
    """The user turn: the question and the instruction to end with the marker."""
    return f"{problem.question} End your reply with '{MARKER} ' followed by the number."


def prompt_ids(tokenizer, problem: Problem) -> list[int]:
    """The chat-templated prompt, tokenized (the assistant turn opened)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message(problem)}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text)


def _to_number(text: str) -> float:
    return float(text.replace(",", ""))


def extract_answer(text: str) -> float | None:
    """The final answer of a reply (see the module docstring), or None when the reply has no number."""
    pos = text.rfind(MARKER)
    if pos >= 0:
        m = _NUMBER.search(text, pos + len(MARKER))
        if m is not None:
            return _to_number(m.group())
    nums = _NUMBER.findall(text)
    return _to_number(nums[-1]) if nums else None


def reward(text: str, answer: int) -> float:
    """1.0 if the reply's final answer equals `answer`, else 0.0."""
    got = extract_answer(text)
    return 1.0 if got is not None and got == answer else 0.0
