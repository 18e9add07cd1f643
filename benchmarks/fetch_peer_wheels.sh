#!/usr/bin/env bash
# Download the wheels the offline GPU machine needs into .whl/ (git-ignored): the peers' (pure Python:
# Liger-Kernel, Cut Cross-Entropy) and pytest-xdist with execnet, so that the GPU tests run in parallel
# processes there. Run this here, then call the device tool with carry [".whl"]; benchmarks/gpu_session.sh
# installs whatever .whl/ holds before testing and benchmarking.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl liger-kernel cut-cross-entropy pytest-xdist execnet
ls .whl
