"""Which speculative configuration (or none) to run for the next decode round: a bandit per batch size.

Speculation pays when few sequences run (the forward pass is latency-bound and verifying N tokens costs
about as much as one) and costs when many run (verification multiplies compute that is already the
bottleneck). Where the crossover lies depends on the hardware, the batch, and how good the drafter is
*right now*. So the engine learns it online:

- An **arm** is a `SpecConfig` (draft depth, branching, tokens verified) or `None` (plain decoding).
  Every arm is exact, so exploring never costs losslessness, only time.
- The **reward** is goodput: tokens emitted per second over the whole round — catch-up, draft, verify,
  sampling — so speculation is charged its full cost.
- Estimates live per **batch-size bucket** (powers of two) as the median of a window of recent rewards,
  robust to the odd slow round (a page fault, a new tensor shape, a noisy neighbour).
- **Neighbouring buckets share knowledge**: an arm not yet measured in a bucket is estimated from the
  nearest bucket where it was, as a gain relative to plain decoding there (gains transfer across batch
  sizes far better than absolute tokens/s). A rarely seen batch size is thus not explored from scratch.
- A **new drafter or new policy weights** make what was learned about speculative arms partly stale: the
  weight of their past rewards is multiplied by a discount (plain decoding's are kept; its speed depends
  on neither), so fresh rounds soon outweigh them, while a policy that moved little keeps its knowledge.
  A collapse of acceptance is not left to the bandit: the engine suspends speculation itself.
- Policies: epsilon-greedy (TLT's choice; the default) and UCB1 over rewards normalised per bucket.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tlt.engine.spec.worker import SpecConfig

Arm = SpecConfig | None


def arm_name(arm: Arm) -> str:
    return "off" if arm is None else f"s{arm.num_steps}k{arm.topk}n{arm.num_draft_tokens}"


def parse_arm(spec: str | Iterable[int] | SpecConfig | None) -> Arm:
    """'off' / None, 's3k1n4', (3, 1, 4) or a SpecConfig -> an arm (validated)."""
    if spec is None or isinstance(spec, SpecConfig):
        arm = spec
    elif isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("off", "none", "0"):
            return None
        try:
            steps, rest = s[1:].split("k")
            topk, nd = rest.split("n")
            if not s.startswith("s"):
                raise ValueError
            arm = SpecConfig(int(steps), int(topk), int(nd))
        except ValueError:
            raise ValueError(f"arm {spec!r}: expected 'off' or 's<steps>k<topk>n<draft tokens>', e.g. s3k1n4") from None
    else:
        vals = list(spec)
        if len(vals) != 3:
            raise ValueError(f"arm {spec!r}: expected (num_steps, topk, num_draft_tokens)")
        arm = SpecConfig(*(int(v) for v in vals))
    if arm is not None:
        most = 1 + arm.topk + (arm.num_steps - 1) * arm.topk * arm.topk
        if arm.num_steps < 1 or arm.topk < 1 or not 2 <= arm.num_draft_tokens <= most:
            raise ValueError(f"arm {arm_name(arm)}: needs steps >= 1, topk >= 1, 2 <= draft tokens <= {most}")
    return arm


# Chains of growing depth and two small trees: a spread of (cost, gain) points; "off" is always added.
DEFAULT_ARMS = ("s1k1n2", "s2k1n3", "s3k1n4", "s4k2n8", "s5k4n16")


@dataclass
class SelectorConfig:
    policy: str = "epsilon_greedy"  # or "ucb"
    epsilon: float = 0.1  # epsilon-greedy: chance of a random allowed arm
    ucb_c: float = 0.5  # UCB1 exploration weight, on rewards normalised by the bucket's best estimate
    window: int = 16  # rewards kept per (bucket, arm); the estimate is their median
    warmup: int = 2  # rounds an arm needs in a bucket before its own estimate replaces a borrowed one
    max_bucket: int = 1 << 16

    def __post_init__(self) -> None:
        if self.policy not in ("epsilon_greedy", "ucb"):
            raise ValueError(f"selector policy must be epsilon_greedy or ucb, got {self.policy!r}")
        if not 0 <= self.epsilon <= 1:
            raise ValueError("selector epsilon must be in [0, 1]")
        if self.window < 1 or self.warmup < 1 or self.warmup > self.window:
            raise ValueError("selector needs 1 <= warmup <= window")


def bucket_of(batch_size: int) -> int:
    """Power-of-two bucket: 1, 2, 3-4 -> 4, 5-8 -> 8, ..."""
    return 1 << max(batch_size - 1, 0).bit_length()


class ArmSelector:
    """Epsilon-greedy or UCB over arms, per batch-size bucket, rewarded by measured goodput."""

    def __init__(self, arms: Iterable[Arm], config: SelectorConfig | None = None, seed: int = 0):
        arms = list(dict.fromkeys(arms))  # de-duplicated, order kept
        if None not in arms:
            arms.insert(0, None)
        self.arms: list[Arm] = arms
        self.cfg = config or SelectorConfig()
        self.rng = random.Random(seed)
        self._obs: dict[tuple[int, Arm], deque[list[float]]] = {}  # [goodput, weight] pairs

    # ------------------------------------------------------------------ learning
    def update(self, batch_size: int, arm: Arm, tokens: int, seconds: float) -> None:
        """Record one round: `tokens` emitted by `batch_size` sequences in `seconds` (wall clock)."""
        if seconds <= 0:
            return
        b = bucket_of(batch_size)
        key = (b, arm)
        if key not in self._obs:
            self._obs[key] = deque(maxlen=self.cfg.window)
        self._obs[key].append([tokens / seconds, 1.0])

    def discount_speculation(self, factor: float) -> None:
        """A new drafter or policy: past rewards of speculative arms count `factor` as much."""
        for (_, arm), obs in self._obs.items():
            if arm is not None:
                for o in obs:
                    o[1] *= factor

    def count(self, bucket: int, arm: Arm) -> float:
        """Weight of the evidence for an arm in a bucket (one per fresh round)."""
        return sum(w for _, w in self._obs.get((bucket, arm), ()))

    def _own(self, bucket: int, arm: Arm) -> float | None:
        obs = self._obs.get((bucket, arm))
        if not obs or len(obs) < self.cfg.warmup:
            return None
        return _weighted_median(obs)

    def estimate(self, batch_size: int, arm: Arm) -> float | None:
        """Expected goodput (tokens/s) of `arm` at this batch size: measured here, else borrowed."""
        b = bucket_of(batch_size)
        own = self._own(b, arm)
        if own is not None:
            return own
        base_here = self._own(b, None)
        # The nearest bucket (by log distance, smaller first on ties) where the arm was measured.
        for nb in sorted({k[0] for k in self._obs if k[1] == arm and k[0] != b},
                         key=lambda x: (abs(math.log2(x) - math.log2(b)), x)):
            there = self._own(nb, arm)
            if there is None:
                continue
            base_there = self._own(nb, None)
            if arm is not None and base_here is not None and base_there:
                return base_here * there / base_there  # the arm's gain over plain decoding carries over
            return there * b / nb  # no baseline on both sides: goodput scales with the batch, roughly
        return None

    # ------------------------------------------------------------------ choosing
    def choose(self, batch_size: int, allowed: Callable[[Arm], bool] | None = None) -> Arm:
        """The arm for the next round. `allowed(arm)` excludes arms that do not fit this batch."""
        arms = [a for a in self.arms if a is None or allowed is None or allowed(a)]
        if len(arms) == 1:
            return arms[0]
        est = {a: self.estimate(batch_size, a) for a in arms}
        unknown = [a for a in arms if est[a] is None]
        if unknown:  # warm-up: every arm gets measured once (here or in a neighbouring bucket)
            return unknown[0]
        b = bucket_of(batch_size)
        if self.cfg.policy == "ucb":
            best = max(est.values())
            n_total = sum(self.count(b, a) for a in arms) + 1

            def ucb(a: Arm) -> float:
                n = self.count(b, a)
                bonus = self.cfg.ucb_c * math.sqrt(math.log(n_total) / n) if n else float("inf")
                return est[a] / best + bonus

            return max(arms, key=ucb)
        if self.rng.random() < self.cfg.epsilon:
            return self.rng.choice(arms)
        return max(arms, key=lambda a: est[a])

    def snapshot(self) -> dict:
        """Current estimates per bucket and arm (tokens/s, number of rewards in the window)."""
        out: dict[str, dict] = {}
        for (b, arm), obs in sorted(self._obs.items(), key=lambda kv: (kv[0][0], arm_name(kv[0][1]))):
            out.setdefault(str(b), {})[arm_name(arm)] = {"goodput": round(_weighted_median(obs), 2),
                                                         "n": len(obs)}
        return out


def _weighted_median(obs: Iterable[list[float]]) -> float:
    """The value where the cumulative weight (values sorted) first reaches half the total."""
    pairs = sorted(obs)
    half = sum(w for _, w in pairs) / 2
    acc = 0.0
    for v, w in pairs:
        acc += w
        if acc >= half:
            return v
    return pairs[-1][0]
