"""The CUDA graph pool: one graph per (phase, batch bucket, shape), in one shared memory pool, within a
byte budget; eager runs through the same interface where nothing is captured. See pool.py (policy) and
capture.py (capture, replay, measured bytes)."""

from tlt.engine.cuda_graphs.capture import Capturer, CudaGraph, CudaGraphCapturer, EagerCapturer, Graph, Warmup
from tlt.engine.cuda_graphs.pool import (
    PHASES,
    GraphKey,
    GraphPool,
    batch_buckets,
    bucket_for,
    keys_for_arm,
    pad_rows,
)

__all__ = [
    "PHASES", "Capturer", "CudaGraph", "CudaGraphCapturer", "EagerCapturer", "Graph", "GraphKey", "GraphPool",
    "Warmup", "batch_buckets", "bucket_for", "keys_for_arm", "pad_rows",
]
