"""tlt/engine/detokenize.py: stop strings found on the tail window, including multi-byte characters that
byte-level BPE splits over several tokens; texts with and without special tokens."""

from __future__ import annotations

import pytest

from tlt.engine.detokenize import Detokenizer


@pytest.fixture(scope="module")
def detok(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    return Detokenizer(AutoTokenizer.from_pretrained(smol_tokenizer_dir))


@pytest.mark.parametrize("stop", ["end", "\n\n", "é", "日本語", "😀", "😀😀", "a😀b😀"])
def test_a_stop_string_completed_by_the_newest_token_is_found(detok, stop):
    ids = detok.encode("Some words before it, then " + stop)
    assert detok.decode(ids).endswith(stop)
    assert detok.matched_stop(ids, ["never-there", stop], max(len(s) for s in ["never-there", stop])) == stop
    # and not one token earlier, unless the last token adds nothing to it
    assert detok.matched_stop(ids[:-1], [stop], len(stop)) is None or detok.decode(ids[:-1]).endswith(stop)


def test_emoji_pairs_span_more_tokens_than_characters(detok):
    """The case a character-counted window misses: 2 characters, 6 tokens."""
    ids = detok.encode("x😀😀")
    assert len(ids) - len(detok.encode("x")) > len("😀😀") + 3
    assert detok.matched_stop(ids, ["😀😀"], 2) == "😀😀"


def test_a_stop_string_across_token_boundaries(detok):
    ids = detok.encode("hello world and more")
    text = detok.decode(ids)
    stop = text[-9:]  # spans several tokens
    assert detok.matched_stop(ids, [stop], len(stop)) == stop
    assert detok.matched_stop(ids, ["world  and", "more."], 10) is None


def test_decode_and_token_texts(detok):
    ids = detok.encode("Hi") + [2]  # 2: <|im_end|>, a special token
    assert detok.decode(ids, skip_special_tokens=True) == "Hi"
    assert detok.decode(ids, skip_special_tokens=False) == "Hi<|im_end|>"
    assert detok.token_texts(ids) == [detok.tokenizer.decode([i]) for i in ids]
    assert detok.encode("") == []  # no BOS added by this tokenizer: an empty prompt stays empty
