"""The arm selector: learns the faster arm per batch bucket, borrows from neighbours, discounts on change."""

from __future__ import annotations

import pytest

from tlt.engine.spec.selector import ArmSelector, SelectorConfig, arm_name, bucket_of, parse_arm
from tlt.engine.spec.worker import SpecConfig

CHAIN = SpecConfig(3, 1, 4)
TREE = SpecConfig(4, 2, 8)


def test_parse_arm_and_names():
    assert parse_arm("off") is None and parse_arm(None) is None
    assert parse_arm("s3k1n4") == CHAIN == parse_arm((3, 1, 4))
    assert arm_name(parse_arm("s4k2n8")) == "s4k2n8" and arm_name(None) == "off"
    for bad in ("s3k1", "x3k1n4", "s3k1n99", (3, 1), "s0k1n2"):
        with pytest.raises(ValueError):
            parse_arm(bad)


def test_buckets():
    assert [bucket_of(b) for b in (1, 2, 3, 4, 5, 8, 9, 64, 65)] == [1, 2, 4, 4, 8, 8, 16, 64, 128]


def _play(sel, goodput, batch_sizes, rounds):
    """Feed the selector rewards from a fixed goodput table {(bucket, arm_name): tok/s}; count choices."""
    picks: dict[str, int] = {}
    for i in range(rounds):
        bs = batch_sizes[i % len(batch_sizes)]
        arm = sel.choose(bs)
        picks[arm_name(arm)] = picks.get(arm_name(arm), 0) + 1
        sel.update(bs, arm, tokens=int(goodput[(bucket_of(bs), arm_name(arm))]), seconds=1.0)
    return picks


@pytest.mark.parametrize("policy", ["epsilon_greedy", "ucb"])
def test_learns_speculation_at_small_batch_and_plain_at_large(policy):
    # Speculation doubles goodput at batch 1, halves it at batch 64 (the shape the engine sees).
    table = {(1, "off"): 30, (1, "s3k1n4"): 60, (1, "s4k2n8"): 45,
             (64, "off"): 800, (64, "s3k1n4"): 400, (64, "s4k2n8"): 300}
    sel = ArmSelector([CHAIN, TREE], SelectorConfig(policy=policy, epsilon=0.05), seed=0)
    small = _play(sel, table, [1], 200)
    large = _play(sel, table, [64], 200)
    assert small["s3k1n4"] > 150, small
    assert large["off"] > 150, large
    assert arm_name(sel.choose(1)) in ("s3k1n4", "s4k2n8", "off")


def test_outliers_do_not_flip_the_choice():
    sel = ArmSelector([CHAIN], SelectorConfig(epsilon=0.0, window=9))
    for _ in range(9):
        sel.update(1, None, 30, 1.0)
        sel.update(1, CHAIN, 50, 1.0)
    for _ in range(4):  # four very slow chain rounds among nine: the mean (28) would pick plain decoding
        sel.update(1, CHAIN, 1, 1.0)
    assert sel.choose(1) == CHAIN


def test_neighbour_bucket_gain_is_borrowed():
    sel = ArmSelector([CHAIN], SelectorConfig(epsilon=0.0))
    for _ in range(2):
        sel.update(4, None, 100, 1.0)
        sel.update(4, CHAIN, 150, 1.0)  # 1.5x at bucket 4
        sel.update(8, None, 180, 1.0)  # only plain decoding measured at bucket 8
    assert sel.estimate(8, CHAIN) == pytest.approx(270)  # 180 x 1.5: the gain carries over
    assert sel.choose(8) == CHAIN  # no exploration from scratch
    assert sel.estimate(1, None) == pytest.approx(25)  # nothing at bucket 1: scaled by batch size


def test_unknown_arms_are_explored_first_and_disallowed_arms_never():
    sel = ArmSelector([CHAIN, TREE], SelectorConfig(epsilon=0.0))
    seen = set()
    for _ in range(6):
        arm = sel.choose(2, allowed=lambda a: a.num_draft_tokens <= 4)
        seen.add(arm_name(arm))
        sel.update(2, arm, 10, 1.0)
    assert seen == {"off", "s3k1n4"}


def test_discount_lets_fresh_rewards_win_fast():
    sel = ArmSelector([CHAIN], SelectorConfig(epsilon=0.0, window=16))
    for _ in range(16):
        sel.update(1, None, 30, 1.0)
        sel.update(1, CHAIN, 60, 1.0)
    assert sel.choose(1) == CHAIN
    sel.discount_speculation(0.05)  # e.g. a new policy: the old chain rewards count 5%
    sel.update(1, CHAIN, 20, 1.0)  # the chain is now slower than plain decoding
    sel.update(1, CHAIN, 20, 1.0)
    assert sel.choose(1) is None
    assert sel.estimate(1, None) == 30  # plain decoding's knowledge is kept


def test_config_validation():
    with pytest.raises(ValueError):
        SelectorConfig(policy="thompson")
    with pytest.raises(ValueError):
        SelectorConfig(warmup=5, window=2)
