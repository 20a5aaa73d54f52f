"""Prompts for offline drafter training, disjoint from the benchmark prompts (benchmarks/common.py)."""

from __future__ import annotations

import random

SUBJECTS = [
    "rainbows", "the heart", "glaciers", "chess", "the internet", "bread baking", "earthquakes", "owls",
    "the Great Wall of China", "solar panels", "the ocean tides", "democracy", "dinosaurs", "coffee",
    "gravity", "the human brain", "recycling", "Mars", "jazz music", "the Olympics", "rivers", "tigers",
    "the alphabet", "electricity", "friendship", "mountains", "the Renaissance", "computers", "clouds",
    "gardening", "money", "sleep", "pyramids", "snowflakes", "trains", "the periodic table", "whales",
    "time zones", "batteries", "languages",
]
TEMPLATES = [
    "What are {s}?", "Tell me about {s}.", "Why are {s} important?", "Give two fun facts about {s}.",
    "Summarize what you know about {s} in a few sentences.", "How would you explain {s} to a child?",
]


def arithmetic_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = ["Ann", "Bob", "Carla", "Dev", "Eli", "Fay"]
    items = ["apples", "books", "coins", "marbles", "pencils", "stickers"]
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        who, what = rng.choice(names), rng.choice(items)
        out.append(f"{who} has {a} {what} and gets {b} more, then gives away {c}. How many {what} does "
                   f"{who} have now? Think step by step.")
    return out


def training_prompts(n: int, seed: int = 0) -> list[str]:
    """n user messages: general questions and arithmetic word problems, shuffled deterministically."""
    general = [t.format(s=s) for s in SUBJECTS for t in TEMPLATES]
    pool = general + arithmetic_prompts(len(general) // 3, seed)
    random.Random(seed).shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]
