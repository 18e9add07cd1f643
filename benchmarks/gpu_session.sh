#!/usr/bin/env bash
# Everything the GPU machine must check, in ONE device call sized for a session's device time (15 minutes,
# the machine's start included): run it with timeout_s 600; the default budget (560 s) ends before that.
#
#   here:   bash benchmarks/fetch_peer_wheels.sh     # Liger, Cut Cross-Entropy, pytest-xdist wheels into .whl/
#           bash scripts/build_for_device.sh         # flood_kernels._C built here for the device's torch
#   device: bash benchmarks/gpu_session.sh [budget_seconds] [steps]     with carry [".whl", ".gpu_build"]
#   here:   python -m flood_kernels.bench --replot DIR   # each fetched results.json -> results.md + plots
#
# Steps, in this order, each under a deadline of its own so that the later ones still run (default: all):
#   build     the carried .gpu_build/_C.abi3.so when it is of these sources and loads, else a build
#   tests     the GPU tests (-m gpu: every cuda-* backend case and the GPU-only tests; CI runs the rest)
#   cls       the launch-bound classifier target: 256 x 1000 fp32, eager calls and CUDA-graph replays
#   bench     the LLM targets (shape set "targets", most important first) in all four phases, every backend
#             next to the one-liners, torch.compile and the carried peers; no cell starts after its deadline
#   linear    the fused linear + flooded CE suite (benchmarks/test_bench_linear.py) with its peers
#   memcheck  compute-sanitizer memcheck over the CUDA backend's kernel tests (every option, V from 1 to
#             524288, strided, in-place, the single-read path and its cluster sizes)
#   gemm      grad_W's per-chunk update alone (benchmarks/compensated_gemm.py): the compensated GEMM's tile sets
#             against cuBLAS into float32 / bf16, at 1024 and 2048 rows per chunk, with what is left of the
#             budget (~25 s for all of it; each row and the JSON are written as measured)
# What comes back (8 files at most; 7 unless a step failed): gpu.txt (device, versions, one line per step, the
# gemm table), tests.log, bench.log (the benchmarks' stderr), cls/results.json, bench/results.json (written after
# every cell: a deadline keeps what was measured), linear.json (pytest-benchmark; linear.jsonl instead, a line
# per cell, when cut short), compensated_gemm.json, and memcheck.log or build.log when they failed. The GPU tests
# run in 8 processes when .whl/ carries pytest-xdist.
set -uo pipefail
budget="${1:-560}"
steps="${2:-build tests cls bench linear memcheck gemm}"
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
start=$(date +%s)
export PYTHONUNBUFFERED=1 MAX_JOBS=16 FLOOD_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
summary="$OUT/gpu.txt"
say() { echo "$*" | tee -a "$summary"; }
elapsed() { echo $(( $(date +%s) - $1 )); }
# Seconds a step may take: its share, but never so much that less than $2 is left for the steps after it.
allow() { local share=$1 rest=$(( budget - $(elapsed "$start") - ${2:-0} ))
          (( rest < share )) && share=$rest; (( share < 5 )) && share=5; echo "$share"; }
has() { [[ " $steps " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader | tee "$summary"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$summary"
# Peers' wheels carried from benchmarks/fetch_peer_wheels.sh (pure Python; torch and triton are there).
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/peers .whl/*.whl \
        && export PYTHONPATH="/tmp/peers${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
backends() { python3 -c "import flood_kernels as f; print(' '.join(f.available_backends('cuda')))" 2>/dev/null; }

if has build; then
    t0=$(date +%s)
    rm -f flood_kernels/_C*.so
    sources_hash="$(bash scripts/sources_hash.sh)"
    if [ -f .gpu_build/_C.abi3.so ] && [ "$(cut -d' ' -f1 .gpu_build/stamp 2>/dev/null)" = "$sources_hash" ]; then
        cp .gpu_build/_C.abi3.so flood_kernels/_C.abi3.so
        if [[ " $(backends) " == *" cuda "* ]]; then
            say "extension: the carried build ($(cat .gpu_build/stamp))"
        else
            rm -f flood_kernels/_C.abi3.so
            say "extension: the carried build does not load here; building"
        fi
    elif [ -f .gpu_build/_C.abi3.so ]; then
        say "extension: the carried build is of other sources; building"
    fi
    if [ ! -f flood_kernels/_C.abi3.so ]; then
        if timeout "$(allow 240)" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
            rm -f "$OUT/build.log"
        else
            say "extension: BUILD FAILED (build.log)"
        fi
    fi
    say "build: $(elapsed "$t0") s; backends for cuda tensors: $(backends)"
fi
if has tests; then
    t0=$(date +%s)
    parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
    # -v: one line per test as it ends, so a deadline still leaves a record of what passed.
    FLOOD_KERNELS_EXPECT_BACKENDS="cuda:triton,cuda" timeout "$(allow 170 370)" python3 -m pytest -v -rfE --tb=short -m gpu -p no:cacheprovider $parallel tests/ \
        > "$OUT/tests.log" 2>&1
    say "tests (exit $?; 124 = deadline): $(grep -E ' in [0-9.]+s' "$OUT/tests.log" | tail -1); $(elapsed "$t0") s"
fi
if has cls; then
    t0=$(date +%s)
    timeout "$(allow 45 325)" python3 -m flood_kernels.bench --shapes 256x1000:float32,1024x100:float32 \
        --phases descent,plain,iflood --modes fwd+bwd,graph --no-compile --min-seconds 0.2 --time-budget 35 \
        --out "$OUT/cls" > /dev/null 2>> "$OUT/bench.log"
    say "cls bench (exit $?): $(elapsed "$t0") s"
fi
if has bench; then
    t0=$(date +%s)
    hard=$(allow 160 165)
    # The benchmark keeps a deadline of its own (no cell starts after it) before the hard one.
    timeout "$hard" python3 -m flood_kernels.bench --shapes targets --phases descent,ascent,plain,iflood \
        --min-seconds 0.15 --time-budget $(( hard - 30 )) --out "$OUT/bench" > /dev/null 2>> "$OUT/bench.log"
    say "bench (exit $?): $(elapsed "$t0") s; $(python3 -c "
import json; m = json.load(open('$OUT/bench/results.json'))['meta']
print(m['cells'] - m['cells_not_run'], 'of', m['cells'], 'cells measured')" 2>/dev/null)"
fi
if has linear; then
    t0=$(date +%s)
    # pytest-benchmark writes its JSON only at the end: each cell also goes to linear.jsonl as it ends, which
    # comes back in its place when a deadline cuts the suite short.
    rm -f /tmp/linear.json
    FLOOD_KERNELS_BENCH_LOG="$OUT/linear.jsonl" timeout "$(allow 90 75)" python3 -m pytest -q -p no:cacheprovider \
        benchmarks/test_bench_linear.py --benchmark-only --benchmark-json /tmp/linear.json >> "$OUT/bench.log" 2>&1
    code=$?
    # (pytest-benchmark creates the file, empty, when it starts.)
    python3 -c "import json; json.load(open('/tmp/linear.json'))" 2>/dev/null \
        && mv /tmp/linear.json "$OUT/linear.json" && rm -f "$OUT/linear.jsonl"
    cells=$(cat "$OUT/linear.jsonl" 2>/dev/null | wc -l)
    say "linear bench (exit $code): $(elapsed "$t0") s; $cells cells in linear.jsonl"
fi
if has memcheck && command -v compute-sanitizer >/dev/null 2>&1; then
    t0=$(date +%s)
    # Without the caching allocator every tensor is its own allocation, so an access past its end is caught.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(allow 75)" compute-sanitizer --tool memcheck \
        --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_single_read.py \
        -k "cuda-cuda and (options_match or narrower or vocabulary or strided or inplace or single_row or cluster_boundaries)" \
        > "$OUT/memcheck.log" 2>&1
    code=$?
    say "memcheck (exit $code: 0 = clean, 9 = errors, 124 = deadline): $(grep -E 'ERROR SUMMARY| in [0-9.]+s' \
        "$OUT/memcheck.log" | tail -2 | tr '\n' ' '); $(elapsed "$t0") s"
    [ "$code" -eq 0 ] && rm -f "$OUT/memcheck.log"
fi
if has gemm; then
    t0=$(date +%s)
    timeout "$(allow 25)" python3 benchmarks/compensated_gemm.py --out "$OUT" >> "$summary" 2>> "$OUT/bench.log"
    say "gemm (exit $?): $(elapsed "$t0") s"
fi
rm -f "$OUT"/*/*.png "$OUT"/*/results.md
say "total $(elapsed "$start") s of a $budget s budget"
grep -E "FAILED|ERROR" "$OUT/tests.log" 2>/dev/null | head -20
for results in "$OUT/cls" "$OUT/bench"; do
    [ -f "$results/results.json" ] && python3 -m flood_kernels.bench --summarize "$results"
done
