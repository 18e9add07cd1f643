#!/usr/bin/env bash
# Build flood_kernels._C (CPU and CUDA kernels) here, on a machine without a GPU, for the GPU machine's
# torch (2.11.0+cu130 there), into .gpu_build/ (git-ignored): benchmarks/gpu_session.sh uses it when carried
# (carry [".gpu_build"]) and builds on the device only if it does not load there. The module is abi3
# (py_limited_api), so one build serves the device's Python 3.12 from this machine's python3.
# Also a check of its own: the sources must build against that torch's headers with this machine's nvcc.
#   bash scripts/build_for_device.sh                     # torch 2.11.0, sm_90
#   TORCH_SPEC=torch==2.11.0 TORCH_CUDA_ARCH_LIST="8.0;9.0" bash scripts/build_for_device.sh
# The stamp names the sources' hash: the device uses the build only for the same sources.
# Leaves the virtual environment (~5 GB: torch's CUDA wheels) in $DEVICE_VENV for the next run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
TORCH_SPEC="${TORCH_SPEC:-torch==2.11.0}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" FLOOD_KERNELS_CUDA=1 MAX_JOBS="${MAX_JOBS:-4}"
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "build_for_device: nvcc not found at $CUDA_HOME (set CUDA_HOME)" >&2; exit 2; }
if [ ! -x "$DEVICE_VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$DEVICE_VENV"
fi
PY="$DEVICE_VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_SPEC#torch==}')" 2>/dev/null; then
    "$PY" -m pip install -q "$TORCH_SPEC" "setuptools>=70.1,<82" wheel ninja
fi
"$PY" -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build'; print('building for torch', torch.__version__)"
# Build in a copy of the tracked tree, so this checkout's own (CPU torch) build stays as it is.
copy_checkout
(cd "$work" && "$PY" setup.py build_ext --inplace > build.log 2>&1) || { tail -40 "$work/build.log"; exit 1; }
mkdir -p "$repo_root/.gpu_build"
cp "$work/flood_kernels/_C.abi3.so" "$repo_root/.gpu_build/_C.abi3.so"
# The stamp: which sources (their hash, as gpu_session.sh computes it) and which torch it was built for.
sources_hash="$(bash "$repo_root/scripts/sources_hash.sh" "$work")"
"$PY" -c "import torch; print('$sources_hash', 'torch', torch.__version__, 'archs $TORCH_CUDA_ARCH_LIST')" \
    > "$repo_root/.gpu_build/stamp"
ls -la "$repo_root/.gpu_build"
