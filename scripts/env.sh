#!/usr/bin/env bash
# Sets up everything from a fresh clone with only python3: a virtual environment in .venv that shares an
# already-installed torch (else installs torch 2.13.0), then this package with its test extras (triton,
# pytest, pytest-benchmark), building the C++ extension flood_kernels._C. Source it: it exports $PY.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv --system-site-packages .venv
fi
PY="$repo_root/.venv/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
# --no-build-isolation builds with what the venv has: a setuptools that knows bdist_wheel, wheel, ninja.
"$PY" -m pip install -q "setuptools>=70.1" wheel ninja
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
export PY
