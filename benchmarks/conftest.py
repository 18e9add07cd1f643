"""Benchmarks run on the GPU when there is one; CPU shapes otherwise. Triton's interpreter is never timed.

With ``FLOOD_KERNELS_BENCH_LOG=path`` each benchmark appends its result to ``path`` as one JSON line when it
ends: pytest-benchmark writes ``--benchmark-json`` only when the whole session ends, so a run cut short by a
deadline (benchmarks/gpu_session.sh) would otherwise keep nothing of what it measured.
"""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture(autouse=True)
def _log_each_benchmark(request):
    yield
    path = os.environ.get("FLOOD_KERNELS_BENCH_LOG")
    fixture = request.node.funcargs.get("benchmark")
    if not path or fixture is None or getattr(fixture, "stats", None) is None:
        return
    stats = fixture.stats.stats
    record = {"name": request.node.name, "median_ms": stats.median * 1e3, "min_ms": stats.min * 1e3,
              "rounds": stats.rounds, "extra_info": dict(fixture.extra_info)}
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
