"""Benchmark flooded cross-entropy: every backend of ours next to the plain PyTorch one-liner and peers.

``python -m flood_kernels.bench`` measures, on one device in one run, the copy bandwidth and then for each
shape and each phase the forward+backward (and optionally forward-only) time of each implementation, its
achieved bandwidth, its fraction of the byte floor and its peak extra memory, and writes ``results.json``,
``results.md`` and (with matplotlib) PNG plots. Phases: batch flooding while J > b (``descent``) and while
J < b (``ascent``), plain cross-entropy (``plain``: flood=None) and iFlood with b inside the spread of the
per-sample losses (``iflood``: about half the rows ascend). In the last two, the backends with a
single-read path are also timed with it forced on (``,1-read``) and off (``,2-pass``): that measurement
decides the default (flood_kernels/_single_read.py).

Byte floors, for ``N x V`` logits of ``e`` bytes per element at the measured copy bandwidth ``B``:
``1R+1W = 2 N V e / B`` (read the logits once, write the gradient once: what a kernel that keeps a row on
chip needs) and ``2R+1W = 3 N V e / B`` (forward read, backward read + write: the two-pass design).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import available_backends
from ._inputs import LossOptions
from .backends import has_single_read
from .functional import flooded_cross_entropy_with_options

# phase -> (flood mode, flood level as a function of V). The benchmark's logits are N(0, 4): a row's loss is
# about log(V) + 2 +- 2, so b = 0 / 50 keep batch flooding descending / ascending, and iFlood at
# b = log(V) + 2 flips the sign of about half the rows.
PHASES: Dict[str, Tuple[Optional[str], Callable[[int], float]]] = {
    "descent": ("batch", lambda v: 0.0),
    "ascent": ("batch", lambda v: 50.0),
    "plain": (None, lambda v: 0.0),
    "iflood": ("individual", lambda v: math.log(v) + 2.0),
}
SINGLE_READ_PHASES = ("plain", "iflood")
SHAPE_SETS = {
    "smoke": [(64, 100, "float32"), (32, 257, "bfloat16")],
    "cpu": [(4096, 32000, "float32"), (1024, 32000, "bfloat16"), (256, 1000, "float32")],
    # Small classifiers trained on a CPU (the flooding papers' synthetic data has V = 2): per-call overhead.
    "cpu-small": [(128, 2, "float32"), (128, 10, "float32"), (1024, 100, "float32"), (256, 1000, "float32")],
    "quick": [(8192, 32000, "bfloat16"), (16384, 128256, "bfloat16"), (256, 1000, "float32")],
    "issue2": [(n, v, "bfloat16") for n in (8192, 16384) for v in (32000, 128256, 256000)],
    "llm": [(n, v, dtype) for dtype in ("bfloat16", "float32") for n in (4096, 16384, 65536)
            for v in (32000, 50257, 128256, 151936, 256000)],
    "classification": [(n, v, dtype) for dtype in ("float32", "bfloat16") for n in (128, 256, 1024)
                       for v in (10, 100, 1000, 21843)],
    # The issues' done criteria, most important first (a time-budgeted run measures them before the rest).
    "targets": [(16384, 128256, "bfloat16"), (16384, 32000, "bfloat16"), (16384, 256000, "bfloat16")],
}
# Implementations that write over their input logits (Liger computes the gradient in place in forward):
# they get a copy, so the next implementation of the cell sees the same values.
OVERWRITES_INPUT = frozenset({"liger"})


@dataclass
class Record:
    """One timed (implementation, shape, phase, pass) cell."""

    implementation: str
    n: int
    v: int
    dtype: str
    phase: str
    mode: str  # "fwd+bwd", "fwd", or "graph" (fwd+bwd replayed from a CUDA graph)
    ms: float
    gbps: float
    pct_floor_1r1w: float
    pct_floor_2r1w: float
    peak_extra_mb: Optional[float]
    extra: Dict[str, float] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, min_seconds: float = 0.5, max_reps: int = 20000,
            warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on GPU, perf_counter on CPU), over as many calls
    as fit in ``min_seconds`` (at least 3): a sub-millisecond call gets thousands of samples, so a burst of
    background load on the host moves the median little."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    budget_end = time.perf_counter() + min_seconds
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() < budget_end):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s)."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, min_seconds=0.5)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _one_liner(upcast: bool) -> Callable:
    """What users write: ``|CE - b| + b`` on the mean (batch), or per sample then the mean (iFlood)."""
    def loss(x: torch.Tensor, target: torch.Tensor, flood: Optional[str], level: float) -> torch.Tensor:
        logits = x.float() if upcast else x
        if flood == "individual":
            return ((F.cross_entropy(logits, target, reduction="none") - level).abs() + level).mean()
        ce = F.cross_entropy(logits, target)
        return ce if flood is None else (ce - level).abs() + level
    return loss


def _ours(backend: str, single_read: Optional[bool] = None) -> Callable:
    def loss(x: torch.Tensor, target: torch.Tensor, flood: Optional[str], level: float) -> torch.Tensor:
        return flooded_cross_entropy_with_options(x, target, LossOptions(flood=flood), level, None, backend,
                                                  single_read=single_read)[0]
    return loss


def implementations(device: torch.device, with_compile: bool = True) -> Dict[str, Callable]:
    """name -> loss(x, target, flood, level); ours per backend (and per path where a backend has two), the
    one-liners, torch.compile and installed peers."""
    impls: Dict[str, Callable] = {}
    for backend in available_backends(device):
        if backend == "reference" or (backend == "triton" and device.type == "cpu"):
            continue
        impls[f"flood_kernels[{backend}]"] = _ours(backend)
        if has_single_read(backend):
            impls[f"flood_kernels[{backend},1-read]"] = _ours(backend, single_read=True)
            impls[f"flood_kernels[{backend},2-pass]"] = _ours(backend, single_read=False)
    impls["eager (upcast)"] = _one_liner(upcast=True)
    impls["eager"] = _one_liner(upcast=False)
    if with_compile:
        impls["torch.compile (upcast)"] = torch.compile(_one_liner(upcast=True), dynamic=False)
    if device.type == "cuda":  # Liger's kernels are Triton kernels for CUDA tensors
        try:
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        except ImportError as error:
            sys.stderr.write(f"liger-kernel not benchmarked: {error}\n")
        else:
            liger_mean, liger_rows = LigerCrossEntropyLoss(), LigerCrossEntropyLoss(reduction="none")

            def liger(x: torch.Tensor, target: torch.Tensor, flood: Optional[str], level: float) -> torch.Tensor:
                if flood == "individual":
                    return ((liger_rows(x, target) - level).abs() + level).mean()
                ce = liger_mean(x, target)
                return ce if flood is None else (ce - level).abs() + level
            impls["liger"] = liger
    return impls


def runs_in_phase(name: str, phase: str) -> bool:
    """The forced-path variants only differ from the default where the single-read path applies."""
    forced = name.endswith(",1-read]") or name.endswith(",2-pass]")
    return not forced or phase in SINGLE_READ_PHASES


def _peak_extra_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def _captured(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``step`` captured once in a CUDA graph (after warm-up on a side stream); returns the graph's replay.

    Replays skip Python and launch overhead: what a training step captured whole would see. Raises (a
    RuntimeError from the capture) for code that synchronizes with the host.
    """
    if device.type != "cuda":
        raise ValueError("mode 'graph' needs a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream(device)
    try:
        with torch.cuda.graph(graph):
            step()
    finally:  # a failed capture raises in torch.cuda.graph's exit before it restores the current stream
        torch.cuda.set_stream(stream)
    return graph.replay


def make_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits ``N(0, 4)`` and targets for one shape, drawn on the device from a seed of the shape (fresh,
    never zeros; drawing N x V numbers on the host would cost more than the benchmark of the cell)."""
    generator = torch.Generator(device=device).manual_seed(n * 7919 + v)
    x = torch.randn(n, v, generator=generator, device=device, dtype=dtype).mul_(2)
    target = torch.randint(0, v, (n,), generator=generator, device=device)
    return x, target


def run_case(name: str, loss_fn: Callable, x: torch.Tensor, target: torch.Tensor, phase: str, mode: str,
             device: torch.device, bandwidth: float, min_seconds: float) -> Record:
    """Time ``loss_fn`` on the logits ``x`` (left as they were: an implementation that overwrites its input
    gets a copy) in one phase and mode; returns the cell's record."""
    n, v = x.shape
    if name in OVERWRITES_INPUT:
        x = x.detach().clone()
    flood, level_of_v = PHASES[phase]
    level = level_of_v(v)
    backward = mode in ("fwd+bwd", "graph")
    x.requires_grad_(backward)
    if backward:
        def step() -> None:
            x.grad = None
            loss_fn(x, target, flood, level).backward()
    else:
        def step() -> None:
            with torch.no_grad():
                loss_fn(x, target, flood, level)
    try:
        if mode == "graph":
            step = _captured(step, device)
        ms = time_ms(step, device, min_seconds=min_seconds)
        peak = _peak_extra_mb(step, device)
    finally:
        x.grad = None  # the next implementation starts without this one's N x V gradient allocated
    logits_bytes = n * v * x.element_size()
    moved = 3 * logits_bytes if backward else logits_bytes
    floor_1r1w_ms = (2 if backward else 1) * logits_bytes / (bandwidth * 1e9) * 1e3
    floor_2r1w_ms = moved / (bandwidth * 1e9) * 1e3
    return Record(name, n, v, str(x.dtype).replace("torch.", ""), phase, mode, ms, moved / (ms * 1e-3) / 1e9,
                  100 * floor_1r1w_ms / ms, 100 * floor_2r1w_ms / ms, peak)


def _fits(n: int, v: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Skip shapes whose logits, gradient and an fp32 upcast copy would not fit the device."""
    need = n * v * (2 * torch.tensor([], dtype=dtype).element_size() + 8)
    if device.type == "cuda":
        return need < 0.8 * torch.cuda.mem_get_info(device)[0]
    return need < 8 * 2**30


def markdown_table(records: Sequence[Record], bandwidth: float, device_name: str) -> str:
    """One row per record; the last column is this implementation's time over our best backend's in the cell
    (how many times faster flood_kernels is than each peer)."""
    lines = [f"Device: {device_name}; copy bandwidth {bandwidth:.0f} GB/s (read + write).", "",
             "| N | V | dtype | phase | pass | implementation | ms | GB/s | % of 1R+1W floor | % of 2R+1W floor "
             "| peak extra MB | this / best flood_kernels |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_cell: Dict[Tuple, Dict[str, Record]] = {}
    for r in records:
        by_cell.setdefault((r.n, r.v, r.dtype, r.phase, r.mode), {})[r.implementation] = r
    for impls in by_cell.values():
        ours = [r.ms for name, r in impls.items() if name.startswith("flood_kernels")]
        for r in impls.values():
            ratio = f"{r.ms / min(ours):.2f}x" if ours else "-"
            peak = f"{r.peak_extra_mb:.0f}" if r.peak_extra_mb is not None else "-"
            lines.append(f"| {r.n} | {r.v} | {r.dtype} | {r.phase} | {r.mode} | {r.implementation} | {r.ms:.3f} | "
                         f"{r.gbps:.0f} | {r.pct_floor_1r1w:.0f}% | {r.pct_floor_2r1w:.0f}% | {peak} | {ratio} |")
    return "\n".join(lines) + "\n"


def pivot_table(records: Sequence[Record]) -> str:
    """One row per cell, one column per implementation (median ms), then the best flood_kernels time's share
    of the two byte floors: the short form of :func:`markdown_table`."""
    if not records:
        return "(no cell measured)\n"
    names = list(dict.fromkeys(r.implementation for r in records))
    names.sort(key=lambda name: not name.startswith("flood_kernels"))  # ours first, each group in run order
    by_cell: Dict[Tuple, Dict[str, Record]] = {}
    for r in records:
        by_cell.setdefault((r.n, r.v, r.dtype, r.phase, r.mode), {})[r.implementation] = r
    lines = ["| N x V, dtype | phase | pass | " + " | ".join(names) + " | best ours: % of 1R+1W / 2R+1W |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for (n, v, dtype, phase, mode), impls in by_cell.items():
        ours = [r for name, r in impls.items() if name.startswith("flood_kernels")]
        best = min(ours, key=lambda r: r.ms) if ours else None
        cells = [f"{impls[name].ms:.3f}" if name in impls else "" for name in names]
        floors = f"{best.pct_floor_1r1w:.0f}% / {best.pct_floor_2r1w:.0f}%" if best else "-"
        lines.append(f"| {n} x {v}, {dtype} | {phase} | {mode} | " + " | ".join(cells) + f" | {floors} |")
    return "\n".join(lines) + "\n"


def read_results(out_dir: str) -> Tuple[Dict[str, object], List[Record]]:
    """The meta and records of a results.json written by :func:`write_results`."""
    with open(os.path.join(out_dir, "results.json")) as f:
        data = json.load(f)
    return data["meta"], [Record(**record) for record in data["records"]]


def plot(records: Sequence[Record], out_dir: str) -> List[str]:
    """Time and % of the 1R+1W floor against V, one line per implementation (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    groups: Dict[Tuple, List[Record]] = {}
    for r in records:
        groups.setdefault((r.n, r.dtype, r.phase, r.mode), []).append(r)
    for (n, dtype, phase, mode), rows in groups.items():
        if len({r.v for r in rows}) < 2:
            continue
        fig, (ax_time, ax_floor) = plt.subplots(1, 2, figsize=(11, 4))
        for impl in sorted({r.implementation for r in rows}):
            points = sorted((r.v, r.ms, r.pct_floor_1r1w) for r in rows if r.implementation == impl)
            ax_time.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
            ax_floor.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=impl)
        ax_time.set(xscale="log", yscale="log", xlabel="V", ylabel="ms", title=f"N={n} {dtype} {phase} {mode}")
        ax_floor.set(xscale="log", xlabel="V", ylabel="% of 1R+1W byte floor", ylim=(0, 100))
        ax_time.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"bench_N{n}_{dtype}_{phase}_{mode.replace('+', '')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _progress(done: int, total: int, label: str) -> None:
    """A progress bar on a terminal; one line per cell in a log."""
    width = 30
    filled = width * done // max(total, 1)
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:60]:<60}"
    sys.stderr.write(f"\r{line}" if sys.stderr.isatty() else f"{line.rstrip()}\n")
    sys.stderr.flush()


def parse_shapes(spec: str) -> List[Tuple[int, int, str]]:
    """A comma list of shape-set names and ``NxV:dtype`` shapes (e.g. ``targets,256x1000:float32``), in order."""
    shapes: List[Tuple[int, int, str]] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item in SHAPE_SETS:
            shapes += SHAPE_SETS[item]
            continue
        try:
            size, dtype = item.split(":")
            n, v = (int(number) for number in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shapes: {item!r} is neither a shape set ({', '.join(sorted(SHAPE_SETS))}) "
                             "nor NxV:dtype") from None
        if not isinstance(getattr(torch, dtype, None), torch.dtype) or n < 1 or v < 1:
            raise ValueError(f"--shapes: {item!r} needs N, V >= 1 and a torch dtype name such as bfloat16")
        shapes.append((n, v, dtype))
    return shapes


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def write_results(out_dir: str, meta: Dict[str, object], records: Sequence[Record], bandwidth: float,
                  device_name: str) -> str:
    """results.json and results.md (replaced whole, so a run stopped at any point leaves readable files);
    returns the table."""
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(records, bandwidth, device_name)
    if meta.get("cells_not_run"):
        table += (f"\n{meta['cells_not_run']} of {meta['cells']} cells not measured (--time-budget, skipped as "
                  "out of memory or not capturable, or the run was stopped or is still going).\n")
    for name, text in (("results.json", json.dumps({"meta": meta, "records": [asdict(r) for r in records]},
                                                   indent=1)),
                       ("results.md", f"`{meta['command']}` (torch {meta['torch']}, triton {meta.get('triton')}, "
                                      f"commit {meta.get('commit')})\n\n" + pivot_table(records) + "\n" + table)):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return table


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None,
                        help=f"comma list of shape sets ({', '.join(sorted(SHAPE_SETS))}) and NxV:dtype shapes, "
                             "measured in that order (default: 'quick' on GPU, 'cpu' on CPU)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    parser.add_argument("--modes", default="fwd+bwd",
                        help="comma list of fwd+bwd, fwd, graph (fwd+bwd replayed from a CUDA graph)")
    parser.add_argument("--only", default=None, help="comma list of implementation names to run")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves compile time)")
    parser.add_argument("--min-seconds", type=float, default=None, help="timing budget per cell")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole run: no cell starts after it (the results so far are "
                             "written after every cell, so a run stopped early keeps them too)")
    parser.add_argument("--out", default="bench_out", help="directory for results.json / results.md / PNGs")
    parser.add_argument("--summarize", metavar="DIR", help="print the short table of DIR/results.json and exit")
    parser.add_argument("--replot", metavar="DIR",
                        help="rewrite DIR/results.md and draw the plots from DIR/results.json, and exit")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.summarize or args.replot:
        meta, records = read_results(args.summarize or args.replot)
        if args.summarize:
            print(f"{meta['device']}, copy {meta['copy_bandwidth_gbps']:.0f} GB/s, {meta['command']}")
            print(pivot_table(records))
        else:
            write_results(args.replot, meta, records, float(meta["copy_bandwidth_gbps"]), str(meta["device"]))
            print(f"wrote {args.replot}/results.md and {len(plot(records, args.replot))} plot(s)")
        return 0

    device = torch.device(args.device)
    if "graph" in args.modes.split(",") and device.type != "cuda":
        parser.error("--modes graph needs a CUDA device")
    try:
        shapes = parse_shapes(args.shapes or ("quick" if device.type == "cuda" else "cpu"))
    except ValueError as error:
        parser.error(str(error))
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.3 if device.type == "cuda" else 2.0)
    impls = implementations(device, with_compile=not args.no_compile)
    if args.only:
        wanted = set(args.only.split(","))
        impls = {name: fn for name, fn in impls.items() if name in wanted}
    bandwidth = copy_bandwidth_gbps(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    too_large = [shape for shape in shapes if not _fits(shape[0], shape[1], getattr(torch, shape[2]), device)]
    if too_large:
        sys.stderr.write(f"not run, too large for this device: {too_large}\n")
    shapes = [shape for shape in shapes if shape not in too_large]
    # What runs for each shape, in order: the (phase, mode, implementation) cells.
    runs = [(phase, mode, name, fn) for phase in args.phases.split(",") for mode in args.modes.split(",")
            for name, fn in impls.items() if runs_in_phase(name, phase)]
    total = len(shapes) * len(runs)
    meta: Dict[str, object] = {
        "device": device_name, "copy_bandwidth_gbps": bandwidth, "torch": torch.__version__,
        "triton": _triton_version(), "commit": _git_commit(), "cells": total, "cells_not_run": 0,
        "command": "python -m flood_kernels.bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    records: List[Record] = []
    attempted = 0

    def out_of_time() -> bool:
        return args.time_budget is not None and time.monotonic() - started > args.time_budget

    for n, v, dtype_name in shapes:
        if out_of_time():
            break
        # A fresh torch.compile cache per shape: dynamo's recompile limit would otherwise turn later shapes
        # into eager runs without saying so.
        torch._dynamo.reset()
        x, target = make_inputs(n, v, getattr(torch, dtype_name), device)
        for phase, mode, name, fn in runs:
            if out_of_time():
                break
            _progress(attempted, total, f"{name} N={n} V={v} {dtype_name} {phase} {mode}")
            attempted += 1
            try:
                records.append(run_case(name, fn, x, target, phase, mode, device, bandwidth, min_seconds))
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                sys.stderr.write(f"\n{name} N={n} V={v} {dtype_name}: out of memory, skipped\n")
                continue
            except RuntimeError as error:
                if mode != "graph":
                    raise
                # not capturable (host synchronization, dynamic allocation): skipped, and said
                sys.stderr.write(f"\n{name}: not capturable in a CUDA graph ({str(error).splitlines()[0][:120]})\n")
                continue
            meta["cells_not_run"] = total - len(records)
            write_results(args.out, meta, records, bandwidth, device_name)
        del x, target
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _progress(attempted, total, "done")
    sys.stderr.write("\n")
    meta["cells_not_run"] = total - len(records)
    meta["seconds"] = round(time.monotonic() - started, 1)
    table = write_results(args.out, meta, records, bandwidth, device_name)
    plots = plot(records, args.out)
    print(table)
    print(f"wrote {args.out}/results.json, results.md" + (f" and {len(plots)} plot(s)" if plots else ""))
    return 0 if all(math.isfinite(r.ms) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
