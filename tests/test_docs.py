"""The numbers the docs give: docs/using_flooding.md's for choosing b are what the loss computes, the README's
measured times are the committed results'."""

from __future__ import annotations

import json
import os
import re

import torch

from flood_kernels import flooded_cross_entropy

GUIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "using_flooding.md")


def guide() -> str:
    with open(GUIDE, encoding="utf-8") as file:
        return " ".join(file.read().split())  # claims may wrap lines


def rounds_to(value: float, stated: str) -> bool:
    """``value`` printed with as many decimals as ``stated`` has gives ``stated``."""
    decimals = len(stated.split(".")[1]) if "." in stated else 0
    return f"{value:.{decimals}f}" == stated


def test_noise_entropy_examples():
    """`r = 0.2, K = 2`: `H = 0.500`: the least expected cross-entropy under symmetric label noise, i.e. the loss of
    the predictor that outputs the noisy-label distribution itself, averaged over that distribution."""
    claims = re.findall(r"`r = ([\d.]+), K = (\d+)`: `H = ([\d.]+)`", guide())
    assert len(claims) >= 2
    for rate, classes, stated in claims:
        rate, classes = float(rate), int(classes)
        noisy = torch.full((classes,), rate / (classes - 1), dtype=torch.float64)
        noisy[0] = 1 - rate  # the true class is 0
        logits = noisy.log().expand(classes, classes)
        losses = flooded_cross_entropy(logits, torch.arange(classes), flood=None, reduction="none",
                                       backend="reference")
        entropy = float(losses @ noisy)
        assert rounds_to(entropy, stated), (rate, classes, entropy, stated)


def test_label_smoothing_floor_examples():
    """(1.01 at `eps = 0.1, V = 1000`; 1.36 at `V = 32000`): the label-smoothed loss at its minimum, the prediction
    equal to the smoothed targets, which a small move of the logits only raises."""
    claims = re.findall(r"\(([\d.]+) at `eps = ([\d.]+), V = (\d+)`; ([\d.]+) at `V = (\d+)`\)", guide())
    assert claims
    for first, eps, first_v, second, second_v in claims:
        eps = float(eps)
        for stated, classes in ((first, int(first_v)), (second, int(second_v))):
            smoothed = torch.full((classes,), eps / classes, dtype=torch.float64)
            smoothed[0] += 1 - eps
            logits = smoothed.log()[None]
            target = torch.zeros(1, dtype=torch.long)
            floor = float(flooded_cross_entropy(logits, target, flood=None, label_smoothing=eps, backend="reference"))
            assert rounds_to(floor, stated), (eps, classes, floor, stated)
            moved = logits + 1e-2 * torch.randn(logits.shape, dtype=torch.float64)
            assert float(flooded_cross_entropy(moved, target, flood=None, label_smoothing=eps,
                                               backend="reference")) > floor


README = os.path.join(os.path.dirname(GUIDE), os.pardir, "README.md")
PHASES = {"batch, J > b": "descent", "batch, J < b": "ascent", "flood=None": "plain", "iFlood": "iflood"}
COLUMNS = {"flood_kernels `cpu`": "flood_kernels[cpu]", "eager one-liner (upcast)": "eager (upcast)",
           "eager (no upcast)": "eager", "torch.compile (upcast)": "torch.compile (upcast)"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def readme_result_tables():
    """(results directory, header cells, rows of cells) of each README table of measured times: a table whose
    header starts with "N x V", measured by the last ``--out benchmarks/results/DIR`` command named before it."""
    with open(README, encoding="utf-8") as file:
        lines = file.read().splitlines()
    tables, directory = [], None
    for number, line in enumerate(lines):
        directory = (re.findall(r"--out (benchmarks/results/[\w-]+)", line) or [directory])[-1]
        if line.startswith("| N x V"):
            rows = []
            for row in lines[number + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip() for cell in row.strip("|").split("|")])
            tables.append((directory, [cell.strip() for cell in line.strip("|").split("|")], rows))
    return tables


def test_mixup_target_floor_example():
    """a mixup target `0.7 e_a + 0.3 e_b` has `H = 0.611` nats: the loss of the prediction equal to that target,
    the least loss (a small move of the logits only raises it), and iFlood's level ``entr(q).sum(1) + delta``
    sits ``delta`` above it."""
    claims = re.findall(r"a mixup target `([\d.]+) e_a \+ ([\d.]+) e_b` has `H = ([\d.]+)`", guide())
    assert len(claims) == 1
    first, second, stated = claims[0]
    q = torch.zeros(1, 5, dtype=torch.float64)
    q[0, 1], q[0, 3] = float(first), float(second)
    logits = q.clamp_min(1e-30).log()
    floor = float(flooded_cross_entropy(logits, q, flood=None))
    assert rounds_to(floor, stated), (floor, stated)
    moved = logits + 1e-2 * torch.randn(logits.shape, dtype=torch.float64)
    assert float(flooded_cross_entropy(moved, q, flood=None)) > floor
    assert "torch.special.entr(q).sum(1) + delta" in guide()
    level = torch.special.entr(q).sum(1) + 0.25
    assert abs(float(level[0]) - floor - 0.25) < 1e-12


def test_readme_measured_tables_are_the_committed_results():
    """Every time and ratio in the README's tables of measured numbers is the committed results.json's, to the
    digits shown: ``ms`` (``2-pass`` the two-pass path's), and ``ms (ratio x)`` with the ratio to our column."""
    tables = readme_result_tables()
    assert len(tables) >= 2
    for directory, header, rows in tables:
        with open(os.path.join(os.path.dirname(README), directory, "results.json"), encoding="utf-8") as file:
            records = json.load(file)["records"]
        header_dtype = header[0].partition(", ")[2]
        assert rows and header[1] == "phase" and all(name in COLUMNS for name in header[2:]), header
        for cells in rows:
            shape, _, row_dtype = cells[0].partition(", ")
            n, v = (int(size) for size in shape.split(" x "))
            key = (n, v, DTYPES[row_dtype or header_dtype], PHASES[cells[1]], "fwd+bwd")
            times = {r["implementation"]: r["ms"] for r in records
                     if (r["n"], r["v"], r["dtype"], r["phase"], r["mode"]) == key}
            ours_printed, _, two_pass = cells[2].partition(" (2-pass ")
            ours = times[COLUMNS[header[2]]]
            assert rounds_to(ours, ours_printed), (directory, cells)
            if two_pass:
                assert rounds_to(times["flood_kernels[cpu,2-pass]"], two_pass.rstrip(")")), (directory, cells)
            for name, cell in zip(header[3:], cells[3:]):
                printed, ratio = re.fullmatch(r"([\d.]+) \(([\d.]+)x\)", cell).groups()
                assert rounds_to(times[COLUMNS[name]], printed), (directory, cells, name)
                assert rounds_to(times[COLUMNS[name]] / ours, ratio), (directory, cells, name)
