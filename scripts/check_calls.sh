#!/usr/bin/env bash
# Static check of the code that CI cannot run: without a GPU the GPU-only tests, the GPU benchmark paths and the
# device scripts never execute, so a call that no longer matches its function (it happened: a GPU test kept
# calling a helper after an argument was added to it), a renamed attribute or an undefined name would first fail
# on the GPU machine, in its scarce minutes. pylint's errors about calls, attributes, names and imports only, over
# the whole tree (about a minute on 2 cores). torch, triton and numpy members are not checked (many are generated
# at run time): what is checked is the use of this project's own functions, classes and modules.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH="tests${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-.venv/bin/python}" -m pylint --disable=all \
    --enable=no-value-for-parameter,too-many-function-args,unexpected-keyword-arg,redundant-keyword-arg \
    --enable=no-member,undefined-variable,used-before-assignment,not-callable,no-name-in-module,import-error \
    --ignored-modules=torch,triton,numpy --extension-pkg-allow-list=flood_kernels._C --jobs=2 --score=n \
    flood_kernels tests benchmarks scripts examples
echo "check_calls: OK"
