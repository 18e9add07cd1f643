"""How accurate grad_W of the fused linear loss is with each ``grad_weight_accumulator``, against float64.

    python benchmarks/grad_weight_accuracy.py [--rows 8192] [--features 256] [--classes 4096] [--out DIR]

bf16 hidden states and head (the head scaled so the logits are of order 1), batch flooding at level 0.5, the
``cpu`` backend (``reference`` without the extension); grad_W summed over 8, 32 and 128 chunks. Each cell is
``|grad_W - grad_W64| / |grad_W64|`` (Frobenius norms), ``grad_W64`` the float64 gradient of the same bf16
values; the floor every accumulator shares is the rounding of each chunk's bf16 gradient. Prints a markdown table
and writes grad_weight_accuracy.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import flood_kernels
from flood_kernels.linear import GRAD_WEIGHT_ACCUMULATORS, linear_flooded_cross_entropy

LEVEL = 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--classes", type=int, default=4096)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    n, d, v = args.rows, args.features, args.classes
    backend = "cpu" if "cpu" in flood_kernels.available_backends("cpu") else "reference"
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=generator).bfloat16()
    w = (torch.randn(v, d, generator=generator) / d ** 0.5).bfloat16()
    target = torch.randint(0, v, (n,), generator=generator)
    w64 = w.double().requires_grad_()
    flood_kernels.flooded_cross_entropy(h.double() @ w64.t(), target, flood_level=LEVEL,
                                        backend="reference").backward()
    rows = []
    for chunks in (8, 32, 128):
        errors = {}
        for accumulator in GRAD_WEIGHT_ACCUMULATORS:
            w_leaf = w.clone().requires_grad_()
            linear_flooded_cross_entropy(h, w_leaf, target, flood_level=LEVEL, chunk_size=-(-n // chunks),
                                         grad_weight_accumulator=accumulator, backend=backend).backward()
            errors[accumulator] = float((w_leaf.grad.double() - w64.grad).norm() / w64.grad.norm())
        rows.append({"chunks": chunks, "relative_error": errors})
    result = {"rows": n, "features": d, "classes": v, "dtype": "bfloat16", "backend": backend,
              "torch": torch.__version__, "flood_level": LEVEL, "results": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grad_weight_accuracy.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"grad_W relative error (Frobenius) vs float64, N={n} D={d} V={v} bf16, backend {backend}")
    print("| chunks | " + " | ".join(GRAD_WEIGHT_ACCUMULATORS) + " |\n|---|" + "---|" * len(GRAD_WEIGHT_ACCUMULATORS))
    for row in rows:
        print(f"| {row['chunks']} | " + " | ".join(f"{row['relative_error'][a]:.3e}"
                                                  for a in GRAD_WEIGHT_ACCUMULATORS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
