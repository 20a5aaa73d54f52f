"""The GRPO demo's task: seeded arithmetic word problems, the answer marker, the 0/1 reward."""

from __future__ import annotations

import re

from tlt.rl_bridge import tasks


def test_problems_are_a_function_of_the_seed():
    a, b, c = tasks.make_problems(50, 0), tasks.make_problems(50, 0), tasks.make_problems(50, 1)
    assert a == b
    assert a != c
    assert tasks.make_problems(10, 0) == a[:10]


def test_answers_are_right():
    for p in tasks.make_problems(200, 3):
        a, b = (int(x) for x in re.findall(r"\d+", p.question)[:2])
        assert p.answer == a + b and 1 <= a <= 9 and 1 <= b <= 9


def test_prompt_asks_for_the_marker(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    p = tasks.make_problems(1, 0)[0]
    text = tok.decode(tasks.prompt_ids(tok, p))
    assert p.question in text and f"'{tasks.MARKER} '" in text
    assert text.rstrip().endswith("assistant")  # the assistant turn is open


def test_extract_answer_rules():
    # The first number after the last marker.
    assert tasks.extract_answer("3 + 4 = 7. Answer: 7") == 7
    assert tasks.extract_answer("Answer: 5\nWait, no. Answer: 12 apples, not 13") == 12
    assert tasks.extract_answer("Answer: **9**") == 9
    assert tasks.extract_answer("Answer: -3") == -3
    assert tasks.extract_answer("Answer: 1,200") == 1200
    # Without a marker (or nothing numeric after it): the last number of the reply.
    assert tasks.extract_answer("She has 4 + 5 = 9 coins") == 9
    assert tasks.extract_answer("So 8 left. Answer: eight") == 8
    assert tasks.extract_answer("no numbers here") is None
    assert tasks.extract_answer("") is None


def test_reward():
    assert tasks.reward("5 + 2 = 7\nAnswer: 7", 7) == 1.0
    assert tasks.reward("Answer: 7.0", 7) == 1.0
    assert tasks.reward("Answer: 6", 7) == 0.0
    assert tasks.reward("Answer: 7", 6) == 0.0
    assert tasks.reward("The total is 7", 7) == 1.0
    assert tasks.reward("7 apples, then 2 more", 7) == 0.0  # the last number counts
    assert tasks.reward("I don't know", 7) == 0.0
