"""The CUDA kernels of ``csrc/cuda/flood_ce.cu``, built for the CPU against ``cuda_emulator.h``.

``emulated_ops(sm)`` compiles the .cu file's own text with the host compiler, as code for an ``sm_<sm>`` GPU,
into a torch extension whose ops ``torch.ops.flood_kernels_emulated_sm<sm>.{forward, backward, backward_,
loss_and_grad, scale_grad_}`` take CPU tensors and run the CUDA launchers and kernels (every CUDA thread a fiber;
see the header), plus ``configure(device_sm, max_active_clusters, schedule_seed)`` and ``take_launches()``.
So the kernels' index arithmetic, layouts, alignment heads and tails, barriers, warp shuffles and thread-block
clusters are tested on any machine; their speed, and what only the hardware decides (registers, the compiler's
code, the approximate exp's exact bits), are not.

The source is rewritten only where host C++ cannot take CUDA syntax, line for line (error messages keep
flood_ce.cu's line numbers): the CUDA headers become the emulator's, ``kernel<<<grid, block, shared, stream>>>(``
becomes ``cuda_emulator::launch(kernel, grid, block, shared, stream)(``, a ``__shared__`` variable a ``thread_local``
one that the block's first thread to declare it fills with NaN, ``__CUDA_ARCH__`` becomes the emulated
architecture, the ops' device type CUDA becomes CPU, their outputs' ``at::empty`` one that fills the memory with NaN
(an element no kernel writes is NaN, not stale memory), and ``TORCH_LIBRARY_IMPL(flood_kernels, CUDA, m)`` defines
the ops of the emulated library instead. Each rewrite must apply (the build fails otherwise), so a change of
flood_ce.cu that the emulation does not understand is an error, not a silently different kernel.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from pathlib import Path
from typing import Any, Iterator, Tuple

import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CUDA_SOURCE = REPO / "csrc" / "cuda" / "flood_ce.cu"
BUILD_ROOT = REPO / "build" / "cuda_emulation"

_CUDA_INCLUDES = ("c10/cuda/CUDAException.h", "c10/cuda/CUDAGuard.h", "c10/cuda/CUDAStream.h", "cooperative_groups.h")
_LAUNCH = re.compile(r"^(\s*)(\S.*?)<<<(.+?)>>>\(")


def _substitute(text: str, pattern: str, replacement: Any, count_at_least: int = 1, flags: int = 0) -> str:
    new, count = re.subn(pattern, replacement, text, flags=flags)
    if count < count_at_least:
        raise RuntimeError(f"cuda_emulation: flood_ce.cu no longer matches the rewrite {pattern!r}; update "
                           f"tests/cuda_emulation/__init__.py")
    return new


def emulated_source(library: str, sm: int) -> str:
    """flood_ce.cu rewritten for the host compiler (same number of lines)."""
    text = CUDA_SOURCE.read_text()
    lines_before = text.count("\n")
    for i, header in enumerate(_CUDA_INCLUDES):  # the first becomes the emulator, which stands in for all
        text = _substitute(text, rf"^#include <{re.escape(header)}>$", "" if i else '#include "cuda_emulator.h"',
                           flags=re.M)
    text = _substitute(text, r'^#include "\.\./flood_ce\.h"$', '#include "flood_ce.h"', flags=re.M)
    text = _substitute(text, r"defined\(__CUDA_ARCH__\) && __CUDA_ARCH__", f"{sm * 10}")
    text = _substitute(text, r"^(\s*)__shared__ (.+?) (\w+)((?:\[\w+\])?);",
                       r"\1static thread_local \2 \3\4; ::cuda_emulator::fresh_shared(&\3, sizeof(\3));",
                       count_at_least=8, flags=re.M)
    if re.search(r"^\s*__shared__ ", text, flags=re.M):
        raise RuntimeError("cuda_emulation: a __shared__ declaration flood_ce.cu's rewrite did not understand")
    text = "\n".join(_LAUNCH.sub(r"\1::cuda_emulator::launch(\2, \3)(", line) for line in text.split("\n"))
    if "<<<" in text:
        raise RuntimeError("cuda_emulation: a kernel launch flood_ce.cu's rewrite did not understand")
    text = _substitute(text, r"\bat::empty\(", "::cuda_emulator::poisoned_empty(", count_at_least=4)
    text = _substitute(text, r"c10::DeviceType::CUDA", "c10::DeviceType::CPU", count_at_least=4)
    text = _substitute(text, r"^TORCH_LIBRARY_IMPL\(flood_kernels, CUDA, m\) \{$",
                       f"TORCH_LIBRARY({library}, m) {{ ::cuda_emulator::define_control_ops(m);", flags=re.M)
    text = _substitute(text, r'^  m\.impl\("', '  m.def("', count_at_least=5, flags=re.M)
    if text.count("\n") != lines_before:
        raise RuntimeError("cuda_emulation: the rewrite changed flood_ce.cu's line count")
    return f'#line 1 "{CUDA_SOURCE.relative_to(REPO)}"\n' + text


# FLOOD_KERNELS_CUDA_EMULATION_SANITIZE=address builds the kernels with AddressSanitizer (the CPU's
# compute-sanitizer memcheck: a read or write outside a tensor's allocation stops the process with a report).
# Python must then start with ASan loaded: scripts/check_cuda_emulated_asan.sh.
SANITIZE = os.environ.get("FLOOD_KERNELS_CUDA_EMULATION_SANITIZE", "")


@functools.lru_cache(maxsize=None)
def emulated_ops(sm: int) -> Any:
    """``torch.ops.flood_kernels_emulated_sm<sm>``, built on first use (about 20 s) into build/cuda_emulation/;
    later builds of unchanged sources are up to date at once."""
    library = f"flood_kernels_emulated_sm{sm}" + (f"_{SANITIZE}" if SANITIZE else "")
    build_dir = BUILD_ROOT / library
    build_dir.mkdir(parents=True, exist_ok=True)
    source = build_dir / f"{library}.cpp"
    text = emulated_source(library, sm)
    if not source.exists() or source.read_text() != text:  # unchanged: ninja keeps the object file
        staged = source.with_name(f"{source.name}.{os.getpid()}")
        staged.write_text(text)
        os.replace(staged, source)  # atomic: a concurrent build (pytest-xdist) never reads half a file
    sanitizer = [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer"] if SANITIZE else []
    cpp_extension.load(
        name=library,
        sources=[str(source), str(REPO / "csrc" / "flood_ce_checks.cpp")],
        extra_include_paths=[str(REPO / "csrc"), str(HERE)],
        # The namespace renamed, so that nothing clashes with flood_kernels._C loaded in the same process.
        extra_cflags=["-O2", "-fno-strict-aliasing", "-fvisibility=hidden", f"-DFLOOD_EMULATED_SM={sm}",
                      f"-Dflood_kernels={library}"] + sanitizer,
        extra_ldflags=["-pthread"] + sanitizer,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, library)


def take_launches(sm: int) -> Tuple[str, ...]:
    """The launches of the emulated module since the last call, e.g. ``"cudaLaunchKernelEx grid=(8,1,1)
    block=(512,1,1) cluster=4"``."""
    return tuple(line for line in emulated_ops(sm).take_launches().split("\n") if line)


# cudaOccupancyMaxActiveClusters' answer unless configured (cuda_emulator.h Settings): an H100's 132 SMs.
MAX_ACTIVE_CLUSTERS = 132


@contextlib.contextmanager
def configured(sm: int, device_sm: int, max_active_clusters: int = MAX_ACTIVE_CLUSTERS,
               schedule_seed: int = 0) -> Iterator[None]:
    """The emulated device, cluster occupancy and thread schedule inside the block; the defaults after it."""
    ops = emulated_ops(sm)
    ops.configure(device_sm, max_active_clusters, schedule_seed)
    try:
        yield
    finally:
        ops.configure(sm, MAX_ACTIVE_CLUSTERS, 0)
