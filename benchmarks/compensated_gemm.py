"""grad_W's update for one chunk on its own, at the fused linear loss's benchmark shape: the compensated GEMM of
flood_kernels/triton/compensated_sum.py (the launcher's tiles, then alternatives) next to cuBLAS adding the same
product into a float32 accumulator (``grad_weight_accumulator="float32"``) and into a bf16 one ("weight_dtype").

    python benchmarks/compensated_gemm.py [--classes 128256] [--features 4096] [--rows 1024,2048] [--out DIR]

Per variant and chunk size (the accumulator's traffic per chunk is fixed, so a larger chunk spreads it over more
rows): ms per chunk, TFLOP/s of the product, and the accumulator's bytes per chunk (read and written: 6
per weight for the pair, 8 for float32, 4 for bf16) over that time. Prints a table, writes compensated_gemm.json
to --out. Without a GPU it runs on CPU (the Triton interpreter, small shapes: a check that the script works,
not a measurement; cuBLAS's float32 variant is then an error row, CPU has no mixed-precision GEMM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Tuple

import torch

from flood_kernels import bench
from flood_kernels.triton import compensated_sum

# Tile sets tried besides the launcher's, as (BLOCK_C, BLOCK_F, BLOCK_R, warps, stages, register cap).
ALTERNATIVE_TILES = {9: [(128, 128, 64, 8, 4, 128), (128, 128, 64, 8, 3, None), (128, 256, 64, 8, 3, None),
                         (256, 128, 64, 8, 3, None)],
                     8: [(128, 128, 32, 8, 4, None), (128, 256, 32, 8, 3, None)]}


def variants_for(rows: int, classes: int, features: int, device: torch.device, tile_sets: List[tuple],
                 accumulators: Dict[str, torch.Tensor]) -> Dict[str, Tuple[Callable[[], object], int]]:
    """name -> (one chunk's update, accumulator bytes per weight) at ``rows`` rows per chunk."""
    generator = torch.Generator(device=device).manual_seed(rows)
    grad_logits = torch.randn(rows, classes, generator=generator, device=device).div_(classes).bfloat16()
    h = torch.randn(rows, features, generator=generator, device=device).bfloat16()
    high, low, float32_sum = accumulators["high"], accumulators["low"], accumulators["float32"]
    variants = {}
    for tiles in tile_sets:
        name = "compensated " + "x".join(map(str, tiles[:3])) + f" w{tiles[3]} s{tiles[4]} r{tiles[5]}"
        variants[name] = (lambda tiles=tiles: compensated_sum.accumulate_(high, low, grad_logits, h, tiles), 6)
    variants["cuBLAS into float32"] = (lambda: torch.addmm(float32_sum, grad_logits.t(), h, out_dtype=torch.float32,
                                                           out=float32_sum), 8)
    variants["cuBLAS into bf16"] = (lambda: high.addmm_(grad_logits.t(), h), 4)
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=128256)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--rows", default="1024,2048",
                        help="rows per chunk, a comma list (1024: the default chunk at V = 128256); tile "
                             "alternatives at the first only")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    v, d = args.classes, args.features
    launcher_tiles = compensated_sum._tiles(device)
    alternatives = ALTERNATIVE_TILES[9 if torch.cuda.get_device_capability(device)[0] >= 9 else 8] \
        if device.type == "cuda" else []
    accumulators = {"high": torch.zeros(v, d, dtype=torch.bfloat16, device=device),
                    "low": torch.zeros(v, d, dtype=torch.int8, device=device),
                    "float32": torch.zeros(v, d, dtype=torch.float32, device=device)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    result = {"device": name, "torch": torch.__version__, "classes": v, "features": d,
              "launcher_tiles": launcher_tiles, "variants": []}
    os.makedirs(args.out, exist_ok=True)
    print(f"{name}: grad_W update of one chunk, V={v} D={d}, bf16")
    print("| variant | rows | ms | TFLOP/s | accumulator GB/s |\n|---|---|---|---|---|", flush=True)
    # Each row is printed and the JSON rewritten as soon as it is measured: a deadline keeps what was.
    for index, c in enumerate(int(r) for r in args.rows.split(",")):
        tile_sets = [launcher_tiles] + (alternatives if index == 0 else [])
        for variant, (step, accumulator_bytes) in variants_for(c, v, d, device, tile_sets, accumulators).items():
            try:
                ms = bench.time_ms(step, device, min_seconds=0.3 if device.type == "cuda" else 0.0)
            except Exception as error:  # a tile set that does not compile or launch here is a finding, not a crash
                row = {"variant": variant, "rows": c, "error": f"{type(error).__name__}: {error}"}
                print(f"| {variant} | {c} | {row['error'][:80]} | | |", flush=True)
            else:
                row = {"variant": variant, "rows": c, "ms": ms, "tflops": 2.0 * v * d * c / ms / 1e9,
                       "accumulator_gbps": accumulator_bytes * v * d / ms / 1e6}
                print(f"| {variant} | {c} | {ms:.3f} | {row['tflops']:.0f} | {row['accumulator_gbps']:.0f} |",
                      flush=True)
            result["variants"].append(row)
            with open(os.path.join(args.out, "compensated_gemm.json"), "w") as f:
                json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
