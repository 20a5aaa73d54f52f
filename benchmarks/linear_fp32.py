"""float32 linears on CPU: torch's linear vs a transposed weight copy vs a oneDNN-packed copy, by rows.

    python -m benchmarks.linear_fp32 [--json benchmarks/results/linear_fp32.json]

Why tlt keeps a transposed copy of every float32 Linear's weight (used above `FP32_GEMV_ROWS` = 3 rows) and a
oneDNN-packed copy of the LM head (tlt/engine/models/decoder.py): torch's linear takes a matrix-vector
path for up to 3 rows and a general GEMM above, which on this CPU is 2-3.5x slower at 4-16 rows, exactly
the row counts of verify passes and small decode batches. SmolLM2-135M's shapes, microseconds per call
(best of 3 runs of `--calls` calls each, after a warm-up).
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import machine, write_json

SHAPES = {"qkv": (576, 960), "gate_up": (576, 3072), "down": (1536, 576), "lm_head": (576, 49152)}
ROWS = (1, 2, 3, 4, 8, 16, 32, 64)


def run(calls: int = 100, log=print) -> dict:
    import torch
    import torch.nn.functional as F

    from tlt.engine.models.decoder import packed_linear

    torch.manual_seed(0)

    def timed(f, n: int) -> float:
        for _ in range(3):
            f()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(n):
                f()
            best = min(best, (time.perf_counter() - t) / n)
        return best * 1e6

    rows_out = []
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k)
        wt = w.t().contiguous()
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        reps = max(calls // 20, 3) if n > 10000 else calls
        for m in ROWS:
            x = torch.randn(m, k)
            r = {"shape": name, "in": k, "out": n, "rows": m,
                 "linear_us": timed(lambda x=x, w=w: F.linear(x, w), reps),
                 "transposed_us": timed(lambda x=x, wt=wt: x @ wt, reps),
                 "onednn_packed_us": timed(lambda x=x, p=packed: packed_linear(x, p), reps)}
            rows_out.append(r)
            log(f"{name:8s} {k:5d}->{n:5d} rows {m:3d}: linear {r['linear_us']:8.0f} us  transposed "
                f"{r['transposed_us']:8.0f} us  oneDNN packed {r['onednn_packed_us']:8.0f} us")
    return {"results": rows_out, "machine": machine()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--calls", type=int, default=100)
    args = p.parse_args(argv)
    write_json(args.json, run(args.calls))


if __name__ == "__main__":
    main()
