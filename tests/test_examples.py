"""The examples run end to end at a tiny size (seconds) and write their table and plot."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

pytest.importorskip("matplotlib")  # the examples' plots: optional extra "examples"

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")


@pytest.fixture(autouse=True)
def restore_threads():
    """The examples call torch.set_num_threads(1); leave the rest of the session as it was."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str):
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


def test_label_noise_quick(tmp_path):
    example = load("label_noise")
    text = example.main(["--quick", "--seeds", "2", "--out", str(tmp_path)])
    rows = table_rows(text)
    assert [(r[0], r[1]) for r in rows] == [(d, m) for d in example.DATASETS for m in example.METHODS]
    for row in rows:
        accuracy, memorized = (float(row[i].split("±")[0]) for i in (2, 3))
        assert 0.0 <= accuracy <= 1.0 and 0.0 <= memorized <= 1.0
    assert (tmp_path / "label_noise_r20.md").read_text() == text
    assert (tmp_path / "label_noise_r20.png").stat().st_size > 1000
    assert example.noise_entropy(0.2) == pytest.approx(-0.8 * math.log(0.8) - 0.2 * math.log(0.2))
    assert example.noise_entropy(0.4, classes=10) == pytest.approx(-0.6 * math.log(0.6) - 0.4 * math.log(0.4 / 9))


def test_char_lm_quick(tmp_path):
    example = load("char_lm")
    text = example.main(["--quick", "--out", str(tmp_path)])
    rows = table_rows(text)
    assert [r[0] for r in rows] == ["none (plain CE)", "3"]
    for row in rows:
        values = [float(row[i].split()[0]) for i in (1, 2, 3, 4)]
        assert all(math.isfinite(v) and 0.0 < v < 10.0 for v in values)
    assert (tmp_path / "char_lm.png").stat().st_size > 1000
    assert (tmp_path / "char_lm.md").read_text() == text
