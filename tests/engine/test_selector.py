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
    assert [bucket_of(b) for b in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 17, 25, 33, 64, 65)] == [
        1, 1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 16, 24, 32, 48, 64, 96]


# Physics of the simulated engine: round time depends on the batch bucket and the arm; an arm's yield
# (tokens per sequence per round) does not depend on the batch and is random from round to round.
TIME = {(1, "off"): 0.030, (1, "s3k1n4"): 0.040, (1, "s4k2n8"): 0.060,
        (64, "off"): 0.080, (64, "s3k1n4"): 0.250, (64, "s4k2n8"): 0.500}
YIELDS = {"off": [1], "s3k1n4": [1, 1, 2, 3, 3], "s4k2n8": [1, 2, 2, 3, 3]}  # means 1, 2.0, 2.2


def _play(sel, batch_sizes, rounds, rng):
    """Run the selector against the simulated engine; count its choices."""
    picks: dict[str, int] = {}
    for i in range(rounds):
        bs = batch_sizes[i % len(batch_sizes)]
        arm = sel.choose(bs)
        name = arm_name(arm)
        picks[name] = picks.get(name, 0) + 1
        tokens = sum(rng.choice(YIELDS[name]) for _ in range(bs))
        sel.update(bs, arm, tokens, TIME[(bucket_of(bs), name)] * rng.uniform(0.9, 1.1))
    return picks


@pytest.mark.parametrize("policy", ["epsilon_greedy", "ucb"])
def test_learns_speculation_at_small_batch_and_plain_at_large(policy):
    # Goodput at batch 1: off 33, chain 50, tree 37 tok/s; at batch 64: off 800, chain 512, tree 282.
    import random

    sel = ArmSelector([CHAIN, TREE], SelectorConfig(policy=policy, epsilon=0.05), seed=0)
    rng = random.Random(0)
    small = _play(sel, [1], 300, rng)
    large = _play(sel, [64], 300, rng)
    assert small["s3k1n4"] > 240, small
    assert large["off"] > 240, large


def test_outliers_do_not_flip_the_choice():
    sel = ArmSelector([CHAIN], SelectorConfig(epsilon=0.0, window=9))
    for _ in range(9):
        sel.update(1, None, 1, 0.030)
        sel.update(1, CHAIN, 2, 0.040)
    for _ in range(4):  # four very slow chain rounds among nine: a mean time (0.29 s) would pick plain
        sel.update(1, CHAIN, 2, 0.6)
    assert sel.choose(1) == CHAIN


def test_yield_is_pooled_over_buckets_and_round_time_borrowed_from_a_neighbour():
    sel = ArmSelector([CHAIN], SelectorConfig(epsilon=0.0))
    for _ in range(2):
        sel.update(4, None, 4, 1.0)
        sel.update(4, CHAIN, 8, 1.2)  # yield 2 tokens per sequence, round 1.2x a plain one
        sel.update(8, None, 8, 1.5)  # only plain decoding timed at bucket 8
    assert sel.estimate(8, None) == pytest.approx(8 / 1.5)
    assert sel.estimate(8, CHAIN) == pytest.approx(8 * 2 / 1.8)  # time 1.5 x 1.2: the ratio carries over
    assert sel.choose(8) == CHAIN  # no exploration from scratch
    assert sel.estimate(1, None) == pytest.approx(1 / 1.0)  # nothing at bucket 1: the nearest round time


def test_unknown_arms_are_explored_first_and_disallowed_arms_never():
    sel = ArmSelector([CHAIN, TREE], SelectorConfig(epsilon=0.0))
    seen = set()
    for _ in range(6):
        arm = sel.choose(2, allowed=lambda a: a.num_draft_tokens <= 4)
        seen.add(arm_name(arm))
        sel.update(2, arm, 2, 1.0)
    assert seen == {"off", "s3k1n4"}


def test_discount_lets_fresh_yields_win_fast():
    sel = ArmSelector([CHAIN], SelectorConfig(epsilon=0.0, window=16))
    for _ in range(16):
        sel.update(1, None, 1, 0.030)
        sel.update(1, CHAIN, 3, 0.040)
    assert sel.choose(1) == CHAIN
    sel.discount_speculation(0.01)  # e.g. a new policy: the drafter's old yields count 1%
    sel.update(1, CHAIN, 1, 0.040)  # the chain now accepts nothing: slower than plain decoding
    sel.update(1, CHAIN, 1, 0.040)
    assert sel.choose(1) is None
    assert sel.estimate(1, None) == pytest.approx(1 / 0.030)  # plain decoding's knowledge is kept


def test_a_close_borrowed_arm_is_checked_locally_a_poor_one_is_not():
    sel = ArmSelector([CHAIN, TREE], SelectorConfig(epsilon=0.0, verify_ratio=0.7))
    for _ in range(2):
        sel.update(8, None, 8, 1.0)
        sel.update(8, CHAIN, 16, 2.5)  # 0.8x plain at batch 8: close
        sel.update(8, TREE, 16, 5.0)  # 0.4x: poor
        sel.update(1, None, 1, 0.8)
    assert sel.choose(1) == CHAIN  # borrowed 0.8x plain: worth checking at batch 1
    for _ in range(2):
        sel.update(1, CHAIN, 2, 1.0)  # and at batch 1 a chain round costs only 1.25x a plain one
    assert sel.choose(1) == CHAIN
    assert sel.count(1, TREE) == 0  # never tried here: too poor


def test_config_validation():
    with pytest.raises(ValueError):
        SelectorConfig(policy="thompson")
    with pytest.raises(ValueError):
        SelectorConfig(warmup=5, window=2)
    with pytest.raises(ValueError):
        SelectorConfig(expand_ratio=-1.0)


def test_speculation_is_first_tried_at_small_batches_then_grows_upwards():
    """Cold at 64 sequences: plain only, whatever epsilon says. Once a chain pays at batch 8, the tree
    (never measured) is warmed up at 16; where speculation lost below (here: at 8), not at 16 either."""
    sel = ArmSelector([CHAIN, TREE], SelectorConfig(epsilon=1.0, cold_bucket=8), seed=0)
    assert {arm_name(sel.choose(64)) for _ in range(20)} == {"off"}
    for _ in range(2):
        sel.update(8, None, 8, 0.05)
        sel.update(8, CHAIN, 16, 0.06)  # 1.67x plain's goodput at batch 8
    assert sel.choose(16) == TREE
    # The next rollout starts at 256 with plain decoding measured there and at 128: speculation, known to pay
    # at 8 only, is no candidate at 256 (its round time borrowed from 8 would look 1.2x plain's).
    sel.update(256, None, 256, 0.4)
    sel.update(128, None, 128, 0.2)
    assert {arm_name(sel.choose(256)) for _ in range(20)} == {"off"}
    # An arm measured at a larger batch is a candidate below it (trying it there is cheaper).
    gpu = ArmSelector([CHAIN], SelectorConfig(epsilon=0.0, cold_bucket=8), seed=0)
    gpu.update(256, None, 256, 0.4)
    gpu.update(256, CHAIN, 512, 0.5)  # pays at 256
    gpu.update(128, None, 128, 0.3)
    assert gpu.choose(128) == CHAIN
    losing = ArmSelector([CHAIN, TREE], SelectorConfig(epsilon=0.0, cold_bucket=8), seed=0)
    for _ in range(2):
        losing.update(8, None, 8, 0.05)
        losing.update(8, CHAIN, 8, 0.2)  # 0.25x plain at batch 8
        losing.update(16, None, 16, 0.06)
    assert {arm_name(losing.choose(16)) for _ in range(10)} == {"off"}
    assert losing.count(16, TREE) == 0
    # Close to plain at 8 (0.9x: within explore_floor, so still explored there) is not paying: not tried at 12.
    # (Neither would 1.05x be: expand_ratio asks for 1.1x, the gain shrinking as the batch grows.)
    close = ArmSelector([CHAIN, TREE], SelectorConfig(epsilon=1.0, cold_bucket=8), seed=0)
    for _ in range(2):
        close.update(8, None, 8, 0.05)
        close.update(8, CHAIN, 12, 0.0833)  # 144 tokens/s against plain's 160
        close.update(8, TREE, 12, 0.0833)
        close.update(12, None, 12, 0.06)
    assert {arm_name(close.choose(8)) for _ in range(30)} == {"off", "s3k1n4", "s4k2n8"}
    assert {arm_name(close.choose(12)) for _ in range(30)} == {"off"}
    close.update(8, CHAIN, 32, 0.05)  # more yield: mean 2.33 tokens per sequence, 1.4x plain at 8: 12 is tried
    assert "s3k1n4" in {arm_name(close.choose(12)) for _ in range(30)}


def test_hopeless_arms_are_not_explored_where_exploring_is_costly():
    """At a large batch a cheap speculative arm measures 0.3x plain: the costlier arms are never warmed up
    there, and epsilon never picks the hopeless one; from a cold start at batch 1 everything is tried."""
    # cold_bucket=64: warm-up allowed at 64 (as on a GPU where speculation can pay there)
    sel = ArmSelector([CHAIN, TREE], SelectorConfig(epsilon=1.0, cold_bucket=64), seed=0)
    picks = []
    for _ in range(50):
        arm = sel.choose(64)
        picks.append(arm_name(arm))
        sel.update(64, arm, 64 if arm is None else 128, 0.08 if arm is None else 0.5)
    assert picks[:2] == ["off", "s3k1n4"] and set(picks[2:]) == {"off"}, picks
    assert sel.count(64, TREE) == 0
    cold = ArmSelector([CHAIN, TREE], SelectorConfig(epsilon=1.0), seed=0)
    seen = set()
    for _ in range(20):
        arm = cold.choose(1)
        seen.add(arm_name(arm))
        cold.update(1, arm, 1 if arm is None else 2, 0.03 if arm is None else 0.04)
    assert seen == {"off", "s3k1n4", "s4k2n8"}
