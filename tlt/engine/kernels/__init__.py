"""Fused CPU kernels (cpu_kernels.c), built on first use.

Why: on a 2-core CPU a decode step of a small model is ~40 tiny torch ops per layer around 4 matmuls,
and their dispatch costs as much as the matmuls. Three fused bfloat16 kernels (residual add + RMSNorm,
rotary + KV-cache write, SiLU x up) cut that to a handful of calls per layer. The others serve sampling: a
row-parallel argmax, and seeded Gumbel noise (materialised, or fused into the argmax of a Gumbel-max draw)
written so that the numpy fallback in sampling.py gives the same bits: no sample depends on whether a
compiler was there. And one float32 linear for a few rows (decode and verify passes), which reads each
weight row once for all rows where torch's float32 GEMM is ~1.7x slower at 4-16 rows than at one. Bfloat16 few-row
linears (AVX512-BF16, AMX) likewise, and the attention of decode and verify passes over the KV cache (`attention`),
which torch's flash kernel reads at a fraction of the memory's speed when each sequence has one query.

The C file is compiled with the system C compiler into a per-user cache the first time it is needed
(~0.3 s) and loaded with ctypes: no torch headers, no build step at install time. Without a compiler,
or with `TLT_CPU_KERNELS=0`, `available()` is False and the model keeps its pure-torch path. In float32
only the linear is used (its results are float32 sums in another order than torch's: tests compare with
transformers within float32 rounding, and generations token for token).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

logger = logging.getLogger(__name__)

_SRC = os.path.join(os.path.dirname(__file__), "cpu_kernels.c")
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math",
          "-shared", "-fPIC"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    "tlt_add_rms_norm": [_i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _f32],
    "tlt_rope_kv": [_i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64],
    "tlt_silu_mul": [_i64, _i64, _ptr, _ptr],
    "tlt_argmax_f32": [_i64, _i64, _ptr, _ptr],
    "tlt_kv_move": [_i64, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr],
    "tlt_seeded_gumbel_f32": [_i64, _i64, _ptr, _ptr],
    "tlt_seeded_gumbel_argmax": [_i64, _i64, _ptr, _ptr, _ptr, ctypes.c_int],
    "tlt_linear_f32": [_i64, _i64, _i64, _ptr, _ptr, _ptr],
    "tlt_linear_bf16": [_i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr],
    "tlt_linear_amx": [_i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr],
    "tlt_linear_amx_silu": [_i64, _i64, _i64, _ptr, _ptr, _ptr],
    "tlt_linear_amx_f32out": [_i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr],
    "tlt_seeded_gumbel_cols_f32": [_i64, _i64, _ptr, _ptr, _ptr],
    # shapes (7), mode and gu_fused, x / delta / x_out / delta_out, input norm (weight, eps), qkv (w, tiles, bias),
    # o (w, tiles), post norm (weight, eps), gate_up and down (w, tiles each), rotary tables, positions / rows /
    # slots, K and V caches, max_len / row_start / kv_len, mask, scale, AMX attention, ordered sums
    "tlt_decoder_layer_bf16": [_i64] * 7 + [ctypes.c_int] * 2 + [_ptr] * 4 + [_ptr, _f32] + [_ptr] * 5 + [_ptr, _f32]
                              + [_ptr] * 4 + [_ptr] * 2 + [_ptr] * 3 + [_ptr] * 2 + [_i64] * 3
                              + [_ptr, _f32, ctypes.c_int, ctypes.c_int],
    "tlt_attention_bf16": [_i64, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _f32, ctypes.c_int,
                           ctypes.c_int, _ptr],
}


def _cache_dir() -> str:
    root = os.environ.get("TLT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tlt")
    return os.path.join(root, "kernels")


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        logger.info("no C compiler: fused CPU kernels off, pure-torch decode path")
        return None
    with open(_SRC, "rb") as f:
        src = f.read()
    # -march=native: the library is only valid on this CPU model, so the CPU is part of the key.
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + _cpu_id().encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"tlt_cpu_kernels_{key}.so")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
        os.close(fd)
        try:
            subprocess.run([cc, *_FLAGS, "-o", tmp, _SRC], check=True, capture_output=True, timeout=120)
            os.replace(tmp, path)  # atomic: a concurrent process sees no half-written library
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            logger.warning("building fused CPU kernels failed (%s %s): pure-torch decode path", e,
                           err.decode(errors="replace")[-500:])
            if os.path.exists(tmp):
                os.unlink(tmp)
            return None
    lib = ctypes.CDLL(path)
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    lib.tlt_amx_init.argtypes, lib.tlt_amx_init.restype = [], ctypes.c_int
    lib.tlt_linear_amx.restype = ctypes.c_int
    lib.tlt_linear_amx_silu.restype = ctypes.c_int
    lib.tlt_linear_amx_f32out.restype = ctypes.c_int
    lib.tlt_decoder_layer_bf16.restype = ctypes.c_int
    lib.tlt_linear_bf16_supported.argtypes, lib.tlt_linear_bf16_supported.restype = [], ctypes.c_int
    lib.tlt_attention_supported.argtypes, lib.tlt_attention_supported.restype = [], ctypes.c_int
    lib.tlt_attention_bf16.restype = ctypes.c_int
    return lib


def _cpu_id() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    flags += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return platform.machine() + flags


def available() -> bool:
    """True when the kernels are built and loaded (builds them on the first call)."""
    global _lib, _tried
    if os.environ.get("TLT_CPU_KERNELS", "1") == "0":
        return False
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _build()
                except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
                    logger.warning("fused CPU kernels unavailable (%s): pure-torch decode path", e)
                    _lib = None
                _tried = True
    return _lib is not None


def _check(*tensors: torch.Tensor) -> None:
    if _lib is None and not available():
        raise RuntimeError("fused CPU kernels are not available (no C compiler, or TLT_CPU_KERNELS=0)")
    for t in tensors:
        if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"fused CPU kernels need contiguous bfloat16 CPU tensors, got {t.dtype} "
                             f"{t.device} contiguous={t.is_contiguous()}")


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * weight) for x [N, H] bf16; delta None: no add. New tensors."""
    _check(x, weight, *(() if delta is None else (delta,)))
    n, h = x.shape
    x_out, out = torch.empty_like(x), torch.empty_like(x)
    _lib.tlt_add_rms_norm(n, h, x.data_ptr(), None if delta is None else delta.data_ptr(), x_out.data_ptr(),
                          out.data_ptr(), weight.data_ptr(), eps)
    return x_out, out


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
            rows: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            num_heads: int) -> torch.Tensor:
    """qkv [N, (heads + 2 kv_heads) * D] -> rotated q [N, heads, D]; rotated k and v written to
    cache[rows[t], :, slots[t]] (cache [rows, kv_heads, max_len, D]). positions/rows/slots: int64 [N]."""
    _check(qkv, cos, sin, k_cache, v_cache)
    R, kvh, max_len, d = k_cache.shape
    n = qkv.shape[0]
    for t in (positions, rows, slots):
        if t.dtype != torch.int64 or not t.is_contiguous() or t.numel() != n:
            raise ValueError("positions, rows and slots must be contiguous int64 [N]")
    if qkv.shape[1] != (num_heads + 2 * kvh) * d:
        raise ValueError("qkv width does not match the cache's heads")
    q = torch.empty((n, num_heads, d), dtype=qkv.dtype)
    _lib.tlt_rope_kv(n, num_heads, kvh, d, qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(),
                     rows.data_ptr(), slots.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                     max_len)
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[N, 2M] = [gate | up] -> silu(gate) * up [N, M]."""
    _check(gate_up)
    n, two_m = gate_up.shape
    out = torch.empty((n, two_m // 2), dtype=gate_up.dtype)
    _lib.tlt_silu_mul(n, two_m // 2, gate_up.data_ptr(), out.data_ptr())
    return out


def kv_move(caches: list[torch.Tensor], rows: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> None:
    """In every cache [R, kv_heads, max_len, D] (CPU, contiguous, one shape and dtype), copy slot src[i] of row rows[i]
    to slot dst[i] for all kv heads, moves in order (int64 [n] each): `cache[rows, :, dst] = cache[rows, :, src]` for
    all caches in one call."""
    if not caches or len(rows) == 0:
        return
    c0 = caches[0]
    R, kvh, max_len, d = c0.shape
    if any(c.shape != c0.shape or c.dtype != c0.dtype or c.device.type != "cpu" or not c.is_contiguous()
           for c in caches):
        raise ValueError("kv_move: caches must be contiguous CPU tensors of one shape and dtype")
    idx = [t.to(torch.int64).contiguous() for t in (rows, dst, src)]
    if len({len(t) for t in idx}) != 1:
        raise ValueError("kv_move: rows, dst and src must have one length")
    if int(idx[0].min()) < 0 or int(idx[0].max()) >= R or min(int(t.min()) for t in idx[1:]) < 0 or max(
            int(t.max()) for t in idx[1:]) >= max_len:
        raise IndexError("kv_move: a row or slot outside the cache")
    ptrs = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64)
    _lib.tlt_kv_move(len(caches), ptrs.data_ptr(), kvh, max_len, d * c0.element_size(), len(idx[0]),
                     *(t.data_ptr() for t in idx))


def argmax(x: torch.Tensor) -> torch.Tensor:
    """First index of the row maximum of a contiguous float32 CPU x [n, v] -> int64 [n] (NaN wins, as torch)."""
    _check()
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.dim() != 2:
        raise ValueError("argmax kernel needs a contiguous float32 CPU [n, v] tensor")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _lib.tlt_argmax_f32(x.shape[0], x.shape[1], x.data_ptr(), out.data_ptr())
    return out


def _check_states(states: torch.Tensor) -> None:
    if states.dtype != torch.int64 or states.device.type != "cpu" or not states.is_contiguous() or states.dim() != 1:
        raise ValueError("stream states must be a contiguous int64 CPU [n] tensor (uint64 bits)")


def seeded_gumbel(states: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel noise of each stream (see sampling.seeded_gumbel_rows): int64 states [n] (uint64 bits, two's
    complement) -> float32 [n, vocab_size]."""
    _check()
    _check_states(states)
    out = torch.empty((states.shape[0], vocab_size), dtype=torch.float32)
    _lib.tlt_seeded_gumbel_f32(states.shape[0], vocab_size, states.data_ptr(), out.data_ptr())
    return out


def seeded_gumbel_cols(states: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`seeded_gumbel` at the tokens `cols` only (int64 [m]) -> float32 [n, m]."""
    _check()
    _check_states(states)
    if cols.dtype != torch.int64 or cols.device.type != "cpu" or not cols.is_contiguous() or cols.dim() != 1:
        raise ValueError("cols must be a contiguous int64 CPU [m] tensor")
    out = torch.empty((states.shape[0], cols.shape[0]), dtype=torch.float32)
    _lib.tlt_seeded_gumbel_cols_f32(states.shape[0], cols.shape[0], states.data_ptr(), cols.data_ptr(), out.data_ptr())
    return out


def seeded_gumbel_argmax(x: torch.Tensor, states: torch.Tensor, skip: bool = True) -> torch.Tensor:
    """First argmax of x [n, v] (float32) + each row's stream noise, without materialising the noise:
    equal to argmax(x + seeded_gumbel(states, v)) -> int64 [n]. `skip`: compute only the noise that can decide the
    draw (tokens near the row's best score, or with a noise large enough to reach it: the same token, proven in
    tlt_seeded_gumbel_argmax and tested against skip=False)."""
    _check()
    _check_states(states)
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.dim() != 2:
        raise ValueError("seeded_gumbel_argmax needs a contiguous float32 CPU [n, v] tensor")
    if states.shape[0] != x.shape[0]:
        raise ValueError("one stream state per row")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _lib.tlt_seeded_gumbel_argmax(x.shape[0], x.shape[1], x.data_ptr(), states.data_ptr(), out.data_ptr(),
                                  int(skip))
    return out


def linear_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, I] @ weight [O, I].T -> [R, O], float32, each output summed in an order that does not depend on R
    (see tlt_linear_f32): for the few rows of decode and verify passes."""
    _check()
    for t in (x, weight):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.dim() != 2:
            raise ValueError("linear_f32 needs contiguous float32 CPU [R, I] and [O, I] tensors")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_f32: x has {x.shape[1]} features, the weight {weight.shape[1]}")
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
    _lib.tlt_linear_f32(x.shape[0], x.shape[1], weight.shape[0], x.data_ptr(), weight.data_ptr(), out.data_ptr())
    return out


def linear_bf16_available() -> bool:
    """True when the kernels are built for a CPU with AVX512-BF16 (`linear_bf16`)."""
    return available() and bool(_lib.tlt_linear_bf16_supported())


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, I] @ weight [O, I].T (+ bias) -> [R, O], bfloat16 in and out, float32 sums rounded once; each row's
    result independent of the others (see tlt_linear_bf16): for the few rows of decode and verify passes."""
    if not linear_bf16_available():
        raise RuntimeError("the bfloat16 linear kernel needs the C kernels on a CPU with AVX512-BF16")
    _check(x, weight, *(() if bias is None else (bias,)))
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_bf16: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError("linear_bf16: one bias per output")
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.bfloat16)
    _lib.tlt_linear_bf16(x.shape[0], x.shape[1], weight.shape[0], x.data_ptr(), weight.data_ptr(),
                         None if bias is None else bias.data_ptr(), out.data_ptr())
    return out


_amx: bool | None = None


def amx_available() -> bool:
    """True when the kernels are built with AMX and the OS granted this process AMX state (`linear_amx`)."""
    global _amx
    if _amx is None:
        _amx = available() and bool(_lib.tlt_amx_init())
    return _amx


def amx_pack(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [O, I] -> AMX tiles [ceil(O/16), ceil(I/32), 16, 16, 2]: tile (n, k) holds, at [kk, j, p],
    weight[16 n + j, 32 k + 2 kk + p] (zero-padded), the pair-interleaved layout TDPBF16PS reads."""
    n_out, n_in = weight.shape
    nb, kb = -(-n_out // 16), -(-n_in // 32)
    w = torch.zeros((nb * 16, kb * 32), dtype=torch.bfloat16)
    w[:n_out, :n_in] = weight
    return w.view(nb, 16, kb, 16, 2).permute(0, 2, 3, 1, 4).contiguous()


def linear_amx(x: torch.Tensor, packed: torch.Tensor, out_features: int,
               bias: torch.Tensor | None = None, float_out: bool = False) -> torch.Tensor:
    """x [R, I] @ W^T (+ bias) -> [R, out_features], bf16 in and out, float32 sums rounded once, with W given as
    `amx_pack(W)`; each row's result independent of the others (see tlt_linear_amx). `float_out`: the same values
    widened to float32 as they are stored (= `linear_amx(...).float()` in one pass: an LM head's logits)."""
    if not amx_available():
        raise RuntimeError("the AMX linear needs the C kernels built with AMX and the OS's permission")
    _check(x, packed, *(() if bias is None else (bias,)))
    if x.dim() != 2 or packed.dim() != 5 or packed.shape != (-(-out_features // 16), -(-x.shape[1] // 32), 16, 16, 2):
        raise ValueError(f"linear_amx: x {tuple(x.shape)} does not match packed tiles {tuple(packed.shape)}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError("linear_amx: one bias per output")
    out = torch.empty((x.shape[0], out_features), dtype=torch.float32 if float_out else torch.bfloat16)
    fn = _lib.tlt_linear_amx_f32out if float_out else _lib.tlt_linear_amx
    if fn(x.shape[0], x.shape[1], out_features, x.data_ptr(), packed.data_ptr(),
          None if bias is None else bias.data_ptr(), out.data_ptr()) != 0:
        raise MemoryError("linear_amx: no memory for the padded rows")
    return out


def linear_amx_silu(x: torch.Tensor, packed: torch.Tensor, half: int) -> torch.Tensor:
    """SwiGLU's gate_up linear and activation in one pass: x [R, I] with W = [gate; up] [2 half, I] given as
    `amx_pack(W)` -> silu(x W_gate^T) * (x W_up^T) [R, half], bit-identical to `silu_mul(linear_amx(x, packed,
    2 half))` without the [R, 2 half] intermediate. half % 16 == 0."""
    if not amx_available():
        raise RuntimeError("the AMX linear needs the C kernels built with AMX and the OS's permission")
    _check(x, packed)
    if half % 16 or x.dim() != 2 or packed.dim() != 5 or packed.shape != (2 * half // 16, -(-x.shape[1] // 32), 16,
                                                                            16, 2):
        raise ValueError(f"linear_amx_silu: x {tuple(x.shape)}, tiles {tuple(packed.shape)}, half {half} do not fit")
    out = torch.empty((x.shape[0], half), dtype=torch.bfloat16)
    if _lib.tlt_linear_amx_silu(x.shape[0], x.shape[1], half, x.data_ptr(), packed.data_ptr(), out.data_ptr()) != 0:
        raise MemoryError("linear_amx_silu: no memory for the padded rows")
    return out


ATTENTION_HEAD_DIMS = (32, 64, 128, 256)
ATTENTION_CHUNK = 64  # queries per sequence per kernel call


def attention_available(head_dim: int) -> bool:
    """True when `attention` runs here (AVX512-BF16) for this head size."""
    return head_dim in ATTENTION_HEAD_DIMS and available() and bool(_lib.tlt_attention_supported())


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, row_start: int, kv_len: int,
              mask: torch.Tensor | None, scale: float | None = None, amx: bool | None = None,
              ordered: bool = False) -> torch.Tensor:
    """Attention of few queries per sequence over the KV cache (decode and verify passes; see
    tlt_attention_bf16): q [B, T, heads, D] bf16, caches [rows, kv_heads, max_len, D] bf16, sequence b in cache row
    row_start + b, keys at slots < kv_len where the bool mask [B, T, kv_len] is True (None: all) -> [B, T, heads, D].
    Each query's result is independent of the batch and of T. Scores on AMX where the CPU has it (`amx`: None),
    else (or with amx=False) by AVX512-BF16 dot products: the two round differently. `ordered`: the softmax
    denominator summed in key order, so that hidden keys between visible ones change nothing (a tree node against
    the same tokens decoded one by one; see tlt_attention_bf16)."""
    B, T, nh, d = q.shape
    R, kvh, max_len, dk = k_cache.shape
    if not attention_available(d):
        raise RuntimeError(f"the attention kernel needs the C kernels on a CPU with AVX512-BF16 and head_dim in "
                           f"{ATTENTION_HEAD_DIMS}")
    _check(q, k_cache, v_cache)
    fits = 0 <= row_start <= R - B and 0 < kv_len <= max_len
    if v_cache.shape != k_cache.shape or dk != d or nh % kvh or not fits:
        raise ValueError(f"attention: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}, rows from {row_start}, "
                         f"kv_len {kv_len} do not fit")
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (B, T, kv_len):
            raise ValueError(f"attention: mask must be bool [B, T, kv_len] = {(B, T, kv_len)}")
        mask = mask.contiguous()
    out = torch.empty_like(q)
    use_amx = amx_available() if amx is None else amx and amx_available()
    # Many queries (a batch-invariant prefill) go ATTENTION_CHUNK at a time, which bounds the scores' scratch memory
    # and changes no bit: each query's result is independent of the others.
    for t0 in range(0, T, ATTENTION_CHUNK):
        t1 = min(T, t0 + ATTENTION_CHUNK)
        qc = q if t1 - t0 == T else q[:, t0:t1].contiguous()
        mc = mask if mask is None or t1 - t0 == T else mask[:, t0:t1].contiguous()
        oc = out if t1 - t0 == T else torch.empty_like(qc)
        rc = _lib.tlt_attention_bf16(B, t1 - t0, nh, kvh, d, max_len, kv_len, qc.data_ptr(), k_cache.data_ptr(),
                                     v_cache.data_ptr(), row_start, None if mc is None else mc.data_ptr(),
                                     d ** -0.5 if scale is None else scale, int(use_amx), int(ordered), oc.data_ptr())
        if rc == -1:
            raise MemoryError("attention: no memory for the scores")
        if rc != 0:
            raise ValueError("attention: shapes the kernel does not take")
        if oc is not out:
            out[:, t0:t1] = oc
    return out


def decoder_layer(shape: tuple, mode: int, gu_fused: bool, x: torch.Tensor, delta: torch.Tensor | None,
                  x_out: torch.Tensor, delta_out: torch.Tensor, weights: tuple, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, row_start: int, kv_len: int, mask: torch.Tensor, ordered: bool) -> None:
    """One decoder layer in one C call (tlt_decoder_layer_bf16): what `fused_layer` computes with mode 0 (AVX512-BF16
    linears) or 1 (AMX), bit for bit. Internal fast path: the caller (DecoderLM._forward_fused) has checked the
    tensors once per pass; `weights` = `DecoderLM`'s per-layer pointer tuple (in_w, in_eps, w_qkv, t_qkv, b_qkv, w_o,
    t_o, post_w, post_eps, w_gu, t_gu, w_down, t_down, intermediate size); x_out/delta_out are written."""
    B, T, nh, kvh, d = shape
    (in_w, in_eps, w_qkv, t_qkv, b_qkv, w_o, t_o, post_w, post_eps, w_gu, t_gu, w_down, t_down, inter) = weights
    rc = _lib.tlt_decoder_layer_bf16(
        B, T, x.shape[1], nh, kvh, d, inter, mode, int(gu_fused), x.data_ptr(), None if delta is None else
        delta.data_ptr(), x_out.data_ptr(), delta_out.data_ptr(), in_w, in_eps, w_qkv, t_qkv, b_qkv, w_o, t_o, post_w,
        post_eps, w_gu, t_gu, w_down, t_down, cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), rows.data_ptr(),
        slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[2], row_start, kv_len,
        mask.data_ptr(), d ** -0.5, int(amx_available()), int(ordered))
    if rc == -1:
        raise MemoryError("decoder_layer: no memory for the layer's scratch")
    if rc != 0:
        raise ValueError("decoder_layer: shapes the kernels do not take")
