#!/usr/bin/env bash
# What the GPU machine must check, in device calls that each fit the tool's 10-minute limit (logs and
# results under $OUT, at most 8 files per call):
#   stage "test":  build the extension with its CUDA kernels against the machine's torch (offline), the
#                  whole test suite (Triton and CUDA backends on real CUDA tensors), compute-sanitizer
#                  memcheck over the CUDA backend's kernel tests;
#   stage "bench": build (kept while the machine stays warm), then the benchmark at the issue shapes in the
#                  batch-flooding phases (copy bandwidth, every backend vs the one-liners and installed
#                  peers; JSON, markdown, plots) and the classification shapes with CUDA-graph replay;
#   stage "bench1r": the plain and iFlood phases at the issue shapes, where the single-read path and the
#                  two-pass path of each backend are timed side by side (the measurement that decides
#                  flood_kernels/_single_read.py's default on GPU).
# Usage (device tool): bash benchmarks/gpu_session.sh test|bench|bench1r|all [shape set, default issue2]
# (with carry [".whl"] after benchmarks/fetch_peer_wheels.sh, the peers are benchmarked too)
set -uo pipefail
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
stage="${1:-all}"
shapes="${2:-issue2}"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 FLOOD_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# Peers' wheels carried from benchmarks/fetch_peer_wheels.sh (pure Python; torch and triton are there).
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/peers .whl/*.whl \
        && export PYTHONPATH="/tmp/peers${PYTHONPATH:+:$PYTHONPATH}"
fi
# No network there: an editable install with the machine's own setuptools, else an in-place build.
if ! python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; then
    python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
rm -f "$OUT/build.log"  # keep the build log only when it failed
python3 -c "import flood_kernels as f; print('backends:', f.available_backends('cuda'))" | tee -a "$OUT/gpu.txt"

if [ "$stage" = test ] || [ "$stage" = all ]; then
    python3 -m pytest -q -x tests/ 2>&1 | tee "$OUT/tests.log" | tail -5
    if command -v compute-sanitizer >/dev/null 2>&1; then
        compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x tests/test_kernels.py \
            tests/test_single_read.py -k "cuda-cuda" > "$OUT/memcheck.log" 2>&1
        echo "memcheck exit code: $? (0 = no errors)" | tee -a "$OUT/gpu.txt"
        tail -3 "$OUT/memcheck.log"
    fi
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then
    python3 -m flood_kernels.bench --shapes "$shapes" --phases descent,ascent --out "$OUT/bench" 2> /dev/null \
        | tail -40
    (cd "$OUT/bench" && tar -cf plots.tar ./*.png && rm -f ./*.png) 2>/dev/null  # one file for the plots
    # Classification shapes are launch-bound: eager calls and CUDA-graph replays side by side.
    python3 -m flood_kernels.bench --shapes classification --phases descent,plain --modes fwd+bwd,graph \
        --min-seconds 0.1 --out "$OUT/cls" 2> /dev/null \
        | tail -40
    rm -f "$OUT"/cls/*.png
fi
if [ "$stage" = bench1r ] || [ "$stage" = all ]; then
    python3 -m flood_kernels.bench --shapes "$shapes" --phases plain,iflood --out "$OUT/bench1r" 2> /dev/null \
        | tail -60
    (cd "$OUT/bench1r" && tar -cf plots.tar ./*.png && rm -f ./*.png) 2>/dev/null
fi
