"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2/2.5, Qwen3) with an in-place KV cache.

q/k/v and gate/up are fused into one matmul each (fewer kernel launches per layer); the mapping to and
from the HF checkpoint names lives in `hf_weight_map`, so that everything outside this module speaks HF
names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tlt.engine import kernels
from tlt.engine.models.model_config import ModelConfig
from tlt.engine.models.rope import RotaryTable, apply_rotary

try:  # the oneDNN linear on a pre-packed weight (CPU builds with oneDNN)
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default
except (AttributeError, RuntimeError):
    _ONEDNN_LINEAR = None

# Passes of up to this many tokens take the fused bf16 kernels. Once 512: the kernels were single-threaded
# then, and a long prefill ran faster on torch's two-thread ops. Since they run on torch's OpenMP pool, the
# fused path is faster at every size measured (session 5, 2 cores: 64 chat prompts 0.54 vs 0.72 s, one
# 2000-token prompt 0.84-0.94 vs 1.02-1.10 s, 256 x 40 tokens 2.6 vs 3.8 s): the bound is now just the
# largest prefill batch.
FUSED_MAX_TOKENS = 1 << 16


@dataclass
class AttentionBatch:
    """Where one forward pass reads and writes the KV cache.

    The batch occupies cache rows [row_start, row_start + B). Query token t of row b has rotary position
    `positions[b, t]`; its K/V are written at cache slot `slots[b, t]` (the same as the position, except
    for the nodes of a speculative tree, which share positions). `mask[b, 0, t, j]` says whether that
    query may attend to cache slot j < `kv_len` (causal + padding, or a tree mask).
    """

    row_start: int
    positions: torch.Tensor  # [B, T] int64
    mask: torch.Tensor  # [B, 1, T, kv_len] bool
    kv_len: int
    write_rows: torch.Tensor  # [B, T] int64, absolute cache rows (broadcast of row ids)
    slots: torch.Tensor | None = None  # [B, T] int64; None: = positions


def onednn_packing_available() -> bool:
    """This torch build can pre-pack weights with oneDNN and run its linear on them."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and _ONEDNN_LINEAR is not None)


def cpu_packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN can pre-pack bf16/fp16 weights on CPU; its GEMV is ~2x faster than the plain path."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and onednn_packing_available()


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ b) with a oneDNN pre-packed W: the op overload directly (a custom-op wrapper cost ~15 us a
    call in eager mode)."""
    return _ONEDNN_LINEAR(x, packed, bias, "none", [], "")


# bfloat16 on CPU, by rows per pass (SmolLM2's 30 layers, weights from memory; `benchmarks/linear_fp32.py --dtype
# bfloat16`): oneDNN's packed linear (AMX) reads the weights at ~18 GB/s for any row count up to 16 (~11.5 ms
# per pass). `kernels.linear_bf16` (AVX512-BF16) streams them for one row (8.3 ms) but is arithmetic-bound above
# 4; `kernels.linear_amx` (AMX tiles, tlt's own packing) takes ~9.3 ms for 2-16 rows and 11.3 ms at 32. So: one
# row AVX512, 2..AMX_ROWS rows AMX, more rows oneDNN (without AMX: AVX512 up to BF16_KERNEL_ROWS rows).
# AMX_ROWS was 32 until the whole layer became one C call (`kernels.decoder_layer`, AMX passes only): since then
# 33-64 rows gain from it too (whole decode steps, two threads, alternating runs: batch 48 1025-1035 -> 1179-1201
# tok/s, batch 64 1063-1135 -> 1166-1206; one thread, a tree s4k2n8 round at batch 8 = 64 rows: +9-11%), while at
# 96-128 rows oneDNN stays as fast or faster. Passes of 33-64 rows outside the C call (prompts of 33-64 tokens,
# prefilled through `fused_layer`) take the AMX linears too: alone, linear for linear, no faster than oneDNN's there
# (session 8), and not timed apart since.
BF16_KERNEL_ROWS = 4
AMX_ROWS = 64


LINEAR_AVX, LINEAR_AMX, LINEAR_ONEDNN = 0, 1, 2  # 0 and 1: the `mode` of kernels.decoder_layer


def bf16_linear_kind(weights: tuple, rows: int) -> int:
    """Which kernel `bf16_linear` runs for `rows` rows with these weights (`Linear.bf16_weights()`)."""
    packed, _, avx, tiles = weights
    if packed is None:  # batch-invariant weights: one kernel whatever the row count
        return LINEAR_AMX if tiles is not None else LINEAR_AVX
    if avx and (rows == 1 or (tiles is None and rows <= BF16_KERNEL_ROWS)):
        return LINEAR_AVX
    if tiles is not None and rows <= AMX_ROWS:
        return LINEAR_AMX
    return LINEAR_ONEDNN


def bf16_linear(x: torch.Tensor, weights: tuple, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, in] bf16 @ W^T (+ b); `weights` = (oneDNN-packed W, plain W, AVX512 kernel usable, AMX tiles or None)
    as `Linear.bf16_weights()` gives them: the few-row kernels where they are faster, oneDNN otherwise."""
    packed, weight, _, tiles = weights
    kind = bf16_linear_kind(weights, x.shape[0])
    if kind == LINEAR_AVX:
        return kernels.linear_bf16(x.contiguous(), weight, bias)
    if kind == LINEAR_AMX:
        return kernels.linear_amx(x.contiguous(), tiles, weight.shape[0], bias)
    return packed_linear(x, packed, bias)


# Attention of decode and verify passes (up to this many queries per sequence) runs on `kernels.attention`: it
# reads each sequence's K/V once for the query heads that share them and stops at the last visible key; torch's
# flash kernel, built for long query blocks, reads a decode batch's KV cache at 5-9 GB/s (SmolLM2, batch 64: 1.1
# vs 0.55 ms per layer at 160 cached tokens). Prefill keeps SDPA. Each query's attention is independent of T and
# of the batch, so decode and verify passes compute the same values for the same query and keys.
ATTENTION_KERNEL_T = 16


def batch_invariant_supported(dtype: torch.dtype, device: torch.device, head_dim: int | None = None) -> bool:
    """Whether `DecoderLM.batch_invariant` can hold here: bf16 on a CPU with AVX512-BF16 (the row-independent
    linear kernels, AMX where there is AMX) and, for this head size, the attention kernel."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and kernels.linear_bf16_available()
            and (head_dim is None or kernels.attention_available(head_dim)))


# SwiGLU's gate_up linear with the activation fused into the AMX kernel's epilogue (`kernels.linear_amx_silu`, the
# same bits as the two steps): SmolLM2's [3072, 576] gate_up, two threads, 30 layers: 0.088-0.249 ms per layer at
# 2-64 rows against 0.106-0.285 for the linear then `silu_mul`, equal at 1 row, slower from 128 rows on.
AMX_SILU_ROWS = 96
# The bf16 LM head on AMX up to this many rows, its float32 logits written by the kernel (no bf16 tensor and
# `.float()` pass: 64 rows x 49152 logits are 12.6 MB of float32).
AMX_HEAD_ROWS = 64


def gate_up_silu(h: torch.Tensor, weights: tuple) -> torch.Tensor:
    """silu(h W_gate^T) * (h W_up^T) for the bf16 gate_up weights `weights` (`Linear.bf16_weights()`)."""
    if gate_up_fused(weights, h.shape[0]):
        return kernels.linear_amx_silu(h.contiguous(), weights[3], weights[1].shape[0] // 2)
    return kernels.silu_mul(bf16_linear(h, weights))


def gate_up_fused(weights: tuple, rows: int) -> bool:
    """Whether `gate_up_silu` runs the fused AMX kernel for `rows` rows."""
    packed, weight, _, tiles = weights
    return tiles is not None and (weight.shape[0] // 2) % 16 == 0 and (packed is None or rows <= AMX_SILU_ROWS)


def additive_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A bool attention mask -> None when every key is visible (SDPA's unmasked path), else the additive
    bf16 mask (SDPA would convert a bool mask on every call, i.e. once per layer)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    if bool(mask.all()):
        return None
    return torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill_(~mask, float("-inf"))


def check_kv_writes(rows: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor) -> None:
    """The fused kernels write K/V where rows/slots point: refuse anything outside the cache."""
    R, _, max_len, _ = cache.shape
    if int(rows.min()) < 0 or int(rows.max()) >= R or int(slots.min()) < 0 or int(slots.max()) >= max_len:
        raise IndexError("KV write outside the cache")


def fused_layer(x, delta, tensors: tuple, shape: tuple[int, ...], cos, sin, positions, rows, slots, k_cache,
                v_cache, row_start: int, kv_len: int, mask, ordered: bool = False):
    """One decoder layer on the fused bf16 CPU kernels (tlt/engine/kernels): the same math and bf16
    roundings as `DecoderLayer.forward`, ~8 calls instead of ~40.

    x [N, H] is the residual stream before `delta` (the previous layer's MLP output, None: nothing pending)
    is added: the residual add is fused into the next norm. Returns (x, delta) for the next layer.
    `tensors`: `DecoderLayer.fused_tensors()`; shape (B, T, heads, kv_heads, head_dim) with N = B * T;
    cos/sin: rotary tables indexed by `positions` [N]; K/V written at cache[rows[t], :, slots[t]].
    mask: bool [B, T, kv_len] -> `kernels.attention` (passes of few queries per sequence, see ATTENTION_KERNEL_T);
    an additive mask [B, 1, T, kv_len] or None -> torch's SDPA. `ordered`: see `kernels.attention`."""
    B, T, nh, kvh, d = shape
    N = B * T
    in_w, in_eps, qkv_w, qkv_b, q_norm, k_norm, o_w, post_w, post_eps, gu_w, down_w = tensors
    x, h = kernels.add_rms_norm(x, delta, in_w, in_eps)
    qkv = bf16_linear(h, qkv_w, qkv_b)
    if q_norm is not None:  # Qwen3: per-head q/k norm before rotary (torch ops)
        qk, v = qkv.view(N, nh + 2 * kvh, d).split([nh + kvh, kvh], dim=1)
        q, k = qk.split([nh, kvh], dim=1)
        qkv = torch.cat([q_norm(q), k_norm(k), v], dim=1).view(N, -1)
    q = kernels.rope_kv(qkv, cos, sin, positions, rows, slots, k_cache, v_cache, nh)
    if mask is not None and mask.dtype == torch.bool:  # few queries per sequence: tlt's kernel, mask [B, T, kv_len]
        attn = kernels.attention(q.view(B, T, nh, d), k_cache, v_cache, row_start, kv_len, mask,
                                 ordered=ordered).view(N, nh * d)
    else:
        rs = slice(row_start, row_start + B)
        attn = F.scaled_dot_product_attention(
            q.view(B, T, nh, d).transpose(1, 2), k_cache[rs, :, :kv_len], v_cache[rs, :, :kv_len],
            attn_mask=mask, enable_gqa=True)  # [B, heads, T, D]
        attn = attn.transpose(1, 2).reshape(N, nh * d)
    x, h = kernels.add_rms_norm(x, bf16_linear(attn, o_w), post_w, post_eps)
    return x, bf16_linear(gate_up_silu(h, gu_w), down_w)


# float32 on CPU: torch's linear (MKL) takes a matrix-vector path for up to 3 rows and a general GEMM above,
# which reads a weight that is not in cache ~1.7x slower at 4-16 rows than one row does (SmolLM2's 30 layers:
# 28 ms at 4 rows, 34 ms at 8, against 16 ms at one; `benchmarks/linear_fp32.py`). Verify passes and small
# decode batches live exactly there. `kernels.linear_f32` reads each weight row once for all rows: 15 ms at one
# row, 17 at 4, 20 at 8, 29 at 16, 42 at 32; it serves up to FP32_KERNEL_ROWS rows (the LM head, which oneDNN's
# packed copy serves better above 8 rows, up to FP32_HEAD_KERNEL_ROWS). Its rows do not depend on each other,
# so up to that size a decode pass and a verify pass compute bit-identical linears. Without the C kernels a
# transposed copy of the weight ([in, out], contiguous) is the fallback above FP32_GEMV_ROWS.
FP32_GEMV_ROWS = 3
FP32_KERNEL_ROWS = 64
FP32_HEAD_KERNEL_ROWS = 8


def c_layer_pointers(tensors: tuple) -> tuple:
    """A layer's `fused_tensors()` -> the pointer tuple `kernels.decoder_layer` takes (the tensors must outlive it)."""
    in_w, in_eps, qkv, qkv_b, _, _, o, post_w, post_eps, gu, down = tensors

    def ptr(t):
        return None if t is None else t.data_ptr()

    return (ptr(in_w), in_eps, ptr(qkv[1]), ptr(qkv[3]), ptr(qkv_b), ptr(o[1]), ptr(o[3]), ptr(post_w), post_eps,
            ptr(gu[1]), ptr(gu[3]), ptr(down[1]), ptr(down[3]), gu[1].shape[0] // 2)


def c_layer_plan(tensors: tuple, N: int, T: int, mask) -> tuple[int, bool] | None:
    """(linear mode, gate_up fused) when a pass of N rows (T per sequence) can run a layer with these `fused_tensors()`
    as one C call (`kernels.decoder_layer`): every linear on the kernel `bf16_linear` would pick for N rows
    (AVX512-BF16: 0, AMX: 1), never oneDNN, and attention on the attention kernel (a bool mask). None: the pass goes
    through `fused_layer`."""
    if mask is None or mask.dtype != torch.bool or T > kernels.ATTENTION_CHUNK:
        return None
    kinds = {bf16_linear_kind(tensors[i], N) for i in (2, 6, 9, 10)}  # qkv, o, gate_up, down
    if len(kinds) != 1 or LINEAR_ONEDNN in kinds:
        return None
    return kinds.pop(), gate_up_fused(tensors[9], N)


def cpu_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """float32 on CPU: Linear reads few rows through `kernels.linear_f32` (or a transposed weight copy), the LM
    head has a oneDNN-packed copy."""
    return device.type == "cpu" and dtype == torch.float32


class Linear(nn.Linear):
    """nn.Linear with an inference path for its weight on CPU: a oneDNN pre-packed copy (bf16/fp16), or for
    float32 the few-row kernel (a transposed copy without the C kernels; see FP32_KERNEL_ROWS).

    The parameter stays the source of truth (HF names, weight updates); `pack()` refreshes the copy.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Buffers, not plain attributes: torch.compile then treats them as inputs, so re-packing after a
        # weight update does not recompile.
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("weight_t", None, persistent=False)
        self.register_buffer("amx_tiles", None, persistent=False)
        self.fp32_kernel = False
        self.bf16_kernel = False

    def pack(self, enabled: bool, batch_invariant: bool = False) -> None:
        """(Re)build the inference copies. `batch_invariant` (bf16 on CPU with AVX512-BF16): no oneDNN copy, so that
        `bf16_linear` takes one row-independent kernel for every row count (see `batch_invariant_supported`)."""
        w = self.weight.detach()
        fp32 = cpu_fp32(w.dtype, w.device)
        kernel_only = bool(enabled and batch_invariant and batch_invariant_supported(w.dtype, w.device)
                           and w.is_contiguous())
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w) if enabled and not fp32 and not kernel_only and (
            cpu_packing_supported(w.dtype, w.device)) else None
        self.fp32_kernel = bool(enabled and fp32 and w.is_contiguous() and kernels.available())
        self.weight_t = w.t().contiguous() if enabled and fp32 and not self.fp32_kernel else None
        few_rows = (self.packed is not None or kernel_only) and w.dtype == torch.bfloat16 and w.is_contiguous()
        self.bf16_kernel = bool(few_rows and kernels.linear_bf16_available())
        self.amx_tiles = kernels.amx_pack(w) if few_rows and kernels.amx_available() else None

    def bf16_weights(self) -> tuple:
        """(oneDNN-packed weight, weight, AVX512 kernel usable, AMX tiles or None) for `bf16_linear`."""
        return self.packed, self.weight.detach(), self.bf16_kernel, self.amx_tiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:  # training reads the parameter, never a copy (which has no gradient)
            return F.linear(x, self.weight, self.bias)
        if self.packed is not None or self.bf16_kernel:
            if x.dtype == torch.bfloat16 and (self.bf16_kernel or self.amx_tiles is not None):
                return bf16_linear(x.reshape(-1, x.shape[-1]), self.bf16_weights(), self.bias).view(
                    *x.shape[:-1], self.out_features)
            if self.packed is not None:
                return packed_linear(x, self.packed, self.bias)
        if self.fp32_kernel and x.dtype == torch.float32:
            rows = x.numel() // x.shape[-1]
            if rows <= FP32_KERNEL_ROWS:
                y = kernels.linear_f32(x.reshape(rows, x.shape[-1]).contiguous(), self.weight)
                y = y.view(*x.shape[:-1], y.shape[-1])
                return y if self.bias is None else y + self.bias
        elif self.weight_t is not None and x.numel() > FP32_GEMV_ROWS * x.shape[-1]:
            y = torch.matmul(x, self.weight_t)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm op for op: normalise in float32, round to the input dtype, then scale.
        # (F.rms_norm is one dispatch but skips that rounding: 1 in 4 bf16 outputs differed by a step.)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP, GQA, optional qkv bias (Qwen2) and q/k norm (Qwen3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.intermediate = cfg.intermediate_size
        # Use the fused bf16 CPU kernels in `forward` (the drafter's layer; the target's layers are driven
        # by DecoderLM._forward_fused instead). Set by the owner's pack_weights.
        self.fused = False

    def qkv_rotated(self, x, cos, sin):
        """x [B, T, H] -> q [B, T, heads, D], k and v [B, T, kv_heads, D] (rotary applied)."""
        B, T, _ = x.shape
        h = self.input_norm(x)
        qk, v = self.qkv(h).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(B, T, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        # q and k rotated together: half the elementwise launches of doing them one by one.
        q, k = apply_rotary(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=2)
        return q, k, v

    def attend_and_mlp(self, x, q, keys, values, mask):
        """Attention of q [B, T, heads, D] over keys/values [B, kv_heads, L, D], then the MLP block."""
        B, T = q.shape[:2]
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True
        )  # [B, heads, T, D]
        x = x + self.o_proj(attn.transpose(1, 2).reshape(B, T, self.q_size))
        gate, up = self.gate_up(self.post_norm(x)).split(self.intermediate, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def forward(self, x, cos, sin, k_cache, v_cache, batch: AttentionBatch):
        if self.fused and x.shape[0] * x.shape[1] <= FUSED_MAX_TOKENS:
            return self._forward_fused(x, cos, sin, k_cache, v_cache, batch)
        q, k, v = self.qkv_rotated(x, cos, sin)
        # cache layout [rows, kv_heads, max_len, head_dim]: a batch's keys are a strided view, no gather.
        slots = batch.positions if batch.slots is None else batch.slots
        k_cache[batch.write_rows, :, slots] = k
        v_cache[batch.write_rows, :, slots] = v
        rows = slice(batch.row_start, batch.row_start + x.shape[0])
        keys = k_cache[rows, :, : batch.kv_len]  # [B, kv_heads, L, D]
        values = v_cache[rows, :, : batch.kv_len]
        return self.attend_and_mlp(x, q, keys, values, batch.mask)


    def fused_tensors(self) -> tuple:
        """This layer's tensors for `fused_layer` (the packed weights: call after `pack`)."""
        return (self.input_norm.weight, self.input_norm.eps, self.qkv.bf16_weights(), self.qkv.bias, self.q_norm,
                self.k_norm, self.o_proj.bf16_weights(), self.post_norm.weight, self.post_norm.eps,
                self.gate_up.bf16_weights(), self.down.bf16_weights())

    def _forward_fused(self, x, cos, sin, k_cache, v_cache, batch: AttentionBatch):
        """`forward` through `fused_layer`; cos/sin [B, T, D] become a per-token rotary table."""
        B, T, H = x.shape
        N = B * T
        slots = (batch.positions if batch.slots is None else batch.slots).reshape(N).contiguous()
        rows = batch.write_rows.reshape(N).contiguous()
        check_kv_writes(rows, slots, k_cache)
        shape = (B, T, self.num_heads, self.num_kv_heads, self.head_dim)
        few = T <= ATTENTION_KERNEL_T and kernels.attention_available(self.head_dim)
        mask = batch.mask.reshape(B, T, batch.kv_len) if few else additive_mask(batch.mask)
        x, delta = fused_layer(x.reshape(N, H).contiguous(), None, self.fused_tensors(), shape,
                               cos.reshape(N, -1).contiguous(), sin.reshape(N, -1).contiguous(),
                               torch.arange(N, device=x.device), rows, slots, k_cache, v_cache, batch.row_start,
                               batch.kv_len, mask)
        return (x + delta).view(B, T, H)


class DecoderLM(nn.Module):
    """The whole causal LM. `forward` returns final-norm hidden states; `logits` applies the head."""

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("head_packed", None, persistent=False)
        self.head_fp32_kernel = False
        self.head_bf16 = None  # `bf16_linear`'s weights for the head (set by pack_weights)
        self.max_positions = max_positions
        self.rope: RotaryTable | None = None
        self.fused_cpu = False  # bf16 on CPU with the fused kernels built (set by pack_weights)
        self._fused_layers: list[tuple] | None = None
        self._c_layers: list[tuple] | None = None
        # A token's results do not depend on the rows beside it in a pass, nor on the pass's kind (decode or
        # verify): one linear kernel for every row count, the attention kernel with ordered sums. Set before
        # pack_weights, and only where `batch_invariant_supported`.
        self.batch_invariant = False

    def build_rope(self) -> None:
        """(Re)build the cos/sin tables on the module's device and dtype."""
        w = self.embed.weight
        c = self.cfg
        self.rope = RotaryTable(c.head_dim, c.rope_theta, c.rope_scaling, self.max_positions, w.device, w.dtype)

    def pack_weights(self, enabled: bool | None = None) -> None:
        """(Re)build pre-packed weight copies where the device and dtype profit; call after any update.
        `enabled=False` drops them (weights about to leave the device)."""
        w = self.embed.weight
        if enabled is None:
            enabled = cpu_packing_supported(w.dtype, w.device) or cpu_fp32(w.dtype, w.device)
        invariant = self.batch_invariant
        if invariant and enabled and not batch_invariant_supported(w.dtype, w.device, self.cfg.head_dim):
            raise ValueError("batch-invariant inference needs bfloat16 on a CPU with AVX512-BF16 (and the C kernels)")
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack(enabled, invariant)
        # The head is oneDNN-packed in float32 too: at 2-64 rows 1.1-2.4x faster than torch's linear.
        pack_head = enabled and onednn_packing_available() and not invariant
        self.head_packed = torch.ops.mkldnn._reorder_linear_weight(self.head_weight.detach()) if pack_head else None
        self.head_fp32_kernel = bool(enabled and cpu_fp32(w.dtype, w.device) and self.head_weight.is_contiguous()
                                     and kernels.available())
        head = self.head_weight.detach()
        few_rows = ((self.head_packed is not None or (invariant and enabled)) and w.dtype == torch.bfloat16
                    and head.is_contiguous())
        self.head_bf16 = None
        if few_rows:
            self.head_bf16 = (self.head_packed, head, kernels.linear_bf16_available(),
                              kernels.amx_pack(head) if kernels.amx_available() else None)
        self.fused_cpu = bool(enabled) and w.dtype == torch.bfloat16 and kernels.available()
        # The fused path reads each layer's tensors from one flat tuple: no nn.Module lookups per call.
        self._fused_layers = [layer.fused_tensors() for layer in self.layers] if self.fused_cpu else None
        # ... and `kernels.decoder_layer` their addresses (the tuples above keep the tensors alive).
        self._c_layers = None
        if self._fused_layers is not None and kernels.linear_bf16_available() and not self.cfg.qk_norm:
            self._c_layers = [c_layer_pointers(t) for t in self._fused_layers]

    def _c_layer_plan(self, N: int, T: int, mask) -> tuple[int, bool] | None:
        if self._c_layers is None:
            return None
        return c_layer_plan(self._fused_layers[0], N, T, mask)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids, batch: AttentionBatch, k_caches, v_caches, capture_layers=()):
        """input_ids [B, T] -> hidden [B, T, hidden] (after the final norm).

        `capture_layers`: indices of layers whose *output* hidden states are also returned (for the
        drafter), as a list in the same order.
        """
        if self.fused_cpu and input_ids.numel() <= FUSED_MAX_TOKENS:
            return self._forward_fused(input_ids, batch, k_caches, v_caches, capture_layers)
        cos, sin = self.rope.lookup(batch.positions)
        x = self.embed(input_ids)
        captured = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, k_caches[i], v_caches[i], batch)
            if i in capture_layers:
                captured[i] = x
        return self.norm(x), [captured[i] for i in capture_layers]

    def _forward_fused(self, input_ids, batch: AttentionBatch, k_caches, v_caches, capture_layers):
        """`forward` with every layer through `fused_layer` (bf16 on CPU), or as one C call per layer
        (`kernels.decoder_layer`, the same kernels) where `_c_layer_plan` allows."""
        B, T = input_ids.shape
        N = B * T
        cfg = self.cfg
        positions = batch.positions.reshape(N).contiguous()
        slots = positions if batch.slots is None else batch.slots.reshape(N).contiguous()
        rows = batch.write_rows.reshape(N).contiguous()
        check_kv_writes(rows, slots, k_caches[0])  # once per pass, not per layer
        if int(positions.min()) < 0 or int(positions.max()) >= self.rope.cos.shape[0]:
            raise IndexError("position outside the rotary table")
        # Batch-invariant: prefill too (SDPA's blocking follows the padded length, so a prompt's K/V would depend on
        # the prompts padded beside it).
        if (T <= ATTENTION_KERNEL_T or self.batch_invariant) and kernels.attention_available(cfg.head_dim):
            mask = batch.mask.reshape(B, T, batch.kv_len)
        else:
            mask = additive_mask(batch.mask)
        shape = (B, T, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = self.rope.cos, self.rope.sin
        x = self.embed(input_ids).view(N, -1)
        delta = None
        captured = {}
        plan = self._c_layer_plan(N, T, mask)
        if plan is not None:  # one C call per layer, the same kernels as fused_layer
            mask = mask.contiguous()
            bufs = [(torch.empty_like(x), torch.empty_like(x)) for _ in range(2)]
            for i, ptrs in enumerate(self._c_layers):
                x_out, delta_out = bufs[i % 2]
                kernels.decoder_layer(shape, plan[0], plan[1], x, delta, x_out, delta_out, ptrs, cos, sin, positions,
                                      rows, slots, k_caches[i], v_caches[i], batch.row_start, batch.kv_len, mask,
                                      self.batch_invariant)
                x, delta = x_out, delta_out
                if i in capture_layers:
                    x, delta = x + delta, None  # bf16 add: the same rounding as the fused one
                    captured[i] = x.view(B, T, -1)
            _, out = kernels.add_rms_norm(x, delta, self.norm.weight, self.norm.eps)
            return out.view(B, T, -1), [captured[i] for i in capture_layers]
        for i, tensors in enumerate(self._fused_layers):
            x, delta = fused_layer(x, delta, tensors, shape, cos, sin, positions, rows, slots, k_caches[i],
                                   v_caches[i], batch.row_start, batch.kv_len, mask, self.batch_invariant)
            if i in capture_layers:
                x, delta = x + delta, None  # bf16 add: the same rounding as the fused one
                captured[i] = x.view(B, T, -1)
        _, out = kernels.add_rms_norm(x, delta, self.norm.weight, self.norm.eps)
        return out.view(B, T, -1), [captured[i] for i in capture_layers]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> float32 logits [..., vocab]."""
        rows = hidden.numel() // hidden.shape[-1]
        if self.head_fp32_kernel and hidden.dtype == torch.float32 and rows <= FP32_HEAD_KERNEL_ROWS:
            flat = hidden.reshape(rows, hidden.shape[-1]).contiguous()
            return kernels.linear_f32(flat, self.head_weight).view(*hidden.shape[:-1], self.head_weight.shape[0])
        if self.head_bf16 is not None and hidden.dtype == torch.bfloat16:
            packed, weight, _, tiles = self.head_bf16
            flat = hidden.reshape(rows, hidden.shape[-1])
            if tiles is not None and (packed is None or 2 <= rows <= AMX_HEAD_ROWS):  # float32 straight from tiles
                out = kernels.linear_amx(flat.contiguous(), tiles, weight.shape[0], float_out=True)
            else:
                out = bf16_linear(flat, self.head_bf16).float()
            return out.view(*hidden.shape[:-1], self.head_weight.shape[0])
        if self.head_packed is not None:
            return packed_linear(hidden, self.head_packed).float()
        return F.linear(hidden, self.head_weight).float()


def hf_weight_map(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF checkpoint name -> (engine parameter name, first row, end row) of the slice it fills."""
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    out: dict[str, tuple[str, int, int]] = {
        "model.embed_tokens.weight": ("embed.weight", 0, cfg.vocab_size),
        "model.norm.weight": ("norm.weight", 0, cfg.hidden_size),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", 0, cfg.vocab_size)
    for i in range(cfg.num_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        out[hf + "input_layernorm.weight"] = (me + "input_norm.weight", 0, cfg.hidden_size)
        out[hf + "post_attention_layernorm.weight"] = (me + "post_norm.weight", 0, cfg.hidden_size)
        for kind in (["weight", "bias"] if cfg.attention_bias else ["weight"]):
            out[hf + f"self_attn.q_proj.{kind}"] = (me + f"qkv.{kind}", 0, q)
            out[hf + f"self_attn.k_proj.{kind}"] = (me + f"qkv.{kind}", q, q + kv)
            out[hf + f"self_attn.v_proj.{kind}"] = (me + f"qkv.{kind}", q + kv, q + 2 * kv)
        out[hf + "self_attn.o_proj.weight"] = (me + "o_proj.weight", 0, cfg.hidden_size)
        if cfg.qk_norm:
            out[hf + "self_attn.q_norm.weight"] = (me + "q_norm.weight", 0, cfg.head_dim)
            out[hf + "self_attn.k_norm.weight"] = (me + "k_norm.weight", 0, cfg.head_dim)
        out[hf + "mlp.gate_proj.weight"] = (me + "gate_up.weight", 0, inter)
        out[hf + "mlp.up_proj.weight"] = (me + "gate_up.weight", inter, 2 * inter)
        out[hf + "mlp.down_proj.weight"] = (me + "down.weight", 0, cfg.hidden_size)
    return out
