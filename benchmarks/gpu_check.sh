#!/usr/bin/env bash
# One call on a lent GPU: kernels vs reference, engine vs transformers, decode benchmark.
# Output is tee'd into $OUT (the folder the device tool brings back); the run is capped so
# that the table (printed last) arrives even when a part hangs.
#   bash benchmarks/gpu_check.sh [--dry-run] [--parts kernels,parity,bench]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-540}"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,power.draw --format=csv \
    2>/dev/null | tee "$OUT/nvidia_smi.csv"
timeout --signal=INT --kill-after=20 "$LIMIT_S" \
    "$PYTHON" -u benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
echo "gpu_check exit status: $status"
exit "$status"
