#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the CUDA tests (tests/gpu), then the graph-pool benchmark.
# Writes under $OUT (default benchmarks/results): gpu_tests.txt (pytest's report) and graph_pool.json.
#   OUT=/tmp/results benchmarks/gpu_suite.sh
# Python: $PYTHON if set, else .venv/bin/python if present, else python3 (the GPU machines have torch
# preinstalled and no network, so nothing is installed here).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: no CUDA device visible to $PYTHON; nothing to run" >&2
    exit 1
fi

status=0
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    "$PYTHON" -m pytest -q -rs tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt"
    status=${PIPESTATUS[0]}
else
    echo "gpu_suite.sh: pytest is not installed for $PYTHON; skipping tests/gpu" | tee "$OUT/gpu_tests.txt" >&2
    status=1
fi

"$PYTHON" -m benchmarks.graph_pool --json "$OUT/graph_pool.json" || status=1
exit $status
