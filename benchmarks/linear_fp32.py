"""float32 (and bfloat16) linears on CPU, as a decode or verify pass meets them: every layer's weights read
once per pass.

    python -m benchmarks.linear_fp32 [--json benchmarks/results/linear_fp32.json]
    python -m benchmarks.linear_fp32 --dtype bfloat16 [--json benchmarks/results/linear_bf16.json]

Why tlt reads float32 Linears of up to `FP32_KERNEL_ROWS` rows through its own kernel (`kernels.linear_f32`)
and the LM head through it up to `FP32_HEAD_KERNEL_ROWS` rows (tlt/engine/models/decoder.py): a small model's
weights do not fit in the cores' caches, so a pass with few rows is bound by reading them, and torch's float32
GEMM reads them ~1.7x slower at 4-16 rows than its matrix-vector path does at one. Measured over SmolLM2-135M's
30 layers (qkv, o, gate_up, down: 425 MB of float32 weights, one pass = every layer once, the rows' activations
random), milliseconds per pass, best of `--repeats`; and the LM head (113 MB) alone, its cache flushed before
each call. Ways: torch's linear, a transposed weight copy (the fallback without a C compiler), oneDNN's packed
copy (the head's), the kernel.

With `--dtype bfloat16` the ways are torch's linear, oneDNN's packed copy (bf16 engines' path for many rows),
`kernels.linear_bf16` (AVX512-BF16; tlt's for one row) and `kernels.linear_amx` (AMX tiles; tlt's for 2 to
`AMX_ROWS` rows).

An earlier version of this benchmark timed one layer's weights over and over: hot in cache, which hid the
problem (a transposed copy looked 2-3x faster there; over the whole model it is not, see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import machine, write_json

LAYERS = 30
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}
HEAD = (576, 49152)
ROWS = (1, 2, 4, 8, 16, 32, 64)


def run(repeats: int = 5, dtype: str = "float32", log=print) -> dict:
    import torch
    import torch.nn.functional as F

    from tlt.engine import kernels
    from tlt.engine.models.decoder import packed_linear

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    bf16 = dt == torch.bfloat16
    have_kernel = kernels.linear_bf16_available() if bf16 else kernels.available()
    kernel = kernels.linear_bf16 if bf16 else kernels.linear_f32
    weights = [{name: torch.randn(n, k, dtype=dt) for name, (k, n) in SHAPES.items()} for _ in range(LAYERS)]
    # the second way: a transposed copy (float32's fallback) or oneDNN's packed copy (bfloat16's default)
    second = "onednn_packed" if bf16 else "transposed"
    copies = [{name: torch.ops.mkldnn._reorder_linear_weight(w) if bf16 else w.t().contiguous()
               for name, w in layer.items()} for layer in weights]
    have_amx = bf16 and kernels.amx_available()
    tiles = [{name: kernels.amx_pack(w) for name, w in layer.items()} for layer in weights] if have_amx else None
    mb = sum(w.numel() * w.element_size() for w in weights[0].values()) * LAYERS / 1e6

    def model_pass(rows: int, way: str) -> float:
        xs = {k: torch.randn(rows, k, dtype=dt) for k, _ in SHAPES.values()}
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for li, (layer, layer_c) in enumerate(zip(weights, copies)):
                for name, (k, n) in SHAPES.items():
                    x = xs[k]
                    if way == "amx":
                        kernels.linear_amx(x, tiles[li][name], n)
                    elif way == "linear":
                        F.linear(x, layer[name])
                    elif way == "transposed":
                        x @ layer_c[name]
                    elif way == "onednn_packed":
                        packed_linear(x, layer_c[name])
                    else:
                        kernel(x, layer[name])
            best = min(best, time.perf_counter() - t)
        return best * 1e3

    head = torch.randn(HEAD[1], HEAD[0], dtype=dt)
    head_packed = torch.ops.mkldnn._reorder_linear_weight(head)
    head_tiles = kernels.amx_pack(head) if have_amx else None
    flush = torch.empty(64 << 20)  # 256 MB written between calls: the head comes from memory, as in a decode pass

    def head_call(rows: int, way: str) -> float:
        x = torch.randn(rows, HEAD[0], dtype=dt)
        best = float("inf")
        for _ in range(repeats):
            flush.fill_(1.0)
            t = time.perf_counter()
            if way == "amx":
                kernels.linear_amx(x, head_tiles, HEAD[1])
            elif way == "linear":
                F.linear(x, head)
            elif way == "onednn_packed":
                packed_linear(x, head_packed)
            else:
                kernel(x, head)
            best = min(best, time.perf_counter() - t)
        return best * 1e3

    extra = (["kernel"] if have_kernel else []) + (["amx"] if have_amx else [])
    layer_ways = ["linear", second] + extra
    head_ways = ["linear", "onednn_packed"] + extra
    out = {"dtype": dtype, "layers": [], "lm_head": [], "layer_weights_mb": round(mb, 1),
           "kernel_available": have_kernel, "amx_available": have_amx}
    for rows in ROWS:
        r = {"rows": rows, **{f"{w}_ms": round(model_pass(rows, w), 2) for w in layer_ways}}
        out["layers"].append(r)
        log(f"30 layers ({mb:.0f} MB), rows {rows:2d}: " + "  ".join(f"{w} {r[w + '_ms']:6.2f} ms" for w in layer_ways))
    for rows in ROWS:
        r = {"rows": rows, **{f"{w}_ms": round(head_call(rows, w), 2) for w in head_ways}}
        out["lm_head"].append(r)
        log(f"LM head 576->49152, rows {rows:2d}: " + "  ".join(f"{w} {r[w + '_ms']:6.2f} ms" for w in head_ways))
    out["machine"] = machine()
    out["torch_threads"] = torch.get_num_threads()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args(argv)
    write_json(args.json, run(args.repeats, args.dtype))


if __name__ == "__main__":
    main()
