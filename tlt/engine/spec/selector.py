"""Which speculative configuration (or none) to run for the next decode round: a bandit per batch size.

Speculation pays when few sequences run (the forward pass is latency-bound and verifying N tokens costs
about as much as one) and costs when many run (verification multiplies compute that is already the
bottleneck). Where the crossover lies depends on the hardware, the batch, and how good the drafter is
*right now*. So the engine learns it online:

- An **arm** is a `SpecConfig` (draft depth, branching, tokens verified) or `None` (plain decoding).
  Every arm is exact, so exploring never costs losslessness, only time.
- The **reward** is goodput: tokens emitted per second over the whole round — catch-up, draft, verify,
  sampling — so speculation is charged its full cost. It is learned as two factors (see `ArmSelector`):
  an arm's *yield* (tokens per sequence per round: noisy, but the same at every batch size, so pooled
  over all rounds of the arm) and its *round time* per **batch-size bucket** (half octaves: 1, 2, 3, 4, 6, 8,
  12, 16, 24, ...; steady, kept as the median of a window, robust to the odd slow round).
- **Neighbouring buckets share knowledge**: an arm not yet timed in a bucket gets its round time from the
  nearest bucket where it was, as a ratio to plain decoding's there. A rarely seen batch size is thus
  not explored from scratch; a borrowed estimate close to the best is checked locally.
- A **new drafter or new policy weights** make what was learned about speculative arms' yields partly
  stale: their weight is multiplied by a discount (round times are kept; they depend on neither), so
  fresh rounds soon outweigh them, while a policy that moved little keeps its knowledge.
  A collapse of acceptance is not left to the bandit: the engine suspends speculation itself.
- **Speculation is first tried where it is cheap**: an arm not measured at this batch bucket is tried here
  only at a batch of at most `cold_bucket` sequences, above the nearest smaller bucket where speculation
  paid (`expand_ratio`), or if it was measured at a larger batch; otherwise it is not a candidate here at all (its round
  time, borrowed from a much smaller batch, would be far too rosy). A
  speculative round at a large batch costs several plain ones (measured: one chain round at 256 sequences
  took 3.7 s, nine plain rounds), and speculation that loses at a small batch loses at a larger one. So a
  rollout that starts at 256 sequences decodes plain until its batch has shrunk, and the range where
  speculation is tried grows bucket by bucket as it keeps paying.
- Policies: epsilon-greedy (TLT's choice; the default) and UCB1 over rewards normalised per bucket,
  both exploring only arms within `explore_floor` of the best.
"""

from __future__ import annotations

import math
import random
import statistics
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
    window: int = 16  # round times kept per (bucket, arm), their median used; yields: 4x as many per arm
    warmup: int = 1  # rounds an arm needs in a bucket before its own round time replaces a borrowed one
    # An arm known only from a neighbouring bucket is still measured here when its borrowed estimate is
    # within this fraction of the best: speculation's gain grows as the batch shrinks, so a gain borrowed
    # from a larger batch understates it, and a few rounds of checking are cheap.
    verify_ratio: float = 0.7
    # Exploration (epsilon's random picks, UCB's bonus, warm-up of unmeasured arms) only among arms whose
    # estimate is within this fraction of the best: at a large batch a speculative round can cost several
    # plain ones, and re-checking a hopeless arm there is the costliest thing a selector can do (measured:
    # 10% epsilon over all arms made a 256-sequence rollout 35% slower than plain decoding).
    explore_floor: float = 0.7
    # Largest bucket where a speculative arm is warmed up with no evidence from smaller batches.
    cold_bucket: int = 8
    # Above cold_bucket, speculation is tried at a bucket only where it paid at the nearest smaller bucket measured:
    # a speculative arm's goodput there at least this multiple of plain decoding's. Its gain shrinks as the batch
    # grows (tlt bench spec, arithmetic, greedy: 1.53x at 4, 1.20x at 8, 1.03x at 16 sequences: x0.78-0.86 per
    # octave, ~0.9 per half-octave bucket), so speculation that only broke even below loses here; and the round
    # times the selector learns leave out the drafter's catch-up of the tokens of earlier plain rounds, which
    # each switch from plain to speculative pays (measured in a GRPO rollout at 32 sequences: 50-60 ms per chain
    # round, 12-24 ms of it catch-up, against 25 ms plain). Within 1.1x of plain below: not tried here.
    expand_ratio: float = 1.1
    max_bucket: int = 1 << 16

    def __post_init__(self) -> None:
        if self.policy not in ("epsilon_greedy", "ucb"):
            raise ValueError(f"selector policy must be epsilon_greedy or ucb, got {self.policy!r}")
        if not 0 <= self.epsilon <= 1:
            raise ValueError("selector epsilon must be in [0, 1]")
        if self.window < 1 or self.warmup < 1 or self.warmup > self.window:
            raise ValueError("selector needs 1 <= warmup <= window")
        if self.cold_bucket < 1:
            raise ValueError("selector cold_bucket must be >= 1")
        if self.expand_ratio < 0:
            raise ValueError("selector expand_ratio must be >= 0")


def _cost(arm: Arm) -> tuple[int, int]:
    """Order of cost per round: plain decoding, then by tokens verified per sequence, then draft depth."""
    return (0, 0) if arm is None else (arm.num_draft_tokens, arm.num_steps)


def bucket_of(batch_size: int) -> int:
    """Half-octave buckets: 1, 2, 3, 4, 5-6 -> 6, 7-8 -> 8, 9-12 -> 12, 13-16 -> 16, 17-24 -> 24, ...

    Speculation is decided at small batches, where a round's cost relative to plain decoding changes with
    every few sequences; within a bucket, arms get timed at different batch sizes (a rollout shrinks through
    it while the selector moves from one arm to the next), a bias of up to the bucket's width. Power-of-two
    buckets measured it: plain decoding timed once at 15 sequences (94 ms, against its 80 ms median over
    9-16) made a chain look better than it was. One bucket per batch size removed the bias but gave the
    bandit twice as many buckets to warm up arms in, which cost 2-3% of a long-tail rollout where no arm
    pays (tlt bench adaptive); half octaves sit between the two."""
    if batch_size <= 4:
        return max(batch_size, 1)
    octave = 1 << (batch_size - 1).bit_length()  # 8 for 5..8
    return octave * 3 // 4 if batch_size <= octave * 3 // 4 else octave


class ArmSelector:
    """Epsilon-greedy or UCB over arms, per batch-size bucket, rewarded by measured goodput.

    Goodput is estimated as two factors with very different noise: the *yield* of an arm (tokens emitted
    per sequence per round) depends on the drafter and the policy, not on the batch, and varies a lot from
    round to round (0 to all drafts accepted), so it is pooled over every round of the arm; the *round
    time* depends on the batch bucket and hardly varies, so it is kept per bucket, as a median. The
    estimate is batch size x mean yield / median round time.
    """

    def __init__(self, arms: Iterable[Arm], config: SelectorConfig | None = None, seed: int = 0):
        arms = list(dict.fromkeys(arms))  # de-duplicated, order kept
        if None not in arms:
            arms.insert(0, None)
        self.arms: list[Arm] = arms
        self.cfg = config or SelectorConfig()
        self.rng = random.Random(seed)
        self._time: dict[tuple[int, Arm], deque[float]] = {}  # round seconds per (bucket, arm)
        self._yield: dict[Arm, deque[list[float]]] = {}  # [tokens per sequence, weight] per arm

    # ------------------------------------------------------------------ learning
    def update(self, batch_size: int, arm: Arm, tokens: int, seconds: float) -> None:
        """Record one round: `tokens` emitted by `batch_size` sequences in `seconds` (wall clock)."""
        if seconds <= 0 or batch_size <= 0:
            return
        key = (bucket_of(batch_size), arm)
        if key not in self._time:
            self._time[key] = deque(maxlen=self.cfg.window)
        self._time[key].append(seconds)
        if arm not in self._yield:
            self._yield[arm] = deque(maxlen=4 * self.cfg.window)
        self._yield[arm].append([tokens / batch_size, 1.0])

    def discount_speculation(self, factor: float) -> None:
        """A new drafter or policy: past yields of speculative arms count `factor` as much (round times
        do not depend on either and are kept)."""
        for arm, obs in self._yield.items():
            if arm is not None:
                for o in obs:
                    o[1] *= factor

    def count(self, bucket: int, arm: Arm) -> int:
        """Rounds of `arm` measured in `bucket` (within the window)."""
        return len(self._time.get((bucket, arm), ()))

    def _mean_yield(self, arm: Arm) -> float | None:
        obs = self._yield.get(arm)
        if not obs:
            return None
        total = sum(w for _, w in obs)
        return sum(v * w for v, w in obs) / total if total > 0 else None

    def _own_time(self, bucket: int, arm: Arm) -> float | None:
        obs = self._time.get((bucket, arm))
        return statistics.median(obs) if obs and len(obs) >= self.cfg.warmup else None

    def _own(self, bucket: int, arm: Arm) -> float | None:
        """Goodput from this bucket's own round times (None until warmed up)."""
        t, y = self._own_time(bucket, arm), self._mean_yield(arm)
        return None if t is None or y is None else bucket * y / t

    def _round_time(self, bucket: int, arm: Arm) -> float | None:
        """Round time here: measured, else borrowed from the nearest bucket as a ratio to plain decoding's."""
        own = self._own_time(bucket, arm)
        if own is not None:
            return own
        base_here = self._own_time(bucket, None)
        for nb in sorted({k[0] for k in self._time if k[1] == arm and k[0] != bucket},
                         key=lambda x: (abs(math.log2(x) - math.log2(bucket)), x)):
            there = self._own_time(nb, arm)
            if there is None:
                continue
            base_there = self._own_time(nb, None)
            if arm is not None and base_here is not None and base_there:
                # The arm's cost relative to a plain round carries over. It shrinks as the batch does (from
                # ~N plain rounds when compute-bound to little more than one when latency-bound), but slowly:
                # between neighbouring buckets the unscaled ratio is the better guess, and a close one is
                # re-measured here anyway (verify_ratio).
                return base_here * there / base_there
            return there  # no baseline on both sides: small batches are latency-bound, time barely changes
        return None

    def round_time(self, batch_size: int, arm: Arm) -> float | None:
        """Median round time of `arm` measured in this batch size's bucket (None: not warmed up there)."""
        return self._own_time(bucket_of(batch_size), arm)

    def estimate(self, batch_size: int, arm: Arm) -> float | None:
        """Expected goodput (tokens/s) of `arm` at this batch size."""
        t, y = self._round_time(bucket_of(batch_size), arm), self._mean_yield(arm)
        return None if t is None or y is None else batch_size * y / t

    # ------------------------------------------------------------------ choosing
    def choose(self, batch_size: int, allowed: Callable[[Arm], bool] | None = None) -> Arm:
        """The arm for the next round. `allowed(arm)` excludes arms that do not fit this batch."""
        b = bucket_of(batch_size)
        # Speculation is first tried at small batches: an arm not measured here is a candidate only at
        # <= cold_bucket sequences, above the nearest bucket where speculation paid, or when it was measured
        # at a larger batch (trying it lower is cheaper). Otherwise its estimate, borrowed from a much smaller
        # batch, would be far too rosy (a round's cost relative to plain grows with the batch).
        gate_open = b <= self.cfg.cold_bucket or self._speculation_paid_below(b)

        def candidate(a: Arm) -> bool:
            if a is None or gate_open or self._own_time(b, a) is not None:
                return True
            return any(arm == a and bb > b for bb, arm in self._time)

        arms = [a for a in self.arms if (a is None or allowed is None or allowed(a)) and candidate(a)]
        if len(arms) == 1:
            return arms[0]
        est = {a: self.estimate(batch_size, a) for a in arms}
        known = {a: v for a, v in est.items() if v is not None}
        best = max(known.values(), default=0.0)
        floor = self.cfg.explore_floor * best
        # Warm-up, cheapest arm first; an arm is skipped once a cheaper speculative arm is hopeless here.
        for a in sorted((a for a in arms if est[a] is None), key=_cost):
            if not any(k is not None and _cost(k) <= _cost(a) and v < floor for k, v in known.items()):
                return a
        arms = [a for a in known if known[a] >= floor]  # the plausible ones (the best among them)
        borrowed = [a for a in arms if self._own_time(b, a) is None and known[a] >= self.cfg.verify_ratio * best]
        if borrowed:  # promising, but measured elsewhere: check here
            return max(borrowed, key=lambda a: known[a])
        if self.cfg.policy == "ucb":
            n_total = sum(self.count(b, a) for a in arms) + 1

            def ucb(a: Arm) -> float:
                n = self.count(b, a)
                bonus = self.cfg.ucb_c * math.sqrt(math.log(n_total) / n) if n else float("inf")
                return known[a] / best + bonus

            return max(arms, key=ucb)
        if self.rng.random() < self.cfg.epsilon:
            return self.rng.choice(arms)
        return max(arms, key=lambda a: known[a])

    def _speculation_paid_below(self, bucket: int) -> bool:
        """At the nearest smaller bucket with any measurement, some speculative arm paid: its goodput at least
        `expand_ratio` x plain decoding's there (with plain not measured there, any measured speculative arm counts).
        Only the nearest: a rollout shrinks through every bucket, so the range where speculation is tried grows one
        bucket at a time, never jumping from 8 to 256."""
        below = [b for b, _ in self._time if b < bucket]
        if not below:
            return False
        b = max(below)
        own = {a: self._own(b, a) for a in self.arms}
        spec = [v for a, v in own.items() if a is not None and v is not None]
        return bool(spec) and (own[None] is None or max(spec) >= self.cfg.expand_ratio * own[None])

    def snapshot(self) -> dict:
        """Per bucket and arm: round time (median, s), goodput estimate (tokens/s), rounds measured; and
        each arm's mean yield (tokens per sequence per round)."""
        out: dict[str, dict] = {}
        for (b, arm) in sorted(self._time, key=lambda k: (k[0], arm_name(k[1]))):
            t, g = self._own_time(b, arm), self._own(b, arm)
            out.setdefault(str(b), {})[arm_name(arm)] = {
                "round_s": None if t is None else round(t, 5), "goodput": None if g is None else round(g, 2),
                "n": self.count(b, arm)}
        out["yield"] = {arm_name(a): round(self._mean_yield(a), 3) for a in self._yield}
        return out
