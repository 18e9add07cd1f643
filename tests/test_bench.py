"""The benchmark command (the README's main job) runs end to end and writes what it promises."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flood_kernels import available_backends, bench

from helpers import requires_cuda


def test_bench_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--device", "cpu", "--shapes", "smoke", "--no-compile", "--min-seconds", "0",
                       "--modes", "fwd+bwd,fwd", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["copy_bandwidth_gbps"] > 0
    records = results["records"]
    implementations = {r["implementation"] for r in records}
    ours = {f"flood_kernels[{b}]" for b in available_backends("cpu") if b not in ("reference", "triton")}
    forced = {f"flood_kernels[cpu,{path}]" for path in ("1-read", "2-pass") if "flood_kernels[cpu]" in ours}
    expected = {"eager (upcast)", "eager"} | ours | forced
    assert implementations == expected
    cells = {(r["n"], r["v"], r["dtype"], r["phase"], r["mode"]) for r in records}
    assert len(cells) == len(bench.SHAPE_SETS["smoke"]) * len(bench.PHASES) * 2
    for cell in cells:
        names = {r["implementation"] for r in records if (r["n"], r["v"], r["dtype"], r["phase"], r["mode"]) == cell}
        assert names == (expected if cell[3] in bench.SINGLE_READ_PHASES else expected - forced), cell
    bandwidth = results["meta"]["copy_bandwidth_gbps"]
    for r in records:
        logits_bytes = r["n"] * r["v"] * (4 if r["dtype"] == "float32" else 2)
        passes = 3 if r["mode"] == "fwd+bwd" else 1
        assert r["ms"] > 0
        assert r["gbps"] == pytest.approx(passes * logits_bytes / (r["ms"] * 1e-3) / 1e9)
        assert r["pct_floor_2r1w"] == pytest.approx(100 * r["gbps"] / bandwidth)
        assert r["pct_floor_1r1w"] == pytest.approx(r["pct_floor_2r1w"] * (2 / 3 if passes == 3 else 1))
    assert results["meta"]["cells"] == len(records) and results["meta"]["cells_not_run"] == 0
    table = (out / "results.md").read_text()
    short, full = table.split("Device: ")
    assert full.count("\n| ") == len(records) + 1  # header + one row per record
    assert short.count("\n| ") == len(cells) + 1  # the pivot: header + one row per cell
    assert "copy bandwidth" in capsys.readouterr().out
    assert bench.main(["--summarize", str(out)]) == 0
    assert capsys.readouterr().out.count("\n| ") == len(cells) + 1


def test_time_budget_keeps_what_was_measured(tmp_path):
    out = tmp_path / "bench"
    assert bench.main(["--device", "cpu", "--shapes", "smoke", "--no-compile", "--min-seconds", "0",
                       "--phases", "descent", "--time-budget", "0", "--out", str(out)]) == 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["cells"] > 0 and meta["cells_not_run"] == meta["cells"]
    assert "cells not measured" in (out / "results.md").read_text()


def test_shapes_are_sets_and_explicit_shapes_in_order():
    assert bench.parse_shapes("smoke,3x5:bfloat16") == bench.SHAPE_SETS["smoke"] + [(3, 5, "bfloat16")]
    for bad in ("3x:float32", "3x5", "3x5:float33", "0x5:float32", "nonsense"):
        with pytest.raises(ValueError, match="--shapes"):
            bench.parse_shapes(bad)


def test_an_implementation_that_overwrites_its_input_gets_a_copy():
    x, target = bench.make_inputs(8, 16, torch.float32, torch.device("cpu"))
    before = x.clone()

    def overwrites(logits, target, flood, level):
        with torch.no_grad():
            logits.mul_(-1.0)  # what Liger's forward does: its gradient written over the logits
        return torch.nn.functional.cross_entropy(logits, target)

    (name,) = bench.OVERWRITES_INPUT
    bench.run_case(name, overwrites, x, target, "descent", "fwd+bwd", torch.device("cpu"), 1.0, 0.0)
    torch.testing.assert_close(x.detach(), before, rtol=0, atol=0)


def test_a_cell_does_not_leave_its_gradient_allocated():
    x, target = bench.make_inputs(8, 16, torch.float32, torch.device("cpu"))
    bench.run_case("eager", bench.implementations(torch.device("cpu"), with_compile=False)["eager"], x, target,
                   "descent", "fwd+bwd", torch.device("cpu"), 1.0, 0.0)
    assert x.requires_grad and x.grad is None  # the next implementation starts without this N x V buffer


def test_graph_mode_needs_cuda(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--shapes", "smoke", "--modes", "graph", "--out", str(tmp_path)])


def test_benchmark_suite_logs_each_cell_as_it_ends(tmp_path):
    """FLOOD_KERNELS_BENCH_LOG: one JSON line per benchmark as it ends (a deadline keeps what was measured)."""
    log = tmp_path / "cells.jsonl"
    # Without this process's xdist variables: under xdist, pytest-benchmark would disable timing in the child too.
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_XDIST")}
    env["FLOOD_KERNELS_BENCH_LOG"] = str(log)
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                           "--benchmark-min-rounds=1", "benchmarks/test_bench_linear.py"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    passed = int(re.search(r"(\d+) passed", done.stdout).group(1))
    assert len(records) == passed > 0
    for record in records:
        assert record["name"].startswith("test_linear_forward_backward[")
        assert record["median_ms"] > 0 and record["rounds"] >= 1
        assert record["extra_info"]["ms"] == pytest.approx(record["median_ms"])


@requires_cuda
@pytest.mark.gpu
def test_a_failed_capture_leaves_the_current_stream_as_it_was():
    """An implementation that synchronizes (``.item()``) cannot be captured: the error reaches the caller, and
    the cells after it still run on the stream they ran on before."""
    device = torch.device("cuda")
    x = torch.ones(4, device=device)
    before = torch.cuda.current_stream(device)
    with pytest.raises(RuntimeError):
        bench._captured(lambda: x.sum().item(), device)
    assert torch.cuda.current_stream(device) == before


def run_benchmark_script(name: str, *arguments: str, **environment: str) -> subprocess.CompletedProcess:
    """``python benchmarks/<name> arguments`` with this checkout importable and ``environment`` added; it must
    exit 0."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / name), *arguments], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(repo), **environment), timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_compensated_gemm_benchmark_runs(tmp_path):
    """benchmarks/compensated_gemm.py (a gpu_session.sh step) end to end at a tiny shape on CPU: the compensated
    GEMM and cuBLAS-into-bf16 rows are timed, the float32 one is an error row (no mixed-precision GEMM on CPU)."""
    done = run_benchmark_script("compensated_gemm.py", "--classes", "70", "--features", "45", "--rows", "37",
                                "--out", str(tmp_path), TRITON_INTERPRET="1")
    rows = {(row["variant"], row["rows"]): row
            for row in json.loads((tmp_path / "compensated_gemm.json").read_text())["variants"]}
    assert rows[("compensated 32x32x16 w1 s1 rNone", 37)]["ms"] > 0 and rows[("cuBLAS into bf16", 37)]["ms"] > 0
    assert "error" in rows[("cuBLAS into float32", 37)]
    assert "| compensated 32x32x16 w1 s1 rNone | 37 |" in done.stdout


def test_grad_weight_accuracy_benchmark_runs(tmp_path):
    """benchmarks/grad_weight_accuracy.py end to end at a tiny shape: every accumulator, every chunk count, and
    the compensated sum as accurate as float32's while the bf16 one is not."""
    done = run_benchmark_script("grad_weight_accuracy.py", "--rows", "512", "--features", "16", "--classes", "64",
                                "--out", str(tmp_path))
    results = json.loads((tmp_path / "grad_weight_accuracy.json").read_text())["results"]
    assert [row["chunks"] for row in results] == [8, 32, 128]
    for row in results:
        errors = row["relative_error"]
        assert errors["compensated"] <= 1.05 * errors["float32"] < errors["weight_dtype"], row
    assert "| 128 |" in done.stdout
