"""Compile-only check of the Triton kernels for NVIDIA GPUs, on a machine without one (CI).

The Triton interpreter, which the test suite uses without a GPU, accepts code that the real compiler
rejects and says nothing about speed. This compiles every kernel variant (each dtype, each combination of
the compile-time switches) for sm_90 (and sm_80) with the launch configuration the launcher would pick at
V = 128256 (loss_and_grad also at the largest aligned and unaligned Vs it keeps in registers, its row-resident
variant), as a launch with 16-byte aligned rows (or, at an odd V, unaligned ones) would specialize it, and reads
the result:

* the compilation must succeed;
* no local memory (register spills or stack) in the resource usage that cuobjdump reports;
* at a V that is a multiple of 16, the PTX must load the logits with 16-byte vector loads
  (``ld.global.v4.b32`` / ``.v2.b64``), and the kernels that write a gradient (backward, loss_and_grad,
  scale_grad) must store it with 16-byte vector stores;
* no float64 instruction in a kernel of float32 arithmetic (float64 logits are the only float64 kernels).

Small vocabularies (V = 1, 10, 1000: other block sizes and warp counts, unaligned rows) must compile too.
Prints a table (registers per thread, shared memory, load width per variant) and exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler: must be decided before the kernels are imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.backends.nvidia as nvidia_backend  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flood_kernels import compensated_sum as compensated_spec  # noqa: E402
from flood_kernels.triton import compensated_sum as compensated  # noqa: E402
from flood_kernels.triton import cross_entropy as ce  # noqa: E402
from flood_kernels.triton import flood_epilogue as epilogue  # noqa: E402

V = 128256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
ACC = {"fp64": "fp64"}
CUOBJDUMP = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "cuobjdump")


# The float options as a launch passes them (Python floats: fp32), each followed later by its rounding error.
OPTIONS = {name: "fp32" for name in ("label_smoothing", "z_loss", "softcap", "reverse_ce_coef", "label_smoothing_lo",
                                     "z_loss_lo", "softcap_lo", "reverse_ce_coef_lo")}


def forward_signature(dtype: str):
    acc = ACC.get(dtype, "fp32")
    return {"losses_ptr": f"*{acc}", "lse_ptr": f"*{acc}", "logits_ptr": f"*{dtype}", "target_ptr": "*i64",
            "weight_ptr": f"*{acc}", "logits_row_stride": "i32", "n_classes": "i32", "ignore_index": "i32",
            **OPTIONS}


def backward_signature(dtype: str):
    acc = ACC.get(dtype, "fp32")
    return {"grad_ptr": f"*{dtype}", "grad_losses_ptr": f"*{acc}", "logits_ptr": f"*{dtype}", "target_ptr": "*i64",
            "weight_ptr": f"*{acc}", "weight_sum_ptr": f"*{acc}", "lse_ptr": f"*{acc}", "grad_row_stride": "i32",
            "logits_row_stride": "i32", "n_classes": "i32", "ignore_index": "i32", **OPTIONS}


def loss_and_grad_signature(dtype: str):
    acc = ACC.get(dtype, "fp32")
    return {"losses_ptr": f"*{acc}", "grad_ptr": f"*{dtype}", "logits_ptr": f"*{dtype}", "target_ptr": "*i64",
            "weight_ptr": f"*{acc}", "weight_sum_ptr": f"*{acc}", "flood_level_ptr": f"*{acc}",
            "grad_scale_ptr": f"*{acc}", "grad_row_stride": "i32", "logits_row_stride": "i32",
            "flood_level_stride": "i32", "n_classes": "i32", "ignore_index": "i32", **OPTIONS}


def scale_grad_signature(dtype: str):
    """``n_elements`` as a launch past ``2**31`` elements passes it."""
    return {"grad_ptr": f"*{dtype}", "grad_output_ptr": f"*{ACC.get(dtype, 'fp32')}", "n_elements": "i64"}


def blocked_config(v: int, dtype: torch.dtype, switches: dict):
    """(block, num_warps, other constexprs) of the forward, backward and scale_grad launchers."""
    return (*ce._launch_config(v, dtype.itemsize), {})


def loss_and_grad_config(v: int, dtype: torch.dtype, switches: dict):
    """(block, num_warps, other constexprs) of the loss_and_grad launcher: row-resident or not, as it picks."""
    row_resident, block, num_warps = ce._loss_and_grad_config(v, dtype, switches["HAS_SOFTCAP"], v % 16 == 0)
    return block, num_warps, {"ROW_RESIDENT": row_resident}


def only_v(dtype: str, switches: dict):
    """The Vs to compile a variant at: V alone."""
    return (V,)


def v_and_largest_resident_v(dtype: str, switches: dict):
    """V, and the largest aligned and unaligned Vs that loss_and_grad keeps in registers (its registers grow
    with V)."""
    dtype, softcap = DTYPES[dtype], switches["HAS_SOFTCAP"]
    unaligned = ce._resident_classes(dtype, softcap, aligned=False) - 1  # -1: no unaligned row is kept (fp64)
    return (V, ce._resident_classes(dtype, softcap)) + ((unaligned,) if unaligned > 0 else ())


def compile_kernel(kernel, signature: dict, constexprs: dict, arch: int, options: dict, aligned=()):
    """Compile ``kernel`` for sm_``arch``: ``signature`` (argument -> type), its ``constexprs`` and the launch
    ``options``, the ``aligned`` arguments specialized as multiples of 16 (as a launch with such values would)."""
    names = list(signature) + list(constexprs)
    src = ASTSource(fn=kernel, signature=dict(signature, **dict.fromkeys(constexprs, "constexpr")),
                    constexprs={(names.index(name),): value for name, value in constexprs.items()},
                    attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def compile_variant(kernel, signature, switches, dtype: str, arch: int, config, v: int = V):
    """Compile one variant as a launch at ``v`` classes (elements, for scale_grad) with ``config``'s launch
    configuration would specialize it; returns the compiled kernel."""
    block, num_warps, launch_constexprs = config(v, DTYPES[dtype], switches)
    block_name = "BLOCK_V" if "BLOCK_V" in kernel.arg_names else "BLOCK"
    constexprs = dict(switches, ACC_DTYPE=tl.float64 if dtype == "fp64" else tl.float32, **{block_name: block},
                      **launch_constexprs)
    sizes = ("n_classes", "n_elements")
    aligned = [name for name, kind in signature.items()
               if kind.startswith("*") or (v % 16 == 0 and (name.endswith("row_stride") or name in sizes))]
    return compile_kernel(kernel, signature, constexprs, arch, {"num_warps": num_warps}, aligned)


def resource_usage(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                                check=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", report)}


def local_bytes(usage: dict) -> int:
    """Local memory per thread in a :func:`resource_usage` report: register spills and stack."""
    return usage.get("LOCAL", 0) + usage.get("STACK", 0)


def check_variant(name, kernel, signature, switches, dtype: str, arch: int, config, v: int) -> list:
    """Compile one variant, print its table row; returns the failures (errors, spills, no 16-byte accesses)."""
    on = ",".join(n.removeprefix("HAS_").lower() for n, value in switches.items() if value) or "-"
    label = f"{name} {dtype} V={v} sm_{arch} [{on}]"
    start = time.perf_counter()
    try:
        compiled = compile_variant(kernel, signature(dtype), switches, dtype, arch, config, v)
    except Exception as error:  # any compiler error is the finding
        print(f"| {name} | {dtype} | {v} | {arch} | {on} | FAILED | | | | |")
        return [f"{label}: {type(error).__name__}: {error}"]
    usage = resource_usage(compiled)
    ptx = compiled.asm["ptx"]
    vector_accesses = bool(re.search(r"ld\.global(\.\w+)*\.v(4\.b32|2\.b64)", ptx))
    if name != "forward":
        vector_accesses &= bool(re.search(r"st\.global(\.\w+)*\.v(4\.b32|2\.b64)", ptx))
    # Float options reach a float32 kernel as float32 (the float64 kernels also add their rounding errors).
    fp64_math = [line.strip() for line in ptx.splitlines() if dtype != "fp64" and re.search(r"\.f64\b", line)]
    local = local_bytes(usage)
    print(f"| {name} | {dtype} | {v} | {arch} | {on} | {usage.get('REG')} | {usage.get('SHARED')} | {local} | "
          f"{'yes' if vector_accesses else 'NO'} | {time.perf_counter() - start:.1f} |")
    failures = []
    if local:
        failures.append(f"{label}: {local} bytes of local memory (spills)")
    if not vector_accesses and v % 16 == 0:  # unaligned rows cannot use vector accesses
        failures.append(f"{label}: no 16-byte vector loads / stores of the rows")
    if fp64_math:
        failures.append(f"{label}: fp64 arithmetic in a float32 kernel: {fp64_math[:3]}")
    return failures


def check_epilogue(archs) -> list:
    """The O(N) epilogue kernel (one program): every flood mode, reduction and weighting must compile for
    float32 and float64 losses without local memory."""
    failures = []
    kernel = epilogue._flood_epilogue_kernel
    for arch in archs:
        for acc, mode, mean, has_weight, (block, num_warps) in itertools.product(
                ("fp32", "fp64"), (0, 1, 2), (False, True), (False, True), (epilogue._SMALL, epilogue._LARGE)):
            signature = {"loss_ptr": f"*{acc}", "raw_ptr": f"*{acc}", "row_scale_ptr": f"*{acc}",
                         "losses_ptr": f"*{acc}", "target_ptr": "*i64", "weight_ptr": f"*{acc}",
                         "level_ptr": f"*{acc}", "level_stride": "i32", "n_rows": "i32", "n_classes": "i32",
                         "ignore_index": "i32"}
            constexprs = {"FLOOD_MODE": mode, "MEAN": mean, "HAS_WEIGHT": has_weight, "BLOCK": block}
            label = f"epilogue {acc} sm_{arch} mode={mode} mean={mean} weight={has_weight} block={block}"
            try:
                compiled = compile_kernel(kernel, signature, constexprs, arch, {"num_warps": num_warps})
            except Exception as error:  # any compiler error is the finding
                failures.append(f"{label}: {type(error).__name__}: {error}")
                continue
            if local_bytes(resource_usage(compiled)):
                failures.append(f"{label}: local memory (spills)")
    print(f"epilogue kernel: {2 * 3 * 2 * 2 * 2} variants per arch compiled, {len(failures)} failure(s)")
    return failures


def check_compensated_sum(archs) -> list:
    """The grad_W GEMM with the compensated epilogue (bf16, fp16) and its finish kernel, with each arch's tiles:
    they must compile without local memory, the GEMM on tensor cores (sm_90 wgmma, sm_80 mma), and the finish
    kernel with 16-byte loads of high."""
    failures = []
    for arch, (name, dtype) in itertools.product(archs, (("bf16", torch.bfloat16), ("fp16", torch.float16))):
        mantissa_bits, min_field = compensated_spec.HIGH_DTYPES[dtype]
        block_c, block_f, block_r, num_warps, num_stages, registers = compensated._TILES[9 if arch >= 90 else 8]
        gemm = ({"high_ptr": f"*{name}", "low_ptr": "*i8", "grad_logits_ptr": f"*{name}", "input_ptr": f"*{name}",
                 "n_classes": "i32", "n_features": "i32", "n_rows": "i32", "grad_logits_row_stride": "i32",
                 "input_row_stride": "i32"},
                {"MANTISSA_BITS": mantissa_bits, "MIN_UNIT_FIELD": min_field, "BLOCK_C": block_c,
                 "BLOCK_F": block_f, "BLOCK_R": block_r, "GROUP_C": compensated._GROUP_C, "DOT_IN_FLOAT32": False},
                dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": registers} if registers else {})),
                "wgmma.mma_async" if arch >= 90 else "mma.sync")
        finish = ({"high_ptr": f"*{name}", "low_ptr": "*i8", "scale_ptr": "*fp32", "n_elements": "i64"},
                  {"HAS_SCALE": True, "MANTISSA_BITS": mantissa_bits, "MIN_UNIT_FIELD": min_field,
                   "BLOCK": compensated._FINISH_BLOCK}, {"num_warps": 4}, "ld.global.v4.b32")
        for kernel, (signature, constexprs, options, needed) in ((compensated._accumulate_kernel, gemm),
                                                                 (compensated._finish_kernel, finish)):
            aligned = [n for n, kind in signature.items() if kind.startswith("*") or n in  # pylint: disable=no-member
                       ("n_classes", "n_features", "grad_logits_row_stride", "input_row_stride", "n_elements")]
            label = f"compensated {kernel.fn.__name__} {name} sm_{arch}"
            start = time.perf_counter()
            try:
                compiled = compile_kernel(kernel, signature, constexprs, arch, options, aligned)
            except Exception as error:  # any compiler error is the finding
                failures.append(f"{label}: {type(error).__name__}: {error}")
                continue
            usage = resource_usage(compiled)
            local = local_bytes(usage)
            found = needed in compiled.asm["ptx"]
            print(f"{label}: {usage.get('REG')} registers, {compiled.metadata.shared} B shared, {local} B local, "
                  f"{needed}: {'yes' if found else 'NO'} ({time.perf_counter() - start:.1f} s)")
            if local:
                failures.append(f"{label}: {local} bytes of local memory (spills)")
            if not found:
                failures.append(f"{label}: no {needed} in the PTX")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="90,80", help="comma list of compute capabilities")
    parser.add_argument("--quick", action="store_true", help="only the all-off and all-on switch combinations")
    args = parser.parse_args()
    archs = [int(a) for a in args.archs.split(",")]
    # (name, kernel, signature, switches, launch configuration, the Vs of a variant)
    kernels = [
        ("forward", ce._forward_kernel, forward_signature, ("HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP"),
         blocked_config, only_v),
        ("backward", ce._backward_kernel, backward_signature,
         ("HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP", "HAS_REVERSE_CE"), blocked_config, only_v),
        ("loss_and_grad", ce._loss_and_grad_kernel, loss_and_grad_signature,
         ("FLOOD_ROWS", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP", "HAS_REVERSE_CE"), loss_and_grad_config,
         v_and_largest_resident_v),
        ("scale_grad", ce._scale_grad_kernel, scale_grad_signature, (), blocked_config, only_v),
    ]
    failures = []
    print(f"triton {triton.__version__}; rows 16-aligned when V is a multiple of 16; launch config from the launcher")
    print("| kernel | dtype | V | sm | switches on | regs | shared B | local B | 16-byte accesses | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in archs:
        for name, kernel, signature, switch_names, config, vocabularies in kernels:
            combos = list(itertools.product((False, True), repeat=len(switch_names)))
            if args.quick:
                combos = list(dict.fromkeys([combos[0], combos[-1]]))
            for dtype, combo in itertools.product(DTYPES, combos):
                switches = dict(zip(switch_names, combo))
                for v in vocabularies(dtype, switches):
                    failures += check_variant(name, kernel, signature, switches, dtype, arch, config, v)
    # Small vocabularies (classification): other block sizes and warp counts, unaligned rows; must compile.
    for name, kernel, signature, switch_names, config, _ in kernels:
        for v, dtype in itertools.product((1, 10, 1000), ("fp32", "bf16")):
            switches = dict.fromkeys(switch_names, True)
            try:
                compile_variant(kernel, signature(dtype), switches, dtype, 90, config, v)
            except Exception as error:
                failures.append(f"{name} {dtype} sm_90 V={v}: {type(error).__name__}: {error}")
    failures += check_epilogue(archs)
    failures += check_compensated_sum(archs)
    for failure in failures:
        print("FAIL:", failure, file=sys.stderr)
    print("check_triton_compile:", "OK" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
