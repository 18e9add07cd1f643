#!/usr/bin/env bash
# Compile-only check of the CUDA sources (csrc/cuda/*.cu) with nvcc, for machines without a GPU (CI):
# catches CUDA build breaks. Object files go to a temporary directory that is removed afterwards.
#   scripts/check_cuda_compile.sh            # sm_80 and sm_90
#   CUDA_HOME=/usr/local/cuda-13.0 ARCHS="80 90" scripts/check_cuda_compile.sh
#   ARCHS=90 EXTRA_NVCC_FLAGS="-Xptxas -v" scripts/check_cuda_compile.sh   # registers / spills per kernel
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}"
NVCC="${NVCC:-$CUDA_HOME/bin/nvcc}"
ARCHS="${ARCHS:-80 90}"
PYTHON="${PYTHON:-python3}"
[ -x "$NVCC" ] || { echo "check_cuda_compile: nvcc not found at $NVCC (set CUDA_HOME)" >&2; exit 2; }

# Include paths and the C++ standard torch's own extension builder uses (C++17 up to torch 2.9, C++20 after).
mapfile -t INCLUDES < <("$PYTHON" -c "
from torch.utils.cpp_extension import include_paths
import sysconfig
for p in include_paths() + [sysconfig.get_paths()['include']]:
    print('-I' + p)")
STD="$("$PYTHON" -c "
import inspect, torch.utils.cpp_extension as c
print('c++20' if '-std=c++20' in inspect.getsource(c) else 'c++17')")"
ABI="$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
GENCODE=()
for a in $ARCHS; do GENCODE+=("-gencode=arch=compute_${a},code=sm_${a}"); done

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# A CPU build of torch ships c10/cuda headers without the generated c10/cuda/impl/cuda_cmake_macros.h:
# supply the one line it holds in CUDA builds (only when it is missing).
STUB=()
if ! "$PYTHON" -c "
import os, sys
from torch.utils.cpp_extension import include_paths
sys.exit(0 if any(os.path.exists(os.path.join(p, 'c10/cuda/impl/cuda_cmake_macros.h')) for p in include_paths()) else 1)"; then
  mkdir -p "$TMP/include/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/include/c10/cuda/impl/cuda_cmake_macros.h"
  STUB=("-I$TMP/include")
fi
status=0
for src in csrc/cuda/*.cu; do
  echo "nvcc -c $src (-std=$STD, archs: $ARCHS)"
  if ! "$NVCC" -c "$src" -o "$TMP/$(basename "$src").o" -std="$STD" --expt-relaxed-constexpr -O3 \
      -Xcompiler -fPIC -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DTORCH_API_INCLUDE_EXTENSION_H \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ -Icsrc "${INCLUDES[@]}" "${STUB[@]}" "${GENCODE[@]}" -Werror all-warnings ${EXTRA_NVCC_FLAGS:-}; then
    echo "FAILED: $src" >&2
    status=1
  fi
done
[ "$status" -eq 0 ] && echo "check_cuda_compile: OK"
exit "$status"
