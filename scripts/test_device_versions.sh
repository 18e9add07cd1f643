#!/usr/bin/env bash
# The test suite on this CPU under the GPU machine's versions: torch 2.11 (the CUDA build that
# scripts/build_for_device.sh installs in $DEVICE_VENV, run here without a GPU), triton 3.6's interpreter and
# the extension built there. It catches what only those versions do without spending device time (it found
# torch 2.11 tracing an in-place all_reduce inside an autograd.Function into zero gradients, which 2.13 does not).
#   bash scripts/build_for_device.sh && bash scripts/test_device_versions.sh [pytest arguments]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
PY="$DEVICE_VENV/bin/python"
if [ ! -x "$PY" ] || [ ! -f "$repo_root/.gpu_build/_C.abi3.so" ]; then
    echo "test_device_versions: run scripts/build_for_device.sh first" >&2
    exit 2
fi
# The test extras as setup.py lists them (without triton: this torch brings its own 3.6), xdist, and numpy < 2.4:
# triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses.
mapfile -t test_extras < <("$PY" -c "
import runpy
extras = runpy.run_path('$repo_root/setup.py', run_name='extras')['EXTRAS_REQUIRE']
print('\\n'.join(r for r in extras['test'] if r not in extras['triton']))")
"$PY" -m pip install -q "numpy<2.4" pytest-xdist "${test_extras[@]}"
"$PY" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
# A copy of the tracked tree with the device build in place of this checkout's (CPU torch) build.
copy_checkout
cp "$repo_root/.gpu_build/_C.abi3.so" "$work/flood_kernels/_C.abi3.so"
cd "$work"
"$PY" -m pytest -q -rf -n "${WORKERS:-2}" -p no:cacheprovider "$@"  # -rf: a failure is named in the summary
