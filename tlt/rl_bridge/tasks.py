"""Arithmetic word problems for the GRPO demo: generated from a seed, answered after a marker, rewarded 0/1.

The problems are one-step additions of numbers from 1 to 9 ("Ann has 7 coins and finds 5 more ..."):
easy enough that SmolLM2-135M-Instruct answers some of them right when sampling (measured at temperature
0.7, 128 new tokens: reward 0.29, and all 15 groups of 8 samples held both right and wrong answers), so
that GRPO has a signal in most groups and the reward can move within a few steps. Subtraction ("gives
away 4") was tried and dropped: the model got 3% of those right, leaving most groups without signal.

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
VERBS = ["gets", "finds", "buys", "is given"]

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
        who, what, verb = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(VERBS)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append(Problem(f"{who} has {a} {what} and {verb} {b} more. How many {what} does {who} have now?", a + b))
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
