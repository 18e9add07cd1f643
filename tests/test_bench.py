"""The benchmark command (the README's main job) runs end to end and writes what it promises."""

from __future__ import annotations

import json

import pytest

from flood_kernels import available_backends, bench


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
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == len(records) + 1  # header + one row per record
    assert "copy bandwidth" in capsys.readouterr().out


def test_graph_mode_needs_cuda(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--shapes", "smoke", "--modes", "graph", "--out", str(tmp_path)])
