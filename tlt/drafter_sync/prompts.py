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
    # More subjects: the drafter learns the target's style, and 40 subjects made it memorise them.
    "penguins", "the Amazon rainforest", "windmills", "lighthouses", "the violin", "origami", "submarines",
    "bees' dances", "the Sahara desert", "maple syrup", "the Moon's phases", "bridges", "kites", "castles",
    "the postal service", "libraries", "thunderstorms", "volleyball", "telescopes", "magnets", "octopuses",
    "the compass", "cheese making", "hot air balloons", "elephants", "deserts", "the calendar", "rice farming",
    "the first airplanes", "museums", "robots", "fireworks", "the Nile", "carpentry", "sharks", "umbrellas",
    "the metric system", "ancient Greece", "the Silk Road", "butterflies", "mushrooms", "lakes", "tornadoes",
    "the guitar", "soap", "bicycles in cities", "the telephone", "satellites", "frogs", "wolves", "tea ceremonies",
    "the Arctic", "sailing", "knitting", "pizza", "the piano", "volunteering", "maps", "comets", "ants",
    "the human skeleton", "rain", "wind energy", "board games", "the camera", "spiders", "the Vikings",
    "composting", "deep sea fish", "birds' migration", "the Eiffel Tower", "chocolate", "glass making",
    "the Amazon river", "ice cream", "saving money", "public speaking", "learning to swim", "camping",
    "the solar system", "memory", "habits", "teamwork", "cooking pasta", "first aid", "the seasons",
    "bamboo", "parrots", "hedgehogs", "the Industrial Revolution", "paper", "salt", "sunflowers", "dolphins",
    "rock climbing", "marathons", "yoga", "the bicycle helmet", "typewriters", "clocks", "canals", "islands",
    "caves", "fossils", "the desert tortoise", "recycling plastic", "wildfires", "beavers", "sound waves",
    "light", "rainforests", "weather forecasts", "the wheel", "the ballet", "poetry", "theatre", "movies",
    "the radio", "email", "passwords", "spreadsheets", "video games", "social media", "electric guitars",
]
TEMPLATES = [
    "What are {s}?", "Tell me about {s}.", "Why are {s} important?", "Give two fun facts about {s}.",
    "Summarize what you know about {s} in a few sentences.", "How would you explain {s} to a child?",
    "Write a short poem about {s}.", "What is a common misconception about {s}?", "Compare {s} and {t}.",
    "Write a paragraph for a school report on {s}.", "What would the world be like without {s}?",
    "Give me three questions a curious student might ask about {s}, and answer them.",
    "Write a friendly note to a friend describing {s}.", "What are the pros and cons of {s}?",
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
    other = SUBJECTS[7:] + SUBJECTS[:7]  # "{t}": a second subject for the comparison template
    general = [t.format(s=s, t=o) for s, o in zip(SUBJECTS, other) for t in TEMPLATES]
    pool = general + arithmetic_prompts(len(general) // 3, seed)
    random.Random(seed).shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def self_instruct_prompts(engine, n: int, seed: int = 0, log=print, max_tokens: int = 64,
                          batch: int = 256) -> list[str]:
    """`n` distinct user messages written by the target itself (as in Magpie): it samples the user turn
    that follows its chat template's user header, so the messages follow the distribution it was tuned on,
    far more varied than any template list. Kept: messages it ended itself, of at least 16 characters."""
    tok = engine.tokenizer
    marker = "\x00tlt-user\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=False)
    header = tok.encode(text[: text.index(marker)])
    seen: set[str] = set()
    out: list[str] = []
    drawn = 0
    while len(out) < n:
        if drawn > 20 * n + 1000:
            raise RuntimeError(f"the model wrote only {len(out)} usable distinct user messages of {n} wanted")
        sp = [{"temperature": 1.0, "top_p": 0.95, "max_new_tokens": max_tokens,
               "sampling_seed": seed * 1_000_003 + drawn + i} for i in range(batch)]
        for o in engine.generate(input_ids=[header] * batch, sampling_params=sp):
            msg = o["text"].strip()
            if o["meta_info"]["finish_reason"]["type"] == "stop" and len(msg) >= 16 and msg not in seen:
                seen.add(msg)
                out.append(msg)
        drawn += batch
        log(f"  self-written user messages: {min(len(out), n)}/{n} ({drawn} drawn)")
    return out[:n]
