#!/usr/bin/env bash
# One call on a lent GPU: kernels vs reference, engine vs transformers, decode benchmark, then
# the test files that only run where CUDA is (graphs, sampler draws, kernels on the device).
# Output is tee'd into $OUT (the folder the device tool brings back); each stage is capped so
# that the table arrives even when a part hangs.
#   bash benchmarks/gpu_check.sh [--dry-run] [--parts kernels,parity,bench]
# Wheels in .whl/ (gguf, and llguidance for the grammar test: the device image lacks both;
# `pip download --no-deps gguf llguidance -d .whl`) are installed first when present, and
# when .whl/tokenizer/ holds SmolLM2's tokenizer.json + tokenizer_config.json (copy them from
# .cache/tokenfleet-test/models/smollm2/), the tiny-model GPU tests (CUDA graphs vs eager,
# asynchronous decode, the fused kernels inside the model) run too: the device is offline and
# cannot pull the model.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-400}"
PYTEST_LIMIT_S="${GPU_CHECK_PYTEST_LIMIT_S:-90}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/tf_site .whl/*.whl && export PYTHONPATH="/tmp/tf_site:${PYTHONPATH:-}"
fi
# `tokenfleet.*` from this checkout without installing it (the wheel's package-dir mapping).
SHIM="$(mktemp -d)/shim"
mkdir -p "$SHIM/tokenfleet"
for sub in engine kernels worker producer; do ln -s "$PWD/$sub" "$SHIM/tokenfleet/$sub"; done
export PYTHONPATH="$SHIM:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,power.draw --format=csv \
    2>/dev/null | tee "$OUT/nvidia_smi.csv"
timeout --signal=INT --kill-after=20 "$LIMIT_S" \
    "$PYTHON" -u benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
echo "gpu_check exit status: $status"
TINY_MODEL_TESTS=()
if [[ -f .whl/tokenizer/tokenizer.json ]]; then
    export TOKENFLEET_TEST_TOKENIZER_DIR="$PWD/.whl/tokenizer"
    TINY_MODEL_TESTS=(tests/kernels/test_cuda_graph_runner.py tests/kernels/test_async_decode.py
                      tests/kernels/test_engine_triton_backend.py)
fi
if [[ " $* " != *" --dry-run "* ]]; then
    timeout --signal=INT --kill-after=10 "$PYTEST_LIMIT_S" "$PYTHON" -m pytest -q -x \
        -p no:cacheprovider -o addopts="" \
        tests/kernels/test_attention_flash_backend.py tests/kernels/test_silu_mul_kernel.py \
        tests/kernels/test_rotary_store_kv_kernel.py tests/kernels/test_norm_gemv_kernel.py tests/kernels/test_row_stats_kernel.py \
        tests/kernels/test_attention_backend.py "tests/unit/test_sampler.py::test_cuda_draws_equal_cpu_draws" \
        "${TINY_MODEL_TESTS[@]}" \
        2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
    echo "gpu pytest exit status: ${PIPESTATUS[0]}"
fi
exit "$status"
