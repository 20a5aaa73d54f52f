"""From logits to tokens: penalties, temperature, top-k/top-p/min-p, seeded draws, log-probabilities.

Unseeded rows draw by an inverse-CDF lookup of one uniform (from the engine's generator) over the warped
distribution. Rows with `sampling_seed` draw by Gumbel-max with noise that is a pure function of (seed,
sample index, output position), see `seeded_gumbel`: a sampled token is then a function of the target's
distribution at that position alone, which lets speculative decoding reproduce non-speculative samples
token for token.

Log-probabilities (as SGLang) are those of the distribution after penalties and temperature, before
top-k/top-p/min-p truncation; with temperature 0 they are the raw model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tlt.engine import kernels

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_gumbel(seed: int, sample_index: int, position: int, vocab_size: int, device) -> torch.Tensor:
    """Gumbel noise [vocab] that depends only on (seed, sample index, output position).

    Seeded rows sample by Gumbel-max rather than by inverse CDF: argmax(log p + g) changes only if the
    top two perturbed scores are within float error, whereas an inverse-CDF lookup over a flat 50k-token
    distribution moves to a neighbouring token whenever the cumulative sum shifts by one ulp — and the
    speculative verify pass (several tokens per row) and plain decode (one) differ in the last bit.
    """
    return seeded_gumbel_rows([(seed, sample_index, position)], vocab_size, device)[0]


def seeded_gumbel_rows(keys: list[tuple[int, int, int]], vocab_size: int, device) -> torch.Tensor:
    """`seeded_gumbel` for many (seed, sample index, position) keys at once -> [len(keys), vocab] float32.

    Seeded rollouts pay this for every row and position (256 rows x 49k tokens per decode step), so it is a
    C kernel when the kernels are built (~0.16 ms per 49k-token row on one core); the numpy path computes the
    same bits.
    Plain decoding does not even materialise it: `seeded_gumbel_argmax` fuses it into the draw.
    """
    return gumbel_of_states(stream_states(keys), vocab_size).to(device)


_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio)
_NUMPY_ROWS = 64  # rows per block on the numpy path (its uint64 temporaries are 8 bytes per token)


def stream_state(seed: int, sample_index: int, position: int) -> int:
    """The 64-bit state of the noise stream of (seed, sample index, position): a SplitMix64 hash chain."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (sample_index & _MASK64)) ^ (position & _MASK64))


def stream_states(keys: list[tuple[int, int, int]]) -> torch.Tensor:
    """`stream_state` of each key, as an int64 CPU tensor holding the uint64 bits (two's complement)."""
    return torch.tensor([(s - (1 << 64)) if s >> 63 else s for s in (stream_state(*k) for k in keys)],
                        dtype=torch.int64)


def gumbel_of_states(states: torch.Tensor, vocab_size: int, cols: torch.Tensor | None = None) -> torch.Tensor:
    """Gumbel noise [n, vocab] (float32, CPU) of each stream state (int64 [n], see `stream_states`).

    Token j of a stream: u = the (j+1)-th SplitMix64 output's top 53 bits x 2^-53 (exact in float64),
    rounded once to float32 (full relative precision near 0), clamped below 1; then G = -log(-log1p(-u))
    by the float32 functions `_log_f32` / `_log1p_f32`. Counter-based, so every token's noise is computed on
    its own, and every step is integer arithmetic or one correctly rounded float32 operation in a fixed
    order: the C kernel (`kernels.seeded_gumbel`, vectorised) and this numpy path give the same bits, so
    which one runs never changes a sample.

    `cols` (int64 [m], token ids): only those tokens' noise, [n, m] (a drafter's vocabulary).
    """
    if kernels.available():
        if cols is not None:
            return kernels.seeded_gumbel_cols(states.contiguous(), cols.cpu().contiguous())
        return kernels.seeded_gumbel(states.contiguous(), vocab_size)
    st = states.numpy().view(np.uint64)
    tokens = np.arange(vocab_size, dtype=np.uint64) if cols is None else cols.cpu().numpy().astype(np.uint64)
    out = torch.empty((len(st), len(tokens)), dtype=torch.float32)
    for i in range(0, len(st), _NUMPY_ROWS):
        u = np.minimum(stream_uniforms(st[i : i + _NUMPY_ROWS], tokens), np.float32(1.0 - 2.0**-24))
        e = np.maximum(-_log1p_f32(-u), np.float32(2.0**-126))  # Exp(1); u = 0: the smallest normal
        out[i : i + _NUMPY_ROWS] = torch.from_numpy(-_log_f32(e))
    return out


def stream_uniforms(states: np.ndarray, tokens: int | np.ndarray) -> np.ndarray:
    """The float32 uniforms [n, len(tokens)] behind `gumbel_of_states`, for uint64 stream states [n] (numpy) and
    token ids (uint64 [m], or a vocabulary size: all of them): token j = the (j+1)-th SplitMix64 output's top 53
    bits x 2^-53, rounded once to float32."""
    if isinstance(tokens, int):
        tokens = np.arange(tokens, dtype=np.uint64)
    z = states[:, None] + (tokens + np.uint64(1)) * np.uint64(_GAMMA)  # wraps mod 2^64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return ((z >> np.uint64(11)).astype(np.float64) * 2.0**-53).astype(np.float32)


# Cephes' logf polynomial for log(1 + f), f in [sqrt(1/2) - 1, sqrt(2) - 1), highest degree first.
_LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
             -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)


def _log_f32(x: np.ndarray) -> np.ndarray:
    """Natural log of positive normal float32 values, op for op as `log_f32` in cpu_kernels.c."""
    f32 = np.float32
    b = x.view(np.uint32)
    e = (b >> np.uint32(23)).astype(np.int32) - np.int32(126)
    m = ((b & np.uint32(0x007FFFFF)) | np.uint32(0x3F000000)).view(np.float32)  # x = m 2^e, m in [0.5, 1)
    small = m < f32(0.707106781186547524)
    e = np.where(small, e - np.int32(1), e)
    f = np.where(small, (m + m) - f32(1.0), m - f32(1.0))
    z = f * f
    y = np.full_like(f, f32(_LOG_POLY[0]))
    for c in _LOG_POLY[1:]:
        y = y * f + f32(c)
    y = (y * f) * z
    fe = e.astype(np.float32)
    y = y + f32(-2.12194440e-4) * fe
    y = y + f32(-0.5) * z
    return (f + y) + f32(0.693359375) * fe


def _log1p_f32(y: np.ndarray) -> np.ndarray:
    """log1p for float32 y in (-1, 0], as `log1p_f32` in cpu_kernels.c: log(w) y / (w - 1), w = 1 + y."""
    w = np.float32(1.0) + y
    d = w - np.float32(1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _log_f32(w) * (y / d)
    return np.where(d == np.float32(0.0), y, q)


def seeded_gumbel_argmax(x: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """First argmax of x [n, V] (float32) + the noise of each row's stream (`gumbel_of_states`): one fused
    pass on CPU with the kernels, the noise materialised otherwise (the same sums, so the same tokens)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and kernels.available():
        return kernels.seeded_gumbel_argmax(x.contiguous(), states.contiguous())
    return first_argmax(x + gumbel_of_states(states, x.shape[-1]).to(x.device))


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise (float32) from uniforms in [0, 1): G = -log(E), E = -log1p(-u) ~ Exp(1).
    A float32 `u` is transformed in place.

    The uniforms must have fine resolution near 0 (53 random bits, as drawn here, then float32, whose
    relative precision is the same at every scale): the top of the Gumbel tail (what wins an argmax) comes
    from the smallest u, and uniforms on a fixed 2^-24 grid would quantise it. The arithmetic is float32, which
    keeps full relative precision there; u is clamped below 1 so that no token's score becomes -inf.
    """
    x = u.float().clamp_(max=1.0 - 2.0**-24)
    e = x.neg_().log1p_().neg_().clamp_(min=1e-38)  # u = 0 gives E = 0: clamped, not an infinite score
    return e.log_().neg_()


@dataclass
class SamplingBatch:
    """Per-row sampling settings of one batch, as tensors (built once per step)."""

    temperature: torch.Tensor  # [B] float32, 0 for greedy rows
    top_k: torch.Tensor  # [B] int64, vocab size for "all"
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    greedy: torch.Tensor  # [B] bool
    truncates: torch.Tensor  # [B] bool: this row samples with top-k / top-p / min-p
    all_greedy: bool  # host copies of greedy.all() and truncates.any(): no device sync per use
    needs_truncation: bool
    unit_scale: bool = False  # every row greedy or at temperature 1: scaling is the identity

    def select(self, rows: torch.Tensor) -> SamplingBatch:
        """The settings of a subset of rows (a new batch of len(rows) rows)."""
        greedy, truncates, temp = self.greedy[rows], self.truncates[rows], self.temperature[rows]
        return SamplingBatch(temp, self.top_k[rows], self.top_p[rows], self.min_p[rows], greedy, truncates,
                             bool(greedy.all()), bool(truncates.any()), bool((greedy | (temp == 1.0)).all()))


def build_sampling_batch(params_list, vocab_size: int, device) -> SamplingBatch:
    """Collect the per-row settings of `params_list` (SamplingParams) into tensors."""
    greedy = [p.greedy for p in params_list]
    temps = [0.0 if g else float(p.temperature) for p, g in zip(params_list, greedy)]
    top_k = [vocab_size if (p.top_k == -1 or p.top_k >= vocab_size) else p.top_k for p in params_list]
    top_p = [float(p.top_p) for p in params_list]
    min_p = [float(p.min_p) for p in params_list]
    truncates = [not g and (k < vocab_size or tp < 1.0 or mp > 0.0)
                 for g, k, tp, mp in zip(greedy, top_k, top_p, min_p)]
    return SamplingBatch(
        temperature=torch.tensor(temps, dtype=torch.float32, device=device),
        top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
        top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
        min_p=torch.tensor(min_p, dtype=torch.float32, device=device),
        greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
        truncates=torch.tensor(truncates, dtype=torch.bool, device=device),
        all_greedy=all(greedy),
        needs_truncation=any(truncates),
        unit_scale=all(g or t == 1.0 for g, t in zip(greedy, temps)),
    )


def apply_penalties(logits: torch.Tensor, rows: list[int], output_ids: list[list[int]],
                    prompt_ids: list[list[int]], params_list) -> None:
    """In place on logits [B, V] for the given rows: repetition (prompt + output, multiplicative, as
    SGLang and HF), frequency and presence (output only, additive, as SGLang/OpenAI)."""
    V = logits.shape[-1]
    for r in rows:
        p = params_list[r]
        out = torch.tensor(output_ids[r], dtype=torch.int64, device=logits.device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(prompt_ids[r] + output_ids[r], dtype=torch.int64, device=logits.device).unique()
            vals = logits[r, seen]
            logits[r, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty != 0 or p.presence_penalty != 0) and out.numel():
            counts = torch.zeros(V, dtype=torch.float32, device=logits.device)
            counts.scatter_add_(0, out, torch.ones_like(out, dtype=torch.float32))
            logits[r] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def scaled_logits(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Logits divided by temperature (greedy rows unchanged). [B, V] -> [B, V]; `logits` itself when no row
    scales (x / 1 == x exactly: RL rollouts at T = 1 skip a full-vocabulary pass per step)."""
    if sb.all_greedy or sb.unit_scale:
        return logits
    t = torch.where(sb.greedy, torch.ones_like(sb.temperature), sb.temperature)
    return logits / t.unsqueeze(-1)


def warped_probs(scaled: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Probabilities after top-k, top-p and min-p (unnormalised: zeros outside the kept set). [B, V]."""
    probs = torch.softmax(scaled, dim=-1)
    if not sb.needs_truncation:
        return probs
    return probs * kept_set(probs, sb)


# Candidates ranked before falling back to a full sort: a nucleus is rarely wider (a full stable sort of
# [128, 49152] took 480 ms on the 2-core CPU, topk(256) 32 ms).
_TOP_CANDIDATES = 256


def kept_set(probs: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """The tokens top-k, top-p and min-p keep, as SGLang: rank < k, mass of strictly more probable tokens
    < top_p, and p >= min_p * p_max; ties ranked in vocabulary order. [B, V] bool.

    Ranked among each row's `_TOP_CANDIDATES` most probable tokens first. That is exact whenever the kept
    set holds no token tied with the last candidate: every token ahead of a kept one in the full order is
    then a candidate too, so ranks, masses and p_max are the same. Rows where it does not hold (a flat
    distribution whose nucleus is wider) are ranked over the whole vocabulary."""
    if probs.shape[-1] <= _TOP_CANDIDATES:
        return _kept_full(probs, sb)
    vals, ids = probs.topk(_TOP_CANDIDATES, dim=-1)
    ids, by_id = ids.sort(dim=-1)  # candidates in vocabulary order, then a stable sort by probability
    vals, order = vals.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)
    keep = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    keep_top = _kept_sorted(vals, sb)
    exact = ~(keep_top & (vals == vals[:, -1:])).any(dim=-1)
    keep.scatter_(1, ids, keep_top & exact.unsqueeze(-1))
    wide = (~exact).nonzero().squeeze(1)
    if len(wide):
        keep[wide] = _kept_full(probs[wide], sb.select(wide))
    return keep


def _kept_full(probs: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """`kept_set` by a stable sort of the whole vocabulary."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    keep = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    return keep.scatter_(1, order, _kept_sorted(sorted_p, sb))


def _kept_sorted(sorted_p: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Kept flags [B, K] for probabilities sorted in descending order (ties in vocabulary order)."""
    before = sorted_p.cumsum(dim=-1) - sorted_p
    ranks = torch.arange(sorted_p.shape[-1], device=sorted_p.device).unsqueeze(0)
    top_p = sb.top_p.unsqueeze(-1)
    keep = (ranks < sb.top_k.unsqueeze(-1)) & ((before < top_p) | (top_p >= 1.0))
    keep &= sorted_p >= sb.min_p.unsqueeze(-1) * sorted_p[:, :1]
    keep[:, 0] = True
    return keep


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row: the first id whose cumulative (unnormalised) mass exceeds u * total."""
    cdf = probs.cumsum(dim=-1)  # [B, V]
    target = uniforms.unsqueeze(-1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of [B, V], the first index on ties (as `argmax`). On CPU torch's reduction
    is single-threaded (2.4 ms at [64, 49152]): the fused kernel when built, else `max(dim).indices`
    (the same result at a third of argmax's time)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and kernels.available():
        return kernels.argmax(x.contiguous())
    return x.max(dim=-1).indices


def sample(logits: torch.Tensor, sb: SamplingBatch, uniforms: torch.Tensor,
           gumbel: tuple[torch.Tensor, torch.Tensor] | None = None,
           need_logprobs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] (penalties applied) -> (tokens [B], logprobs [B, V] of the temperature-scaled dist,
    or None when not needed: a full-vocabulary log-softmax is a few ms per step at batch 64).

    Rows in `gumbel` = (rows [R], noise [R, V], see `seeded_gumbel_rows`) draw by Gumbel-max over the
    warped distribution; the others by inverse CDF with their uniform. Both are exact draws. The noise may
    also be given as int64 stream states [R] (`stream_states`): then it is fused into the draw."""
    scaled = scaled_logits(logits, sb)
    logprobs = torch.log_softmax(scaled, dim=-1) if need_logprobs else None
    greedy_tok = first_argmax(logits)
    if sb.all_greedy:
        return greedy_tok, logprobs
    # Each sampled row is drawn once, by its own rule: full-vocabulary work only for the rows that need it
    # (a speculative round samples [rows x tree nodes] rows, every one with Gumbel noise).
    drawn = greedy_tok.clone()
    noisy = torch.zeros_like(sb.greedy)
    if gumbel is not None and len(gumbel[0]):
        rows, noise = gumbel
        noisy[rows] = True
        whole = len(rows) == len(drawn) and bool((rows == torch.arange(len(drawn), device=rows.device)).all())
        base = scaled if whole else scaled[rows]
        sub = sb if whole else sb.select(rows)
        if sub.needs_truncation:  # tokens outside the kept set can never win
            base = base.masked_fill(warped_probs(base, sub) == 0, float("-inf"))
        # argmax(log p + g) = argmax(scaled + g): the log-normaliser is constant per row. (Without truncation
        # no mask is needed: a token loses to the row's best unless its logit gap is below the Gumbel
        # noise's range (< 40 here); tokens whose probability underflows to 0 are > 87 behind.)
        if noise.dtype == torch.int64:
            drawn[rows] = seeded_gumbel_argmax(base, noise)
        else:
            drawn[rows] = first_argmax(base + noise)
    cdf_rows = (~sb.greedy & ~noisy).nonzero().squeeze(1)
    if len(cdf_rows):
        if len(cdf_rows) == len(drawn):
            drawn = inverse_cdf(warped_probs(scaled, sb), uniforms)
        else:
            drawn[cdf_rows] = inverse_cdf(warped_probs(scaled[cdf_rows], sb.select(cdf_rows)), uniforms[cdf_rows])
    return torch.where(sb.greedy, greedy_tok, drawn), logprobs
