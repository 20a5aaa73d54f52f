"""tlt/engine/sampling.py: kept sets, penalties, the inverse-CDF draw and seeded uniforms, exactly.

Kept-set thresholds are probed just either side of every boundary (so an off-by-one rank, `cumsum` in place
of "mass strictly before", or `>` in place of `>=` fails). Distributions are checked with chi-square tests
at p > 0.01, each with a companion check that the same counts reject a distribution off by a little.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from tlt.engine import kernels
from tlt.engine.sampling import (
    apply_penalties,
    build_sampling_batch,
    gumbel_of_states,
    inverse_cdf,
    sample,
    scaled_logits,
    seeded_gumbel,
    seeded_gumbel_argmax,
    seeded_gumbel_rows,
    stream_states,
    stream_uniforms,
    warped_probs,
)
from tlt.engine.sampling_params import SamplingParams

V = 12


def params(**kw) -> SamplingParams:
    p = SamplingParams(**kw)
    p.validate()
    return p


def batch(*ps: SamplingParams, vocab: int = V):
    return build_sampling_batch(list(ps), vocab, "cpu")


def kept(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Token ids with non-zero warped probability, for one row."""
    sb = batch(p, vocab=logits.shape[-1])
    w = warped_probs(scaled_logits(logits.unsqueeze(0), sb), sb)[0]
    return set(torch.nonzero(w).flatten().tolist())


@pytest.fixture(scope="module")
def row_logits() -> torch.Tensor:
    """Distinct logits (no ties) in scrambled vocabulary order, so that rank != id."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(V, generator=g) * 1.5


def sorted_view(logits: torch.Tensor, temperature: float = 1.0):
    """(ids by descending probability, their float64 probabilities) of softmax(logits / T)."""
    probs = torch.softmax(logits / temperature, dim=-1).double()
    order = torch.argsort(probs, descending=True)
    return order.tolist(), probs[order].numpy()


# ---------------------------------------------------------------- kept sets
def test_top_k_keeps_exactly_the_k_most_probable(row_logits):
    order, _ = sorted_view(row_logits)
    for k in range(2, V + 1):  # top_k = 1 is greedy (argmax), tested below
        got = kept(row_logits, params(top_k=k))
        assert got == set(order[:k]), k
    # -1 and anything >= the vocabulary mean "all"
    assert kept(row_logits, params(top_k=-1)) == set(range(V))
    assert kept(row_logits, params(top_k=V + 5)) == set(range(V))


def test_top_p_keeps_a_token_iff_the_mass_strictly_before_it_is_below_top_p(row_logits):
    order, p = sorted_view(row_logits)
    before = np.concatenate([[0.0], np.cumsum(p)[:-1]])  # mass of strictly more probable tokens
    for j in range(1, V):
        # Just above before[j]: token j is in (its predecessors' mass < top_p); just below: it is out.
        for eps, n_kept in ((1e-4, j + 1), (-1e-4, j)):
            top_p = float(before[j] + eps)
            if not 0 < top_p <= 1:
                continue
            assert kept(row_logits, params(top_p=top_p)) == set(order[:n_kept]), (j, eps)
    assert kept(row_logits, params(top_p=1.0)) == set(range(V))
    # The most probable token is always kept, however small top_p is.
    assert kept(row_logits, params(top_p=1e-6)) == {order[0]}


def test_min_p_keeps_p_at_least_min_p_times_p_max(row_logits):
    order, p = sorted_view(row_logits)
    for j in range(1, V):
        ratio = p[j] / p[0]
        assert kept(row_logits, params(min_p=float(ratio * (1 - 1e-4)))) == set(order[: j + 1]), j
        assert kept(row_logits, params(min_p=float(ratio * (1 + 1e-4)))) == set(order[:j]), j
    assert kept(row_logits, params(min_p=0.0)) == set(range(V))
    assert kept(row_logits, params(min_p=1.0)) == {order[0]}


def test_min_p_is_relative_to_the_temperature_scaled_distribution(row_logits):
    t = 0.6
    order, p = sorted_view(row_logits, temperature=t)
    j = 4
    min_p = float((p[j] / p[0] + p[j + 1] / p[0]) / 2)  # between tokens j and j + 1 at temperature t
    assert kept(row_logits, params(temperature=t, min_p=min_p)) == set(order[: j + 1])


def test_combined_filters_keep_the_intersection():
    """rank < k AND mass-before < top_p AND p >= min_p * p_max, on many random rows at midpoints."""
    g = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    rows, ps, expected = [], [], []
    for _ in range(200):
        logits = torch.randn(V, generator=g) * float(rng.uniform(0.3, 3.0))
        t = float(rng.choice([0.5, 1.0, 1.7]))
        order, p = sorted_view(logits, t)
        cum = np.cumsum(p)
        k = int(rng.integers(1, V + 1)) if rng.random() < 0.8 else -1
        jp = int(rng.integers(0, V))  # top_p between cum[jp - 1] and cum[jp]: keeps jp + 1 tokens
        top_p = float(min(1.0, (cum[jp] + (cum[jp - 1] if jp else 0.0)) / 2)) if rng.random() < 0.8 else 1.0
        jm = int(rng.integers(0, V))  # min_p between p[jm + 1] and p[jm]: keeps jm + 1 tokens
        nxt = p[jm + 1] if jm + 1 < V else 0.0
        min_p = float((p[jm] + nxt) / 2 / p[0]) if rng.random() < 0.8 else 0.0
        n_keep = min(k if k > 0 else V, jp + 1 if top_p < 1 else V, jm + 1 if min_p > 0 else V)
        rows.append(logits)
        ps.append(params(temperature=t, top_k=k, top_p=top_p, min_p=min_p))
        expected.append(set(order[:n_keep]))
    sb = batch(*ps)
    w = warped_probs(scaled_logits(torch.stack(rows), sb), sb)
    for i, exp in enumerate(expected):
        assert set(torch.nonzero(w[i]).flatten().tolist()) == exp, (i, ps[i])


def test_warped_probs_are_the_softmax_on_the_kept_set_and_zero_elsewhere(row_logits):
    p = params(temperature=0.8, top_k=5, top_p=0.9)
    sb = batch(p)
    scaled = scaled_logits(row_logits.unsqueeze(0), sb)
    w = warped_probs(scaled, sb)[0]
    full = torch.softmax(row_logits / 0.8, dim=-1)
    keep = w > 0
    assert torch.equal(w[keep], full[keep])  # unnormalised: inverse_cdf scales by the kept total
    assert torch.all(w[~keep] == 0)


def test_ties_are_ranked_in_vocabulary_order():
    logits = torch.tensor([0.0, 2.0, 1.0, 2.0, 2.0, 1.0])
    assert kept(logits, params(top_k=2)) == {1, 3}
    assert kept(logits, params(top_k=4)) == {1, 3, 4, 2}
    # min_p = 1 keeps every token tied with the maximum
    assert kept(logits, params(min_p=1.0)) == {1, 3, 4}


def test_greedy_rows_ignore_truncation_and_temperature_in_a_mixed_batch(row_logits):
    sb = batch(params(temperature=0.0, top_k=3), params(temperature=0.7, top_k=3),
               params(top_k=1, temperature=2.0))
    assert sb.greedy.tolist() == [True, False, True]
    assert not sb.all_greedy and sb.needs_truncation
    logits = torch.stack([row_logits, row_logits, row_logits.flip(0)])
    toks, lps = sample(logits, sb, torch.tensor([0.999, 0.0, 0.5]))
    assert toks[0].item() == row_logits.argmax().item()
    assert toks[2].item() == row_logits.flip(0).argmax().item()
    # Log-probabilities: after temperature for sampled rows, of the raw logits for greedy rows.
    assert torch.equal(lps[0], torch.log_softmax(row_logits, -1))
    assert torch.equal(lps[1], torch.log_softmax(row_logits / torch.tensor(0.7), -1))
    assert torch.equal(lps[2], torch.log_softmax(row_logits.flip(0), -1))


def test_build_sampling_batch_maps_top_k_all_to_the_vocabulary_size():
    sb = batch(params(top_k=-1), params(top_k=V), params(top_k=V + 1), params(top_k=3))
    assert sb.top_k.tolist() == [V, V, V, 3]
    assert not batch(params(), params(temperature=0.5)).needs_truncation
    assert not batch(params(temperature=0, top_p=0.5)).needs_truncation  # greedy rows never truncate
    assert batch(params(min_p=0.1)).needs_truncation


# ---------------------------------------------------------------- penalties
def _pen_reference(logits: np.ndarray, prompt: list[int], output: list[int], rep: float, freq: float,
                   pres: float) -> np.ndarray:
    out = logits.astype(np.float32).copy()
    for t in set(prompt) | set(output):  # repetition: prompt + output, each token once
        v = out[t]
        out[t] = v / np.float32(rep) if v > 0 else v * np.float32(rep)
    for t in set(output):  # frequency / presence: output only
        out[t] = out[t] - (np.float32(freq) * np.float32(output.count(t)) + np.float32(pres))
    return out


@pytest.mark.parametrize("rep,freq,pres", [(1.25, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.75),
                                           (2.0, 0.25, 0.5), (0.5, -0.5, -1.0), (1.0, 0.0, 0.0)])
def test_penalties_follow_the_exact_formulas(rep, freq, pres):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, V, generator=g) * 2
    logits[1, 4] = 0.0  # a zero logit stays zero under repetition
    prompt = [[3, 4, 4, 5], [4, 9], [0]]
    output = [[5, 5, 5, 7, 3], [4, 4, 11, 2, 2, 2, 2], []]
    ps = [params(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)] * 3
    got = logits.clone()
    apply_penalties(got, [0, 1, 2], output, prompt, ps)
    for r in range(3):
        ref = _pen_reference(logits[r].numpy(), prompt[r], output[r], rep, freq, pres)
        assert np.array_equal(got[r].numpy(), ref), r  # dyadic penalties: exact in float32


def test_penalties_touch_only_the_listed_rows_and_only_seen_tokens():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, V, generator=g)
    got = logits.clone()
    ps = [params(repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=0.3)] * 2
    apply_penalties(got, [1], [[1, 2], [6, 6]], [[0], [8]], ps)
    assert torch.equal(got[0], logits[0])
    changed = set(torch.nonzero(got[1] != logits[1]).flatten().tolist())
    assert changed == {6, 8}
    # token 8 is only in the prompt: repetition applies, frequency/presence do not
    v8 = logits[1, 8].item()
    assert got[1, 8].item() == pytest.approx(v8 / 1.3 if v8 > 0 else v8 * 1.3, rel=1e-6)
    v6 = logits[1, 6].item()
    v6 = v6 / 1.3 if v6 > 0 else v6 * 1.3
    assert got[1, 6].item() == pytest.approx(v6 - 0.7 * 2 - 0.3, rel=1e-6)


# ---------------------------------------------------------------- drawing
def test_inverse_cdf_at_exact_boundaries():
    probs = torch.tensor([[0.25, 0.0, 0.25, 0.5]])  # dyadic: the CDF is exact
    draw = lambda u: inverse_cdf(probs, torch.tensor([u])).item()  # noqa: E731
    assert draw(0.0) == 0
    assert draw(0.2499) == 0
    assert draw(0.25) == 2  # right-continuous: u on a boundary goes to the next token; id 1 has p = 0
    assert draw(0.4999) == 2
    assert draw(0.5) == 3
    assert draw(float(np.nextafter(np.float32(1), np.float32(0)))) == 3
    # Unnormalised input: u is scaled by the total mass.
    assert inverse_cdf(probs * 3, torch.tensor([0.3])).item() == 2


def test_inverse_cdf_never_draws_a_zero_probability_token():
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 0.0, 1e-30]])
    u = torch.tensor([0.0, 1e-9, 0.5, 0.9999, float(np.nextafter(np.float32(1), np.float32(0)))])
    for row in range(2):
        got = inverse_cdf(probs[row].expand(len(u), -1).contiguous(), u)
        assert all(probs[row, t] > 0 for t in got.tolist()), (row, got)


def _chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "drew a token outside the kept set"
    return stats.chisquare(counts[keep], probs[keep] / probs[keep].sum() * counts.sum()).pvalue


def test_inverse_cdf_samples_the_distribution_chi_square():
    n = 40_000
    probs = torch.tensor([0.02, 0.3, 0.0, 0.08, 0.15, 0.05, 0.25, 0.1, 0.05])
    u = torch.rand(n, generator=torch.Generator().manual_seed(4))
    toks = inverse_cdf(probs.expand(n, -1).contiguous(), u)
    counts = np.bincount(toks.numpy(), minlength=len(probs))
    assert _chi2_p(counts, probs.double().numpy()) > 0.01
    # Power check: the same counts reject a distribution moved by 0.02 between two tokens.
    off = probs.double().numpy().copy()
    off[1] -= 0.02
    off[3] += 0.02
    assert _chi2_p(counts, off) < 0.01


def test_sample_draws_from_the_warped_distribution_chi_square():
    """Temperature, top-k, top-p and min-p together, end to end through `sample`."""
    n = 60_000
    logits = torch.tensor([2.0, 0.5, 1.5, -1.0, 1.0, 0.0, 1.2, -3.0, 0.8, 0.3, -0.5, 1.8])
    t = 0.7

    def expected(temp, k, top_p, min_p):
        z = logits.double() / temp
        p = torch.softmax(z, -1).numpy()
        order = np.argsort(-p, kind="stable")
        sp = p[order]
        before = np.concatenate([[0.0], np.cumsum(sp)[:-1]])
        keep_sorted = (np.arange(V) < k) & (before < top_p) & (sp >= min_p * sp[0])
        keep = np.zeros(V, bool)
        keep[order[keep_sorted]] = True
        return np.where(keep, p, 0.0)

    p = params(temperature=t, top_k=7, top_p=0.81, min_p=0.08)
    sb = batch(*[p] * n)
    u = torch.rand(n, generator=torch.Generator().manual_seed(5))
    toks, _ = sample(logits.expand(n, -1).contiguous(), sb, u)
    counts = np.bincount(toks.numpy(), minlength=V)
    exp = expected(t, 7, 0.81, 0.08)
    assert 2 <= (exp > 0).sum() < V  # the filters bite
    assert _chi2_p(counts, exp) > 0.01
    # Power check: temperature 0.75 instead of 0.7 (same kept set) is rejected.
    wrong = expected(0.75, 7, 0.81, 0.08)
    assert set(np.nonzero(wrong)[0]) == set(np.nonzero(exp)[0])
    assert _chi2_p(counts, wrong) < 0.01


# ---------------------------------------------------------------- seeded Gumbel-max
def test_seeded_gumbel_is_a_pure_function_of_seed_index_and_position():
    a = seeded_gumbel(5, 1, 7, 64, "cpu")
    assert a.shape == (64,) and a.dtype == torch.float32
    assert torch.equal(a, seeded_gumbel(5, 1, 7, 64, "cpu"))
    for seed, index, pos in ((6, 1, 7), (5, 2, 7), (5, 1, 8)):
        assert not torch.equal(a, seeded_gumbel(seed, index, pos, 64, "cpu"))


def test_seeded_gumbel_noise_is_standard_gumbel_ks():
    g = seeded_gumbel(3, 0, 0, 20_000, "cpu").double().numpy()
    assert np.isfinite(g).all()
    assert stats.kstest(g, "gumbel_r").pvalue > 0.01
    # The upper tail (what wins an argmax) in particular: P(G > 8) = 1 - exp(-exp(-8)) = 3.35e-4.
    big = seeded_gumbel_rows([(4, i, 0) for i in range(40)], 50_000, "cpu")
    hits = int((big > 8).sum())
    assert stats.binomtest(hits, big.numel(), 3.354e-4).pvalue > 0.01


def test_seeded_gumbel_values_are_pinned():
    """Changing the generator silently changes every seeded rollout: pinned so that it is deliberate."""
    # Session 5: SplitMix64 counter streams replaced numpy's PCG64 (2.4x faster noise, a C kernel).
    assert seeded_gumbel(0, 0, 0, 4, "cpu").tolist() == pytest.approx(
        [1.97432637, 2.97183681, -0.10405207, -0.15950550], abs=1e-6)
    assert seeded_gumbel(1234, 1, 5, 3, "cpu").tolist() == pytest.approx([1.89190614, -0.04048327, -0.94799948],
                                                                          abs=1e-6)


def test_seeded_noise_kernel_and_numpy_paths_agree_bit_for_bit(monkeypatch):
    """Which path runs (C kernel or numpy) must never change a seeded sample: the noise, and the fused
    Gumbel-max draw, are bit-identical; and the float32 logs are accurate (vs float64)."""
    keys = [(0, 0, 0), (1234, 1, 5), (2**64 - 1, 2**63, 7), (-3, 5, 2**40)]
    keys += [(9, i, j) for i in range(3) for j in range(40)]
    if not kernels.available():
        pytest.skip("no C compiler: only the numpy path exists")
    V = 3000
    states = stream_states(keys)
    fast = gumbel_of_states(states, V)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(keys), V, generator=g) * 3
    x[1, :10] = float("-inf")  # a truncated row
    fused = seeded_gumbel_argmax(x, states)
    assert torch.equal(fused, (x + fast).argmax(dim=-1))
    cols = torch.tensor([0, 7, 2999, 5, 5, 1234])  # a drafter's vocabulary: only those tokens' noise
    fast_cols = gumbel_of_states(states, V, cols=cols)
    assert torch.equal(fast_cols, fast[:, cols])
    monkeypatch.setattr(kernels, "available", lambda: False)
    slow = gumbel_of_states(states, V)
    assert fast.dtype == slow.dtype == torch.float32
    assert torch.equal(fast, slow)
    assert torch.equal(gumbel_of_states(states, V, cols=cols), fast_cols)
    assert torch.equal(seeded_gumbel_argmax(x, states), fused)
    # Against float64 math on the same float32 uniforms: a few float32 ulps at most.
    u = seeded_uniforms(keys, V).double().clamp(max=1 - 2.0**-24)
    ref = -torch.log(-torch.log1p(-u)).float()
    assert torch.allclose(fast, ref, rtol=3e-6, atol=3e-6)
    # 53 random bits before rounding: small uniforms are not stuck on a 2^-24 grid.
    u = seeded_uniforms([(1, 0, p) for p in range(8)], 49152).double()
    small = u[u < 2.0**-10] * 2.0**24
    assert len(small) > 100 and (small != small.round()).float().mean() > 0.9


def seeded_uniforms(keys, V) -> torch.Tensor:
    """The float32 uniforms behind `gumbel_of_states`."""
    return torch.from_numpy(stream_uniforms(stream_states(keys).numpy().view(np.uint64), V))


def test_gumbel_max_rows_draw_the_warped_distribution_chi_square():
    """Rows with seeded noise sample by argmax(logprob + g) over the kept set: the same distribution."""
    n = 20_000
    logits = torch.tensor([2.0, 0.5, 1.5, -1.0, 1.0, 0.0, 1.2, -3.0, 0.8, 0.3, -0.5, 1.8])
    p = params(temperature=0.7, top_k=7, top_p=0.81, min_p=0.08)
    sb = batch(*[p] * n)
    noise = seeded_gumbel_rows([(77, 0, i) for i in range(n)], V, "cpu")
    assert torch.equal(noise[5], seeded_gumbel(77, 0, 5, V, "cpu"))
    u = torch.zeros(n)  # ignored by Gumbel rows: with u = 0 inverse CDF would always give the top token
    toks, _ = sample(logits.expand(n, -1).contiguous(), sb, u, (torch.arange(n), noise))
    counts = np.bincount(toks.numpy(), minlength=V)
    warped = warped_probs(scaled_logits(logits.unsqueeze(0), batch(p)), batch(p))[0].double().numpy()
    assert 2 <= (warped > 0).sum() < V
    assert _chi2_p(counts, warped) > 0.01
    wrong = torch.softmax(logits.double() / 0.75, -1).numpy() * (warped > 0)
    assert _chi2_p(counts, wrong) < 0.01  # power: temperature 0.75 instead of 0.7


def test_gumbel_rows_leave_the_other_rows_alone():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(9))
    sb = batch(params(temperature=1.0), params(temperature=0.0), params(temperature=1.0))
    u = torch.tensor([0.3, 0.5, 0.0])
    plain, _ = sample(logits, sb, u)
    g = seeded_gumbel(1, 0, 0, V, "cpu")
    mixed, _ = sample(logits, sb, u, (torch.tensor([2]), g.unsqueeze(0)))
    assert mixed[:2].tolist() == plain[:2].tolist()
    assert mixed[2].item() == (torch.log_softmax(logits[2], -1) + g).argmax().item()


def test_kept_set_over_the_top_candidates_equals_a_full_sort():
    """kept_set ranks the 256 most probable tokens and sorts the whole vocabulary only for rows whose kept
    set reaches a tie with the last candidate: equal to the full stable sort for peaked rows, flat rows,
    ties at the candidate boundary, and every truncation rule."""
    from tlt.engine import sampling

    Vb = 5000
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(Vb, generator=g) * s for s in (0.3, 1.0, 3.0, 8.0)]  # flat .. peaked
    flat = torch.zeros(Vb)
    flat[:10] = 5.0  # ten tied leaders over a flat floor: the kept set reaches the floor's ties
    rows.append(flat)
    tied = torch.randn(Vb, generator=g) * 4
    top = tied.topk(300).indices
    tied[top[250:300]] = float(tied[top[250]])  # 50 ties straddling the 256th candidate
    rows.append(tied)
    logits = torch.stack(rows)
    settings = [dict(top_p=0.5), dict(top_p=0.95), dict(top_p=0.999), dict(top_k=1), dict(top_k=40),
                dict(top_k=256), dict(top_k=300), dict(min_p=0.05), dict(min_p=1e-5),
                dict(top_k=100, top_p=0.9, min_p=0.01)]
    used_fallback = used_candidates = False
    for kw in settings:
        for t in (0.7, 1.0, 1.5):
            ps = [params(temperature=t, **kw)] * len(rows)
            sb = batch(*ps, vocab=Vb)
            probs = torch.softmax(scaled_logits(logits, sb), dim=-1)
            want = sampling._kept_full(probs, sb)
            assert torch.equal(sampling.kept_set(probs, sb), want), (kw, t)
            n_kept = want.sum(-1)
            used_fallback |= bool((n_kept > 200).any())
            used_candidates |= bool((n_kept < 200).any())
    assert used_fallback and used_candidates  # both paths were exercised


@pytest.mark.skipif(not kernels.available(), reason="no C compiler: fused CPU kernels not built")
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_seeded_gumbel_argmax_skipping_noise_draws_the_same_tokens(scale):
    """The draw that computes only the noise able to decide it (tokens near the best score, or with a tiny uniform)
    = the draw that computes every token's noise: flat and peaked rows, ties, NaN, +-inf, odd widths."""
    from tlt.engine.sampling import stream_states

    g = torch.Generator().manual_seed(int(scale * 10))
    for trial in range(40):
        v = int(torch.randint(1, 3000, (1,), generator=g))
        x = torch.randn(8, v, generator=g) * scale
        x[1, : v // 2] = x[1, 0]  # ties
        x[2] = torch.floor(x[2])  # many exact ties
        if trial % 3 == 0:
            x[3, v // 3] = float("nan")
            x[4, :] = float("-inf")
            x[5, v // 2] = float("inf")
        states = stream_states([(trial, r, 7) for r in range(8)])
        fast = kernels.seeded_gumbel_argmax(x, states, skip=True)
        assert torch.equal(fast, kernels.seeded_gumbel_argmax(x, states, skip=False))
        if trial % 3 == 0:
            assert int(fast[3]) == v // 3 and int(fast[5]) == v // 2
