#!/usr/bin/env bash
# The test suite on this CPU under the GPU machine's versions: torch 2.11 (the CUDA build that
# scripts/build_for_device.sh installs in $DEVICE_VENV, run here without a GPU), triton 3.6's interpreter and
# the extension built there. It catches what only those versions do without spending device time (it found
# torch 2.11 tracing an in-place all_reduce inside an autograd.Function into zero gradients, which 2.13 does not).
#   bash scripts/build_for_device.sh && bash scripts/test_device_versions.sh [pytest arguments]
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE_VENV="${DEVICE_VENV:-${TMPDIR:-/tmp}/flood_kernels_device_venv}"
PY="$DEVICE_VENV/bin/python"
if [ ! -x "$PY" ] || [ ! -f "$repo_root/.gpu_build/_C.abi3.so" ]; then
    echo "test_device_versions: run scripts/build_for_device.sh first" >&2
    exit 2
fi
# numpy < 2.4: triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses.
"$PY" -m pip install -q "numpy<2.4" pytest pytest-benchmark pytest-xdist "transformers>=4.46,<6" \
    "accelerate>=1.1.0" matplotlib
"$PY" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
# A copy of the tracked tree with the device build in place of this checkout's (CPU torch) build.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$repo_root" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - ) | tar -xf - -C "$work"
cp "$repo_root/.gpu_build/_C.abi3.so" "$work/flood_kernels/_C.abi3.so"
cd "$work"
"$PY" -m pytest -q -n "${WORKERS:-2}" -p no:cacheprovider "$@"
