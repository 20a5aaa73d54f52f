/* Fused bfloat16 CPU kernels for the decode step of tlt's decoder (see kernels/__init__.py).
 *
 * At decode time a 135M model's layer is ~40 tiny torch ops around 4 matmuls; on two cores the ops'
 * dispatch and thread hand-offs cost as much as the matmuls. These three kernels replace them:
 *   add_rms_norm  residual + delta -> new residual, and its RMSNorm (one pass)
 *   rope_kv       rotary on q and k, k and v written into the paged-by-row KV cache
 *   silu_mul      SwiGLU's silu(gate) * up
 * Each rounds to bfloat16 where transformers' bf16 code rounds (after every torch op), so the result
 * agrees with the torch path up to float32 summation order inside a reduction.
 * Plain C, no torch headers: it builds in about a second with the system compiler.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef uint16_t bf16;

/* Below this many elements a kernel runs on the calling thread: waking the pool costs more. The library
 * is built with -fopenmp and needs libgomp.so.1; the loader hands it the copy torch has already loaded
 * (same soname), so the parallel loops run on torch's own threads, not on a second pool. */
#define PAR_MIN 16384

static inline float bf2f(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, NaN -> canonical quiet NaN: c10::BFloat16's rounding. Branch-free, so that
 * the loops below vectorise. */
static inline bf16 f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (bf16)0x7fc0 : (bf16)rounded;
}

/* e^x to ~1 ulp of float (Cephes' expf: Cody-Waite reduction, degree-6 polynomial), vectorisable, unlike
 * libm's expf. Only feeds a result rounded to bfloat16. */
static inline float exp_approx(float x) {
    const int overflow = x > 88.72283935546875f; /* expf overflows to inf there */
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  /* NaN passes through */
    /* Round to nearest integer by the 1.5 * 2^23 trick (|x * log2 e| < 2^22). */
    float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return overflow ? INFINITY : p * scale;
}

/* x_out[i] = bf16(x[i] + delta[i]) (delta may be NULL: x_out = x);
 * out[i] = bf16(w[j] * bf16(x_out[i] * rsqrt(mean(x_out^2) + eps)))  -- LlamaRMSNorm in bf16. */
void tlt_add_rms_norm(int64_t n, int64_t h, const bf16 *x, const bf16 *delta, bf16 *x_out, bf16 *out,
                      const bf16 *w, float eps) {
#pragma omp parallel for schedule(static) if (n * h >= PAR_MIN)
    for (int64_t r = 0; r < n; r++) {
        const bf16 *xr = x + r * h;
        bf16 *xo = x_out + r * h, *o = out + r * h;
        float ss = 0.f;
        if (delta) {
            const bf16 *dr = delta + r * h;
#pragma omp simd reduction(+ : ss)
            for (int64_t j = 0; j < h; j++) {
                bf16 s = f2bf(bf2f(xr[j]) + bf2f(dr[j]));
                xo[j] = s;
                float v = bf2f(s);
                ss += v * v;
            }
        } else {
#pragma omp simd reduction(+ : ss)
            for (int64_t j = 0; j < h; j++) {
                float v = bf2f(xr[j]);
                xo[j] = xr[j];
                ss += v * v;
            }
        }
        float scale = 1.f / sqrtf(ss / (float)h + eps);
#pragma omp simd
        for (int64_t j = 0; j < h; j++) o[j] = f2bf(bf2f(w[j]) * bf2f(f2bf(bf2f(xo[j]) * scale)));
    }
}

/* One token t in [0, n): qkv[t] = [q (nh*d) | k (kvh*d) | v (kvh*d)].
 * q_out[t] = rotary(q); cache[row[t], head, slot[t], :] = rotary(k) / v.
 * Rotary as transformers' rotate_half: x*cos + [-x2, x1]*sin, each product and the sum rounded.
 * cos/sin: tables [max_pos, d]; pos[t] picks the row. Cache layout [rows, kvh, max_len, d]. */
void tlt_rope_kv(int64_t n, int64_t nh, int64_t kvh, int64_t d, const bf16 *qkv, const bf16 *cos_t,
                 const bf16 *sin_t, const int64_t *pos, const int64_t *row, const int64_t *slot, bf16 *q_out,
                 bf16 *k_cache, bf16 *v_cache, int64_t max_len) {
    const int64_t half = d / 2, width = (nh + 2 * kvh) * d;
#pragma omp parallel for schedule(static) if (n * width >= PAR_MIN)
    for (int64_t t = 0; t < n; t++) {
        const bf16 *src = qkv + t * width;
        const bf16 *c = cos_t + pos[t] * d, *s = sin_t + pos[t] * d;
        for (int64_t hd = 0; hd < nh + kvh; hd++) {
            const bf16 *x = src + hd * d;
            bf16 *dst = hd < nh ? q_out + (t * nh + hd) * d
                                : k_cache + ((row[t] * kvh + (hd - nh)) * max_len + slot[t]) * d;
#pragma omp simd
            for (int64_t j = 0; j < half; j++) {
                float a = bf2f(f2bf(bf2f(x[j]) * bf2f(c[j])));
                float b = bf2f(f2bf(-bf2f(x[j + half]) * bf2f(s[j])));
                dst[j] = f2bf(a + b);
            }
#pragma omp simd
            for (int64_t j = half; j < d; j++) {
                float a = bf2f(f2bf(bf2f(x[j]) * bf2f(c[j])));
                float b = bf2f(f2bf(bf2f(x[j - half]) * bf2f(s[j])));
                dst[j] = f2bf(a + b);
            }
        }
        for (int64_t hd = 0; hd < kvh; hd++)
            memcpy(v_cache + ((row[t] * kvh + hd) * max_len + slot[t]) * d, src + (nh + kvh + hd) * d,
                   (size_t)d * sizeof(bf16));
    }
}

/* gate_up[r] = [gate (m) | up (m)] -> out[r] = bf16(bf16(silu(gate)) * up). */
void tlt_silu_mul(int64_t n, int64_t m, const bf16 *gate_up, bf16 *out) {
#pragma omp parallel for schedule(static) if (n * m >= PAR_MIN)
    for (int64_t r = 0; r < n; r++) {
        const bf16 *g = gate_up + r * 2 * m, *u = g + m;
        bf16 *o = out + r * m;
#pragma omp simd
        for (int64_t j = 0; j < m; j++) {
            float x = bf2f(g[j]);
            float act = bf2f(f2bf(x / (1.f + exp_approx(-x))));
            o[j] = f2bf(act * bf2f(u[j]));
        }
    }
}

/* The first index j < v where x[j] is NaN (when the row has one: NaN counts as the maximum, as in torch's
 * argmax) or else equals the row's maximum `best`. */
static inline int64_t first_index_of_max(const float *x, int64_t v, float best, int has_nan) {
    for (int64_t j = 0; j < v; j++)
        if (has_nan ? x[j] != x[j] : x[j] == best)
            return j;
    return 0;
}

/* Moves inside KV caches [R, kvh, max_len, slot_bytes bytes], any dtype: for each of the `ncache` caches (addresses in
 * `caches`) and each move i in order, slot src[i] of row rows[i] is copied to slot dst[i], every kv head. A speculative
 * round's accepted tree nodes go from their tree slots to their sequence positions: one call for all layers instead of
 * two torch indexing ops per cache. The caller checks the indices. */
void tlt_kv_move(int64_t ncache, const int64_t *caches, int64_t kvh, int64_t max_len, int64_t slot_bytes, int64_t n,
                 const int64_t *rows, const int64_t *dst, const int64_t *src) {
    for (int64_t c = 0; c < ncache; c++) {
        char *base = (char *)(intptr_t)caches[c];
        for (int64_t i = 0; i < n; i++)
            for (int64_t h = 0; h < kvh; h++) {
                char *head = base + (rows[i] * kvh + h) * max_len * slot_bytes;
                memmove(head + dst[i] * slot_bytes, head + src[i] * slot_bytes, (size_t)slot_bytes);
            }
    }
}

/* First index of the maximum of each row of x [n, v] (float32), as torch's argmax: NaN counts as the
 * maximum (the first NaN wins). Parallel over rows; torch's CPU reduction here is single-threaded. */
void tlt_argmax_f32(int64_t n, int64_t v, const float *x, int64_t *out) {
#pragma omp parallel for schedule(static) if (n * v >= 4 * PAR_MIN)
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * v;
        float best = -INFINITY;
        int has_nan = 0;
#pragma omp simd reduction(max : best) reduction(| : has_nan)
        for (int64_t j = 0; j < v; j++) {
            best = xr[j] > best ? xr[j] : best;
            has_nan |= xr[j] != xr[j];
        }
        out[r] = first_index_of_max(xr, v, best, has_nan);
    }
}

/* Seeded Gumbel noise (sampling.py `seeded_gumbel_rows`; its numpy path computes the same bits).
 * Token j of stream `state`: the (j+1)-th SplitMix64 output, 53 bits scaled to [0, 1) and rounded once to
 * float32 (u), then G = -log(-log1p(-u)) by the float32 functions below. Every step is integer arithmetic or
 * one correctly rounded float32 operation in a fixed order (built with -ffp-contract=off), so numpy's float32
 * arithmetic reproduces it exactly; the constants are written as double literals rounded to float, as numpy's
 * np.float32(constant) rounds them. */
static inline float splitmix_u(uint64_t state, int64_t j) {
    uint64_t z = state + (uint64_t)(j + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (float)((double)(z >> 11) * 0x1.0p-53);
}

/* Natural log of a positive normal float (Cephes' logf: frexp, then a degree-9 polynomial in m - 1). */
static inline float log_f32(float x) {
    uint32_t b, mb;
    memcpy(&b, &x, 4);
    int32_t e = (int32_t)(b >> 23) - 126;
    mb = (b & 0x007fffffu) | 0x3f000000u; /* x = m * 2^e, m in [0.5, 1) */
    float m;
    memcpy(&m, &mb, 4);
    const int small = m < (float)0.707106781186547524;
    e = small ? e - 1 : e;
    const float f = small ? (m + m) - 1.0f : m - 1.0f;
    const float z = f * f;
    float y = (float)7.0376836292e-2;
    y = y * f - (float)1.1514610310e-1;
    y = y * f + (float)1.1676998740e-1;
    y = y * f - (float)1.2420140846e-1;
    y = y * f + (float)1.4249322787e-1;
    y = y * f - (float)1.6668057665e-1;
    y = y * f + (float)2.0000714765e-1;
    y = y * f - (float)2.4999993993e-1;
    y = y * f + (float)3.3333331174e-1;
    y = (y * f) * z;
    const float fe = (float)e;
    y = y + (float)-2.12194440e-4 * fe;
    y = y + -0.5f * z;
    const float r = f + y;
    return r + 0.693359375f * fe;
}

/* log1p(y) for y in (-1, 0] (Kahan: log(w) * y / (w - 1) with w = 1 + y, exact where w rounds to 1). */
static inline float log1p_f32(float y) {
    const float w = 1.0f + y;
    const float d = w - 1.0f;
    const float l = log_f32(w);
    const float q = y / (d == 0.0f ? 1.0f : d); /* a safe divisor: the division runs in every lane (vectorised:
                                                  built with -fno-trapping-math, which changes no result) */
    return d == 0.0f ? y : l * q;
}

static inline float seeded_gumbel(uint64_t state, int64_t j) {
    float u = splitmix_u(state, j);
    u = u > (float)0.99999994039535522 ? (float)0.99999994039535522 : u; /* 1 - 2^-24: no infinite score */
    float e = -log1p_f32(-u);                                            /* Exp(1) */
    e = e < 0x1.0p-126f ? 0x1.0p-126f : e;                              /* u = 0: the smallest normal */
    return -log_f32(e);
}

/* out[r, :] = Gumbel noise of stream states[r] (n rows of v tokens). */
void tlt_seeded_gumbel_f32(int64_t n, int64_t v, const uint64_t *states, float *out) {
#pragma omp parallel for schedule(static) if (n * v >= PAR_MIN)
    for (int64_t r = 0; r < n; r++) {
        const uint64_t st = states[r];
        float *restrict o = out + r * v;
#pragma omp simd
        for (int64_t j = 0; j < v; j++)
            o[j] = seeded_gumbel(st, j);
    }
}

/* One row of tlt_seeded_gumbel_argmax, every token's noise computed (s: v floats of scratch). */
static int64_t gumbel_argmax_full(int64_t v, const float *xr, uint64_t st, float *s) {
    float best = -INFINITY;
    int has_nan = 0;
#pragma omp simd reduction(max : best) reduction(| : has_nan)
    for (int64_t j = 0; j < v; j++) {
        const float t = xr[j] + seeded_gumbel(st, j);
        s[j] = t;
        best = t > best ? t : best;
        has_nan |= t != t;
    }
    return first_index_of_max(s, v, best, has_nan);
}

#if defined(__AVX512F__)
/* The same draw with the noise of most tokens skipped, exactly. G(u) = -log(-log1p(-u)) falls as u grows: for
 * u >= GUMBEL_SKIP_U, G <= 7 (the float32 functions err by a few ulps, far inside the margin). The winner's score is
 * at least lb = x[k] + G_k for the row's largest logit x[k], so a token with x_j < lb - 8 can only win with
 * u_j < GUMBEL_SKIP_U. Only tokens within 8 of lb or with such a u (0.09%) get their noise computed; the others'
 * scores are provably below the winner's, so the first maximum is the full computation's. Rows with a NaN logit
 * take the full path. Returns -1 when the row has a NaN (the caller then runs gumbel_argmax_full). */
#define GUMBEL_SKIP_U 9.1e-4f /* 1 - exp(-exp(-7)) = 9.115e-4: G(9.1e-4) = 7.0016 */
#define GUMBEL_SKIP_GAP 8.0f
static int64_t gumbel_argmax_skip(int64_t v, const float *xr, uint64_t st, float *u, int32_t *idx) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    int64_t j = 0;
    for (; j + 16 <= v; j += 16) {
        const __m512 xv = _mm512_loadu_ps(xr + j);
        nan |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, xv);
    }
    float m = _mm512_reduce_max_ps(mx);
    for (; j < v; j++) {
        if (xr[j] != xr[j]) nan = 1;
        m = xr[j] > m ? xr[j] : m;
    }
    if (nan) return -1;
    int64_t k = 0;
    while (xr[k] != m) k++;
    const float lb = xr[k] + seeded_gumbel(st, k), thr = lb - GUMBEL_SKIP_GAP;
#pragma omp simd
    for (j = 0; j < v; j++) u[j] = splitmix_u(st, j);
    /* candidates, in index order */
    int64_t n = 0;
    const __m512 vthr = _mm512_set1_ps(thr), vu = _mm512_set1_ps(GUMBEL_SKIP_U);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (j = 0; j + 16 <= v; j += 16) {
        const __mmask16 c = _mm512_cmp_ps_mask(_mm512_loadu_ps(xr + j), vthr, _CMP_GE_OQ) |
                            _mm512_cmp_ps_mask(_mm512_loadu_ps(u + j), vu, _CMP_LT_OQ);
        if (c) {
            _mm512_mask_compressstoreu_epi32(idx + n, c, _mm512_add_epi32(lane, _mm512_set1_epi32((int)j)));
            n += __builtin_popcount((unsigned)c);
        }
    }
    for (; j < v; j++)
        if (xr[j] >= thr || u[j] < GUMBEL_SKIP_U) idx[n++] = (int32_t)j;
    float best = -INFINITY;
    int64_t arg = k;
    for (int64_t i = 0; i < n; i++) { /* no NaN here: the logits have none and the noise is finite */
        const float t = xr[idx[i]] + seeded_gumbel(st, idx[i]);
        if (t > best) {
            best = t;
            arg = idx[i];
        }
    }
    return arg;
}
#endif

/* out[r] = first argmax_j (x[r, j] + Gumbel noise of stream states[r] at j), as argmax over x + the noise of
 * tlt_seeded_gumbel_f32 (same sums, NaN wins as in tlt_argmax_f32), without writing the noise out. `skip`: compute
 * only the noise that can decide the draw (gumbel_argmax_skip; the same tokens, 3.4x faster on SmolLM2 logits at T=1). */
void tlt_seeded_gumbel_argmax(int64_t n, int64_t v, const float *x, const uint64_t *states, int64_t *out, int skip) {
#if !defined(__AVX512F__)
    skip = 0;
#endif
#pragma omp parallel if (n * v >= PAR_MIN)
    {
        float *s = malloc(sizeof(float) * (size_t)v);
        int32_t *idx = skip && v < INT32_MAX ? malloc(sizeof(int32_t) * (size_t)v) : NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            const float *xr = x + r * v;
            int64_t got = -1;
#if defined(__AVX512F__)
            if (idx) got = gumbel_argmax_skip(v, xr, states[r], s, idx);
#endif
            out[r] = got >= 0 ? got : gumbel_argmax_full(v, xr, states[r], s);
        }
        free(s);
        free(idx);
    }
}

/* ---------------------------------------------------------------- float32 linear for a few rows
 * Y[r, o] = sum_i X[r, i] * W[o, i]: X [R, I], W [O, I] (a Linear's weight as stored), Y [R, O], all float32.
 *
 * For the few rows of decode and speculative verify passes. A small model's weights do not fit in cache, so
 * such a pass is bound by reading them; torch's float32 GEMM reads them 1.7-2.2x slower at 4-8 rows than its
 * matrix-vector path does at one. Here a block of 4 weight rows is read once for all R rows (4 x 4 register
 * tiles, FMA), and the threads split O.
 *
 * Every output is summed in one fixed order (16 lanes over i, then a fixed lane reduction), whatever R, the
 * row's place in X and the thread count: a row's result does not depend on the rows beside it, so a decode
 * pass (one row) and a verify pass (several) compute bit-identical linears. */
#if defined(__AVX512F__)
#include <immintrin.h>

static inline float lane_sum(__m512 v) {
    /* fixed order: halves, then quarters, ... (not _mm512_reduce_add_ps, whose order is the compiler's) */
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}

/* The cache line at p in each of the 4 weight rows after a block (rows `stride` bytes apart). */
static inline void prefetch_rows(const char *p, int64_t stride) {
    for (int b = 0; b < 4; b++) _mm_prefetch(p + b * stride, _MM_HINT_T0);
}

/* NR rows of X (compile-time, 1..4) x 4 weight rows (`w[b]`; missing ones point at a valid row and their
 * results are dropped); `pf` weight rows after the block are prefetched. Fully unrolled, so that the 4 x NR
 * accumulators stay in registers. */
#define LINEAR_TILE(NR)                                                                                          \
    static void linear_tile_##NR(int64_t no, int64_t I, const float *X, const float *const *w, float *Y,         \
                                 int64_t O, const float *pf, int64_t npf) {                                      \
        __m512 acc[NR][4];                                                                                        \
        _Pragma("GCC unroll 4") for (int a = 0; a < NR; a++)                                                     \
            _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) acc[a][b] = _mm512_setzero_ps();                 \
        int64_t i = 0;                                                                                            \
        for (; i + 16 <= I; i += 16) {                                                                            \
            __m512 wv[4];                                                                                         \
            _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) wv[b] = _mm512_loadu_ps(w[b] + i);               \
            if (npf) prefetch_rows((const char *)(pf + i), I * (int64_t)sizeof(*pf));                            \
            _Pragma("GCC unroll 4") for (int a = 0; a < NR; a++) {                                               \
                __m512 x = _mm512_loadu_ps(X + a * I + i);                                                        \
                _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) acc[a][b] = _mm512_fmadd_ps(x, wv[b], acc[a][b]); \
            }                                                                                                     \
        }                                                                                                         \
        if (i < I) {                                                                                              \
            __mmask16 m = (__mmask16)((1u << (I - i)) - 1);                                                       \
            __m512 wv[4];                                                                                         \
            _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) wv[b] = _mm512_maskz_loadu_ps(m, w[b] + i);      \
            _Pragma("GCC unroll 4") for (int a = 0; a < NR; a++) {                                               \
                __m512 x = _mm512_maskz_loadu_ps(m, X + a * I + i);                                               \
                _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) acc[a][b] = _mm512_fmadd_ps(x, wv[b], acc[a][b]); \
            }                                                                                                     \
        }                                                                                                         \
        _Pragma("GCC unroll 4") for (int a = 0; a < NR; a++)                                                     \
            _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) if (b < no) Y[a * O + b] = lane_sum(acc[a][b]);  \
    }
LINEAR_TILE(1)
LINEAR_TILE(2)
LINEAR_TILE(3)
LINEAR_TILE(4)

static void linear_tile(int64_t nr, int64_t no, int64_t I, const float *X, int64_t r0, const float *W, int64_t o0,
                        float *Y, int64_t O) {
    const float *x = X + r0 * I, *w[4];
    for (int b = 0; b < 4; b++) w[b] = W + (o0 + (b < no ? b : 0)) * I;
    float *y = Y + r0 * O + o0;
    /* the next block's rows, fetched while this one computes (once: by the first row tile) */
    int64_t npf = r0 == 0 && o0 + 8 <= O;
    const float *pf = W + (o0 + 4) * I;
    switch (nr) {
    case 1: linear_tile_1(no, I, x, w, y, O, pf, npf); break;
    case 2: linear_tile_2(no, I, x, w, y, O, pf, npf); break;
    case 3: linear_tile_3(no, I, x, w, y, O, pf, npf); break;
    default: linear_tile_4(no, I, x, w, y, O, pf, npf); break;
    }
}
#else
static void linear_tile(int64_t nr, int64_t no, int64_t I, const float *X, int64_t r0, const float *W, int64_t o0,
                        float *Y, int64_t O) {
    for (int64_t a = 0; a < nr; a++)
        for (int64_t b = 0; b < no; b++) {
            float lanes[16] = {0};
            const float *x = X + (r0 + a) * I, *w = W + (o0 + b) * I;
            for (int64_t i = 0; i < I; i++) lanes[i & 15] = fmaf(x[i], w[i], lanes[i & 15]);
            float s = 0.f;
            for (int j = 0; j < 16; j++) s += lanes[j];
            Y[(r0 + a) * O + o0 + b] = s;
        }
}
#endif

void tlt_linear_f32(int64_t R, int64_t I, int64_t O, const float *X, const float *W, float *Y) {
#pragma omp parallel for schedule(static) if (O * I >= PAR_MIN)
    for (int64_t o = 0; o < O; o += 4) {
        int64_t no = O - o < 4 ? O - o : 4;
        for (int64_t r = 0; r < R; r += 4) linear_tile(R - r < 4 ? R - r : 4, no, I, X, r, W, o, Y, O);
    }
}

/* ---------------------------------------------------------------- bfloat16 linear for a few rows
 * Y[r, o] = bf16(sum_i X[r, i] * W[o, i] (+ bias[o])): X [R, I], W [O, I], bias [O] or NULL, Y [R, O], all bfloat16;
 * the sum in float32 (AVX512-BF16 dot products of pairs), rounded once, as oneDNN's bf16 linear does.
 *
 * Why: at 1-16 rows a bf16 pass is bound by reading the weights, and oneDNN's packed bf16 linear reads them at
 * ~18 GB/s on this CPU where a plain stream reaches ~28 GB/s. As tlt_linear_f32: 4 weight rows x 4 activation
 * rows per register tile, the next block prefetched, threads split O, every output summed in one fixed order
 * (a row's result does not depend on the rows beside it). */
#if defined(__AVX512BF16__)
#define LINEAR_BF16_TILE(NR)                                                                                     \
    static void linear_bf16_tile_##NR(int64_t no, int64_t I, const bf16 *X, const bf16 *const *w, float *acc_out, \
                                      const bf16 *pf, int64_t npf) {                                             \
        __m512 acc[NR][4];                                                                                        \
        _Pragma("GCC unroll 4") for (int a = 0; a < NR; a++)                                                     \
            _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) acc[a][b] = _mm512_setzero_ps();                 \
        int64_t i = 0;                                                                                            \
        for (; i + 32 <= I; i += 32) {                                                                            \
            __m512bh wv[4];                                                                                       \
            _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) wv[b] = (__m512bh)_mm512_loadu_si512(w[b] + i);  \
            if (npf) prefetch_rows((const char *)(pf + i), I * (int64_t)sizeof(*pf));                            \
            _Pragma("GCC unroll 4") for (int a = 0; a < NR; a++) {                                               \
                __m512bh x = (__m512bh)_mm512_loadu_si512(X + a * I + i);                                         \
                _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], x, wv[b]); \
            }                                                                                                     \
        }                                                                                                         \
        if (i < I) {                                                                                              \
            __mmask32 m = (__mmask32)((1ull << (I - i)) - 1);                                                     \
            __m512bh wv[4];                                                                                       \
            _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) wv[b] = (__m512bh)_mm512_maskz_loadu_epi16(m, w[b] + i); \
            _Pragma("GCC unroll 4") for (int a = 0; a < NR; a++) {                                               \
                __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(m, X + a * I + i);                                \
                _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], x, wv[b]); \
            }                                                                                                     \
        }                                                                                                         \
        _Pragma("GCC unroll 4") for (int a = 0; a < NR; a++)                                                     \
            _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) acc_out[a * 4 + b] = lane_sum(acc[a][b]);        \
    }
LINEAR_BF16_TILE(1)
LINEAR_BF16_TILE(2)
LINEAR_BF16_TILE(3)
LINEAR_BF16_TILE(4)

int tlt_linear_bf16_supported(void) { return 1; }

void tlt_linear_bf16(int64_t R, int64_t I, int64_t O, const bf16 *X, const bf16 *W, const bf16 *bias, bf16 *Y) {
#pragma omp parallel for schedule(static) if (O * I >= PAR_MIN)
    for (int64_t o = 0; o < O; o += 4) {
        int64_t no = O - o < 4 ? O - o : 4;
        const bf16 *w[4];
        for (int b = 0; b < 4; b++) w[b] = W + (o + (b < no ? b : 0)) * I;
        const bf16 *pf = W + (o + 4) * I;
        for (int64_t r = 0; r < R; r += 4) {
            int64_t nr = R - r < 4 ? R - r : 4, npf = r == 0 && o + 8 <= O;
            float acc[16];
            const bf16 *x = X + r * I;
            switch (nr) {
            case 1: linear_bf16_tile_1(no, I, x, w, acc, pf, npf); break;
            case 2: linear_bf16_tile_2(no, I, x, w, acc, pf, npf); break;
            case 3: linear_bf16_tile_3(no, I, x, w, acc, pf, npf); break;
            default: linear_bf16_tile_4(no, I, x, w, acc, pf, npf); break;
            }
            for (int64_t a = 0; a < nr; a++)
                for (int64_t b = 0; b < no; b++)
                    Y[(r + a) * O + o + b] = f2bf(bias ? acc[a * 4 + b] + bf2f(bias[o + b]) : acc[a * 4 + b]);
        }
    }
}
#else
int tlt_linear_bf16_supported(void) { return 0; }

void tlt_linear_bf16(int64_t R, int64_t I, int64_t O, const bf16 *X, const bf16 *W, const bf16 *bias, bf16 *Y) {
    (void)R, (void)I, (void)O, (void)X, (void)W, (void)bias, (void)Y;
}
#endif

/* ---------------------------------------------------------------- bfloat16 linear on AMX tiles
 * Y[r, o] = bf16(sum_i X[r, i] * W[o, i] (+ bias[o])) with the weight pre-packed into AMX's pair-interleaved tiles
 * (`P`: [O/16][I/32] tiles of 16 x 32 pairs, see kernels.amx_pack); X [R, I] is copied into zero-padded blocks of 16
 * rows. Every row block meets the same tiles in the same order: a row's result does not depend on the others.
 *
 * Why: oneDNN's packed bf16 linear (also AMX) reads SmolLM2's weights at ~18 GB/s for any row count up to 64; a
 * tile multiply costs the same for 1 or 16 rows, so a linear over few rows is a stream over the weights, which
 * this loop reads sequentially (two output blocks at a time per thread). */
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg;

/* This thread's tile configuration: tiles 0 .. n-1 of 16 rows x 64 bytes (every AMX kernel here uses that shape). */
static void amx_load_config(int n) {
    amx_tilecfg cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < n; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* Linux gives a process AMX state only on request (torch's oneDNN makes the same request). 1: granted. */
int tlt_amx_init(void) {
    unsigned long bitmask = 0;
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return 0;
    if (syscall(SYS_arch_prctl, 0x1022 /* ARCH_GET_XCOMP_PERM */, &bitmask) != 0) return 0;
    return (bitmask & (1ul << 18)) != 0;
}

/* SwiGLU's activation on one output: bf16(bf16(silu(bf16(g))) * bf16(u)), tlt_silu_mul's rounding of an unfused
 * gate_up output. */
static inline bf16 silu_mul_one(float g, float u) {
    const float x = bf2f(f2bf(g));
    return f2bf(bf2f(f2bf(x / (1.f + exp_approx(-x)))) * bf2f(f2bf(u)));
}

/* M == 0: Y [R, O] = X W^T (+ bias). M > 0 (SwiGLU, W = [gate; up] with O = 2 M, M % 16 == 0, no bias):
 * Y [R, M] = silu(X W_gate^T) * (X W_up^T), the two halves' output blocks computed side by side, so that the
 * activation is applied as the sums leave the tiles instead of in a second pass over a [R, 2M] tensor.
 * Returns 0, or -1 when the padded copy of X could not be allocated (nothing written). */
static int linear_amx(int64_t R, int64_t I, int64_t O, const bf16 *X, const bf16 *P, const bf16 *bias, bf16 *Y,
                      int64_t M, float *Yf) {
    const int64_t KB = (I + 31) / 32, NB = (O + 15) / 16, RB = (R + 15) / 16, Ip = KB * 32;
    const int64_t MB = M / 16, pairs = M ? MB : (NB + 1) / 2, OY = M ? M : O;
    if (R == 0 || O == 0) return 0;
    bf16 *Xp = aligned_alloc(64, (size_t)(RB * 16 * Ip) * sizeof(bf16));
    if (Xp == NULL) return -1;
    memset(Xp, 0, (size_t)(RB * 16 * Ip) * sizeof(bf16));
    for (int64_t r = 0; r < R; r++) memcpy(Xp + r * Ip, X + r * I, (size_t)I * sizeof(bf16));
#pragma omp parallel if (O * I >= PAR_MIN)
    {
        amx_load_config(8);
        float acc[2][16 * 16] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t pair_i = 0; pair_i < pairs; pair_i++) {
            /* the two output blocks of this iteration: neighbours, or a gate block and its up block */
            const int64_t nb = M ? pair_i : 2 * pair_i, nb1 = M ? pair_i + MB : nb + 1;
            const int two = nb1 < NB;
            const bf16 *p0 = P + nb * KB * 512, *p1 = P + (two ? nb1 : nb) * KB * 512;
            for (int64_t rb = 0; rb < RB; rb += 2) {
                /* two row blocks share each weight tile when there are two (tiles 0-3: sums, 4-5: rows, 6-7: weights) */
                const int pair = rb + 1 < RB;
                const bf16 *xa = Xp + rb * 16 * Ip, *xb = xa + 16 * Ip;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t kb = 0; kb < KB; kb++) {
                    if (rb == 0)
                        for (int c = 0; c < 1024; c += 64) {
                            _mm_prefetch((const char *)(p0 + (kb + 2) * 512) + c, _MM_HINT_T0);
                            _mm_prefetch((const char *)(p1 + (kb + 2) * 512) + c, _MM_HINT_T0);
                        }
                    _tile_loadd(4, xa + kb * 32, Ip * (int64_t)sizeof(bf16));
                    _tile_loadd(6, p0 + kb * 512, 64);
                    _tile_loadd(7, p1 + kb * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    if (pair) {
                        _tile_loadd(5, xb + kb * 32, Ip * (int64_t)sizeof(bf16));
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                }
                for (int q = 0; q <= pair; q++) {
                    if (q == 0) {
                        _tile_stored(0, acc[0], 64);
                        _tile_stored(1, acc[1], 64);
                    } else {
                        _tile_stored(2, acc[0], 64);
                        _tile_stored(3, acc[1], 64);
                    }
                    const int64_t row0 = (rb + q) * 16, nrow = R - row0 < 16 ? R - row0 : 16;
                    if (M) {
                        for (int64_t r = 0; r < nrow; r++)
                            for (int64_t n = 0; n < 16; n++)
                                Y[(row0 + r) * OY + nb * 16 + n] = silu_mul_one(acc[0][r * 16 + n], acc[1][r * 16 + n]);
                        continue;
                    }
                    for (int h = 0; h <= two; h++) {
                        const int64_t o0 = (nb + h) * 16, no = O - o0 < 16 ? O - o0 : 16;
                        for (int64_t r = 0; r < nrow; r++)
                            for (int64_t n = 0; n < no; n++) {
                                const float v = acc[h][r * 16 + n];
                                const bf16 y = f2bf(bias ? v + bf2f(bias[o0 + n]) : v);
                                if (Yf)
                                    Yf[(row0 + r) * O + o0 + n] = bf2f(y);
                                else
                                    Y[(row0 + r) * O + o0 + n] = y;
                            }
                    }
                }
            }
        }
        _tile_release();
    }
    free(Xp);
    return 0;
}

int tlt_linear_amx(int64_t R, int64_t I, int64_t O, const bf16 *X, const bf16 *P, const bf16 *bias, bf16 *Y) {
    return linear_amx(R, I, O, X, P, bias, Y, 0, NULL);
}

/* tlt_linear_amx with each bf16 result widened to float32 as it is stored (an LM head's logits): the values of
 * linear_amx(...).float() without the bf16 tensor and the second pass. */
int tlt_linear_amx_f32out(int64_t R, int64_t I, int64_t O, const bf16 *X, const bf16 *P, const bf16 *bias, float *Y) {
    return linear_amx(R, I, O, X, P, bias, NULL, 0, Y);
}

/* Y [R, M] = silu(gate) * up of X [R, I] times the packed [gate; up] weight [2M, I]; M % 16 == 0 (else -2). */
int tlt_linear_amx_silu(int64_t R, int64_t I, int64_t M, const bf16 *X, const bf16 *P, bf16 *Y) {
    if (M % 16) return -2;
    return linear_amx(R, I, 2 * M, X, P, NULL, Y, M, NULL);
}
#else
int tlt_amx_init(void) { return 0; }

int tlt_linear_amx(int64_t R, int64_t I, int64_t O, const bf16 *X, const bf16 *P, const bf16 *bias, bf16 *Y) {
    (void)R, (void)I, (void)O, (void)X, (void)P, (void)bias, (void)Y;
    return -1;
}

int tlt_linear_amx_silu(int64_t R, int64_t I, int64_t M, const bf16 *X, const bf16 *P, bf16 *Y) {
    (void)R, (void)I, (void)M, (void)X, (void)P, (void)Y;
    return -1;
}

int tlt_linear_amx_f32out(int64_t R, int64_t I, int64_t O, const bf16 *X, const bf16 *P, const bf16 *bias, float *Y) {
    (void)R, (void)I, (void)O, (void)X, (void)P, (void)bias, (void)Y;
    return -1;
}
#endif

/* out[r, c] = Gumbel noise of stream states[r] at token cols[c] (n rows, m columns): a speculative round's drafter
 * needs its rows' noise on the draft vocabulary only. The same bits as tlt_seeded_gumbel_f32 at those tokens. */
void tlt_seeded_gumbel_cols_f32(int64_t n, int64_t m, const uint64_t *states, const int64_t *cols, float *out) {
#pragma omp parallel for schedule(static) if (n * m >= PAR_MIN)
    for (int64_t r = 0; r < n; r++) {
        const uint64_t st = states[r];
        float *restrict o = out + r * m;
#pragma omp simd
        for (int64_t c = 0; c < m; c++)
            o[c] = seeded_gumbel(st, cols[c]);
    }
}

/* ---------------------------------------------------------------- attention of few queries over the KV cache
 * out[n, h] = sum_j softmax_j(scale * q[n, h] . K[j]) V[j], for query n = b * T + t of sequence b (cache row
 * row0 + b, kv head h / (nh / kvh)) over the slots j < kv_len that mask[b, t, j] lets it see (mask NULL: all);
 * q and out [B * T, nh, d], caches [rows, kvh, L, d], bf16 in and out, float32 inside.
 *
 * Why: in a decode step of a large batch, attention reads every sequence's K and V once and does little
 * arithmetic, so it should run at the memory's speed; torch's flash kernel (built for long query blocks) reads
 * them at 5-9 GB/s for one query per sequence (SmolLM2, batch 64). Here one task is a (sequence, kv head):
 * its K and V are read from memory once, by the first of the G query heads that share them (GQA) and from cache
 * by the others; scores by AVX512-BF16 dot products, 16 keys at a time; a key range ends at the last visible
 * slot, so padding costs nothing.
 *
 * Each query's result depends only on its own q, mask row and keys, summed in one fixed order: a decode pass
 * (T = 1) and a verify pass (T > 1) compute bit-identical attention for the same query and keys at the same slots.
 * With `ordered`, also when hidden keys lie between them (a tree node's ancestors, spread over the tree's slots,
 * against the same tokens one after another in a decode pass): the softmax denominator is then one sum in key
 * order instead of 16 lanes, so the zeros of hidden keys change no bit; the other sums already run in key order
 * or per key.
 * d: 32, 64, 128 or 256. Returns 0; -1 when scratch memory could not be allocated; -2 for shapes it does not take. */
#if defined(__AVX512BF16__)
/* e[i] = sum of the 16 lanes of a[i], in one fixed order (pairs of lanes, then 128-bit lanes). */
static inline __m512 lane_sums16(const __m512 *a) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
    __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

#define PF_BLOCKS 4
/* Prefetch the 16 keys' K (to L1) and V (to L2) from slot j on, if below end. */
static inline void prefetch_kv(const bf16 *K, const bf16 *V, int64_t d, int64_t j, int64_t end) {
    if (j >= end) return;
    const char *k = (const char *)(K + j * d), *v = (const char *)(V + j * d);
    const int64_t n = (end - j < 16 ? end - j : 16) * d * (int64_t)sizeof(bf16);
    for (int64_t c = 0; c < n; c += 64) {
        _mm_prefetch(k + c, _MM_HINT_T0);
        _mm_prefetch(v + c, _MM_HINT_T1);
    }
}

/* Scores of keys j0 .. j0 + nb - 1 (nb <= 16) into s[j0 ..]: scaled, -inf where the mask row hides the key. */
static inline void store_scores(float *s, int64_t j0, int64_t nb, __m512 dots, __m512 vscale, const uint8_t *mrow) {
    const __mmask16 lanes = (__mmask16)(nb == 16 ? 0xffffu : (1u << nb) - 1u);
    __mmask16 vis = lanes;
    if (mrow) vis &= _mm_test_epi8_mask(_mm_maskz_loadu_epi8(lanes, mrow + j0), _mm_set1_epi8(1));
    _mm512_mask_storeu_ps(s + j0, lanes, _mm512_mask_blend_ps(vis, _mm512_set1_ps(-INFINITY), _mm512_mul_ps(dots, vscale)));
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__linux__)
#define ATTENTION_AMX 1
/* Scores of query vectors v0 .. v0 + nq - 1 (nq <= 16) on AMX: a tile of 16 keys (rows of K as they lie in the
 * cache, 32 dimensions per tile) times a tile of the queries (pair-interleaved, zero-padded to 16 columns); each
 * score depends only on its own key row and query column. Tiles: 0 sums, 1 keys, 2 queries (configured 16 x 64 B
 * by the caller). */
static void amx_scores(int64_t d, int64_t G, int64_t nh, int64_t v0, int64_t nq, const bf16 *qb, const bf16 *K,
                       const bf16 *V, const int64_t *ends, const uint8_t *mb, int64_t kv_len, float scale, float *S, int64_t E) {
    uint32_t Bq[8 * 256] __attribute__((aligned(64)));
    bf16 Kt[16 * 256] __attribute__((aligned(64)));
    float Cb[256] __attribute__((aligned(64)));
    const int64_t chunks = d / 32;
    for (int64_t c = 0; c < chunks; c++)
        for (int p = 0; p < 16; p++)
            for (int n = 0; n < 16; n++) {
                uint32_t w = 0;
                if (n < nq) {
                    const int64_t v = v0 + n;
                    memcpy(&w, qb + ((v / G) * nh + v % G) * d + 32 * c + 2 * p, 4);
                }
                Bq[c * 256 + p * 16 + n] = w;
            }
    int64_t Eg = 0;
    for (int64_t n = 0; n < nq; n++) Eg = ends[(v0 + n) / G] > Eg ? ends[(v0 + n) / G] : Eg;
    const __m512 vscale = _mm512_set1_ps(scale);
    const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
    for (int64_t j0 = 0; j0 < Eg; j0 += 16) {
        const int64_t nb = Eg - j0 < 16 ? Eg - j0 : 16;
        const bf16 *kp = K + j0 * d;
        if (nb < 16) { /* the last keys: copied so that the tile does not read past the cache */
            memset(Kt, 0, sizeof(bf16) * (size_t)(16 * d));
            memcpy(Kt, kp, sizeof(bf16) * (size_t)(nb * d));
            kp = Kt;
        }
        if (v0 == 0) prefetch_kv(K, V, d, j0 + PF_BLOCKS * 16, Eg);
        _tile_zero(0);
        for (int64_t c = 0; c < chunks; c++) {
            _tile_loadd(1, kp + 32 * c, d * (int64_t)sizeof(bf16));
            _tile_loadd(2, Bq + c * 256, 64);
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, Cb, 64);
        for (int64_t n = 0; n < nq; n++) {
            const int64_t v = v0 + n, t = v / G, end = ends[t];
            if (j0 >= end) continue;
            store_scores(S + v * E, j0, end - j0 < nb ? end - j0 : nb,
                         _mm512_i32gather_ps(_mm512_add_epi32(col, _mm512_set1_epi32((int)n)), Cb, 4), vscale,
                         mb ? mb + t * kv_len : NULL);
        }
    }
}
#endif

/* The last visible slot + 1 of a mask row (0: none visible). */
static inline int64_t visible_end(const uint8_t *m, int64_t kv_len) {
    if (!m) return kv_len;
    int64_t e = kv_len;
    while (e > 0 && !m[e - 1]) e--;
    return e;
}

/* One (sequence, kv head) task: the G query heads of each of the T queries (QV = T * G query vectors).
 * DW = d / 16 (a constant at each call site, so that the accumulators stay in registers).
 * S: QV x E floats (scores, then probabilities); Vf: 16 x d floats; acc: d floats. */
static inline __attribute__((always_inline)) void attention_task(
    const int DW, int use_amx, int ordered, int64_t T, int64_t G, int64_t nh, int64_t kv_len, const bf16 *qb, const bf16 *K,
    const bf16 *V, const uint8_t *mb, float scale, bf16 *ob, float *S, float *Vf, const int64_t *ends, int64_t E) {
    const int64_t d = DW * 16, QV = T * G;
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(scale);
    /* K and V are read from memory once per task, in 16-key blocks: ask for them PF_BLOCKS blocks ahead (the
     * hardware's prefetcher stops at every 4 KB page, and a task's K is only a few pages) */
    for (int64_t j = 0; j < PF_BLOCKS * 16 && j < E; j++)
        for (int64_t c = 0; c < d * (int64_t)sizeof(bf16); c += 64) {
            _mm_prefetch((const char *)(K + j * d) + c, _MM_HINT_T0);
            _mm_prefetch((const char *)(V + j * d) + c, _MM_HINT_T1);
        }
    /* scores: AMX, 16 query vectors at a time, or AVX512-BF16 dot products, one query vector at a time */
#ifdef ATTENTION_AMX
    if (use_amx)
        for (int64_t v0 = 0; v0 < QV; v0 += 16)
            amx_scores(d, G, nh, v0, QV - v0 < 16 ? QV - v0 : 16, qb, K, V, ends, mb, kv_len, scale, S, E);
#endif
    for (int64_t v = 0; v < QV && !use_amx; v++) {
        const int64_t t = v / G, h = v % G, end = ends[t];
        const bf16 *qp = qb + (t * nh + h) * d;
        __m512bh qv[8];
        for (int c = 0; c < DW / 2; c++) qv[c] = (__m512bh)_mm512_loadu_si512(qp + 32 * c);
        for (int64_t j0 = 0; j0 < end; j0 += 16) {
            const int64_t nb = end - j0 < 16 ? end - j0 : 16;
            if (v == 0) prefetch_kv(K, V, d, j0 + PF_BLOCKS * 16, end);
            __m512 a[16];
            for (int i = 0; i < 16; i++) {
                __m512 acc = _mm512_setzero_ps();
                if (i < nb)
                    for (int c = 0; c < DW / 2; c++)
                        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(K + (j0 + i) * d + 32 * c), qv[c]);
                a[i] = acc;
            }
            store_scores(S + v * E, j0, nb, lane_sums16(a), vscale, mb ? mb + t * kv_len : NULL);
        }
    }
    for (int64_t v = 0; v < QV; v++) {
        const int64_t end = ends[v / G];
        float *s = S + v * E;
        /* softmax: max, exp, sum, each in a fixed order */
        __m512 mx = neg_inf;
        int64_t j = 0;
        for (; j + 16 <= end; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
        float m = _mm512_reduce_max_ps(mx); /* max is exact in any order */
        for (; j < end; j++) m = s[j] > m ? s[j] : m;
        if (m == -INFINITY) { /* nothing visible: zeros */
            for (j = 0; j < end; j++) s[j] = 0.0f;
            continue;
        }
#pragma omp simd
        for (j = 0; j < end; j++) s[j] = s[j] == -INFINITY ? 0.0f : exp_approx(s[j] - m);
        float total = 0.0f;
        if (ordered) { /* one sum in key order: hidden keys (zeros) anywhere in between change no bit */
            for (j = 0; j < end; j++) total += s[j];
        } else {
            __m512 sum = _mm512_setzero_ps();
            for (j = 0; j + 16 <= end; j += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(s + j));
            if (j < end) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps((__mmask16)((1u << (end - j)) - 1u), s + j));
            total = lane_sum(sum);
        }
        const float inv = 1.0f / total;
        for (j = 0; j < end; j++) s[j] *= inv;
    }
    /* out = P V: V converted to float32 16 keys at a time, then used by every query vector; the query heads of
     * one query go QC at a time (QC x DW accumulators in registers, four independent FMA chains or more). */
    const int QC = DW >= 16 ? 1 : 16 / DW;
    float *acc = Vf + 16 * d;
    memset(acc, 0, sizeof(float) * (size_t)(QV * d));
    for (int64_t j0 = 0; j0 < E; j0 += 16) {
        const int64_t nb = E - j0 < 16 ? E - j0 : 16;
        for (int64_t i = 0; i < nb; i++)
            for (int c = 0; c < DW; c++) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(V + (j0 + i) * d + 16 * c));
                _mm512_storeu_ps(Vf + i * d + 16 * c, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
            }
        for (int64_t t = 0; t < T; t++) {
            if (j0 >= ends[t]) continue;
            const int64_t n = ends[t] - j0 < nb ? ends[t] - j0 : nb;
            for (int64_t h0 = 0; h0 < G; h0 += QC) {
                const int64_t v0 = t * G + h0, nq = G - h0 < QC ? G - h0 : QC;
                __m512 o[16];
                for (int e = 0; e < QC; e++)
                    for (int c = 0; c < DW; c++)
                        o[e * DW + c] = e < nq ? _mm512_loadu_ps(acc + (v0 + e) * d + 16 * c) : _mm512_setzero_ps();
                for (int64_t i = 0; i < n; i++) {
                    for (int e = 0; e < QC; e++) {
                        if (e >= nq) break;
                        const __m512 pi = _mm512_set1_ps(S[(v0 + e) * E + j0 + i]);
                        for (int c = 0; c < DW; c++)
                            o[e * DW + c] = _mm512_fmadd_ps(pi, _mm512_loadu_ps(Vf + i * d + 16 * c), o[e * DW + c]);
                    }
                }
                for (int e = 0; e < QC; e++)
                    if (e < nq)
                        for (int c = 0; c < DW; c++) _mm512_storeu_ps(acc + (v0 + e) * d + 16 * c, o[e * DW + c]);
            }
        }
    }
    for (int64_t v = 0; v < QV; v++) {
        bf16 *op = ob + ((v / G) * nh + v % G) * d;
        for (int64_t c = 0; c < d; c++) op[c] = f2bf(acc[v * d + c]);
    }
}

int tlt_attention_supported(void) { return 1; }

int tlt_attention_bf16(int64_t B, int64_t T, int64_t nh, int64_t kvh, int64_t d, int64_t L, int64_t kv_len,
                       const bf16 *q, const bf16 *kc, const bf16 *vc, int64_t row0, const uint8_t *mask, float scale,
                       int use_amx, int ordered, bf16 *out) {
#ifndef ATTENTION_AMX
    use_amx = 0;
#endif
    if ((d != 32 && d != 64 && d != 128 && d != 256) || nh % kvh || kv_len > L) return -2;
    const int64_t G = nh / kvh, tasks = B * kvh;
    int failed = 0;
#pragma omp parallel if (tasks > 1 && B * T * nh * kv_len * d >= PAR_MIN)
    {
        int64_t E_max = 0;
        float *buf = malloc(sizeof(float) * (size_t)(T * G * kv_len + 16 * d + T * G * d));
        int64_t *ends = malloc(sizeof(int64_t) * (size_t)T);
        if (!buf || !ends) {
#pragma omp atomic write
            failed = 1;
        }
#ifdef ATTENTION_AMX
        if (use_amx) amx_load_config(3);
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            if (!buf || !ends) continue;
            const int64_t b = task / kvh, g = task % kvh;
            const uint8_t *mb = mask ? mask + b * T * kv_len : NULL;
            E_max = 0;
            for (int64_t t = 0; t < T; t++) {
                ends[t] = visible_end(mb ? mb + t * kv_len : NULL, kv_len);
                E_max = ends[t] > E_max ? ends[t] : E_max;
            }
            const bf16 *qb = q + (b * T * nh + g * G) * d, *K = kc + ((row0 + b) * kvh + g) * L * d,
                       *V = vc + ((row0 + b) * kvh + g) * L * d;
            bf16 *ob = out + (b * T * nh + g * G) * d;
            float *S = buf, *Vf = buf + T * G * E_max;
            switch (d / 16) {
            case 2: attention_task(2, use_amx, ordered, T, G, nh, kv_len, qb, K, V, mb, scale, ob, S, Vf, ends, E_max); break;
            case 4: attention_task(4, use_amx, ordered, T, G, nh, kv_len, qb, K, V, mb, scale, ob, S, Vf, ends, E_max); break;
            case 8: attention_task(8, use_amx, ordered, T, G, nh, kv_len, qb, K, V, mb, scale, ob, S, Vf, ends, E_max); break;
            default: attention_task(16, use_amx, ordered, T, G, nh, kv_len, qb, K, V, mb, scale, ob, S, Vf, ends, E_max); break;
            }
        }
#ifdef ATTENTION_AMX
        if (use_amx) _tile_release();
#endif
        free(buf);
        free(ends);
    }
    return failed ? -1 : 0;
}
#else
int tlt_attention_supported(void) { return 0; }

int tlt_attention_bf16(int64_t B, int64_t T, int64_t nh, int64_t kvh, int64_t d, int64_t L, int64_t kv_len,
                       const bf16 *q, const bf16 *kc, const bf16 *vc, int64_t row0, const uint8_t *mask, float scale,
                       int use_amx, int ordered, bf16 *out) {
    (void)use_amx, (void)ordered, (void)B, (void)T, (void)nh, (void)kvh, (void)d, (void)L, (void)kv_len, (void)q, (void)kc, (void)vc, (void)row0;
    (void)mask, (void)scale, (void)out;
    return -1;
}
#endif

/* ---------------------------------------------------------------- one decoder layer in one call
 * `fused_layer` (models/decoder.py) for passes whose linears all run on the kernels above (`mode` 0: AVX512-BF16
 * `tlt_linear_bf16`, 1: AMX `tlt_linear_amx`; `gu_fused`: gate_up with its activation on AMX) and whose attention
 * runs on `tlt_attention_bf16`: the same kernels in the same order on the same values, so the same bits, without
 * the ~8 Python calls around them (at batch 1 the Python share of a decode step was ~2 of 13 ms).
 * x [N, H] and delta (the previous layer's MLP output, NULL: none) in; x_out (the residual after attention) and
 * delta_out (this layer's MLP output) out. w_*: plain weights [out, in]; t_*: their AMX tiles (or NULL).
 * Returns 0; -1 when scratch memory could not be allocated; -2 for shapes the kernels do not take. */
static int linear_mode(int mode, int64_t R, int64_t I, int64_t O, const bf16 *X, const bf16 *W, const bf16 *P,
                       const bf16 *bias, bf16 *Y) {
    if (mode == 1) return tlt_linear_amx(R, I, O, X, P, bias, Y);
    tlt_linear_bf16(R, I, O, X, W, bias, Y);
    return 0;
}

int tlt_decoder_layer_bf16(int64_t B, int64_t T, int64_t H, int64_t nh, int64_t kvh, int64_t d, int64_t inter,
                           int mode, int gu_fused, const bf16 *x, const bf16 *delta, bf16 *x_out, bf16 *delta_out,
                           const bf16 *in_w, float in_eps, const bf16 *w_qkv, const bf16 *t_qkv, const bf16 *b_qkv,
                           const bf16 *w_o, const bf16 *t_o, const bf16 *post_w, float post_eps, const bf16 *w_gu,
                           const bf16 *t_gu, const bf16 *w_down, const bf16 *t_down, const bf16 *cos_t,
                           const bf16 *sin_t, const int64_t *pos, const int64_t *rows, const int64_t *slots,
                           bf16 *k_cache, bf16 *v_cache, int64_t max_len, int64_t row_start, int64_t kv_len,
                           const uint8_t *mask, float scale, int use_amx_attn, int ordered) {
    const int64_t N = B * T, Q = (nh + 2 * kvh) * d, A = nh * d;
    const int64_t gu_w = gu_fused ? 0 : 2 * inter;
    bf16 *buf = malloc(sizeof(bf16) * (size_t)(N * (3 * H + Q + 2 * A + H + inter + gu_w)));
    if (!buf) return -1;
    bf16 *x1 = buf, *h = x1 + N * H, *h2 = h + N * H, *qkv = h2 + N * H, *q = qkv + N * Q, *attn = q + N * A,
         *o = attn + N * A, *act = o + N * H, *gu = act + N * inter;
    int rc = 0;
    tlt_add_rms_norm(N, H, x, delta, x1, h, in_w, in_eps);
    if ((rc = linear_mode(mode, N, H, Q, h, w_qkv, t_qkv, b_qkv, qkv))) goto done;
    tlt_rope_kv(N, nh, kvh, d, qkv, cos_t, sin_t, pos, rows, slots, q, k_cache, v_cache, max_len);
    if ((rc = tlt_attention_bf16(B, T, nh, kvh, d, max_len, kv_len, q, k_cache, v_cache, row_start, mask, scale,
                                 use_amx_attn, ordered, attn)))
        goto done;
    if ((rc = linear_mode(mode, N, A, H, attn, w_o, t_o, NULL, o))) goto done;
    tlt_add_rms_norm(N, H, x1, o, x_out, h2, post_w, post_eps);
    if (gu_fused) {
        if ((rc = tlt_linear_amx_silu(N, H, inter, h2, t_gu, act))) goto done;
    } else {
        if ((rc = linear_mode(mode, N, H, 2 * inter, h2, w_gu, t_gu, NULL, gu))) goto done;
        tlt_silu_mul(N, inter, gu, act);
    }
    rc = linear_mode(mode, N, inter, H, act, w_down, t_down, NULL, delta_out);
done:
    free(buf);
    return rc;
}
