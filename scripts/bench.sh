#!/usr/bin/env bash
# The main job: set up (scripts/env.sh), then benchmark fused flooded cross-entropy against the plain
# PyTorch one-liner on whatever device this machine has, printing a table (arguments go to the benchmark,
# see `python -m flood_kernels.bench --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" -m flood_kernels.bench "$@"
