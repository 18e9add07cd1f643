#!/usr/bin/env bash
# The CUDA kernels' emulated tests (tests/test_cuda_emulated.py) with the kernels built under AddressSanitizer:
# on a machine without a GPU, what compute-sanitizer memcheck checks on one. Any read or write outside a tensor's
# allocation (a vector load past a row's end, a store past the gradient) stops the run with ASan's report.
#   bash scripts/check_cuda_emulated_asan.sh            # after scripts/test.sh has set up .venv
#   bash scripts/check_cuda_emulated_asan.sh -k cluster  # extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
LIBASAN="$(${CXX:-c++} -print-file-name=libasan.so)"
[ -f "$LIBASAN" ] || { echo "check_cuda_emulated_asan: libasan not found ($LIBASAN)" >&2; exit 2; }
# Leaks: Python and torch keep allocations to exit by design. ASan is preloaded for the process's own allocations
# (every tensor), which the instrumented kernels' accesses are checked against.
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" LD_PRELOAD="$LIBASAN" FLOOD_KERNELS_CUDA_EMULATION_SANITIZE=address \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_emulated.py "$@"
