#!/usr/bin/env bash
# The hash of the extension's sources (csrc/ and setup.py) under a checkout (default: this one): what
# scripts/build_for_device.sh stamps on its build and benchmarks/gpu_session.sh checks before using it.
set -euo pipefail
cd "${1:-$(dirname "${BASH_SOURCE[0]}")/..}"
find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
