#!/usr/bin/env bash
# The test command: set up (scripts/env.sh), then run the whole test suite (GPU tests skip without CUDA;
# without a GPU the Triton kernels run in Triton's interpreter on CPU tensors).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" -m pytest -q "$@"
