#!/usr/bin/env bash
# Download the peers' wheels (pure Python: Liger-Kernel, Cut Cross-Entropy) into .whl/ (git-ignored) so a
# device-tool call can carry them to the offline GPU machine: run this here, then call the device tool
# with carry [".whl"]; benchmarks/gpu_session.sh installs whatever .whl/ holds before benchmarking.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl liger-kernel cut-cross-entropy
ls .whl
