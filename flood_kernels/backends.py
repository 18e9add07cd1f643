"""Which backend serves which device.

``"reference"`` (pure PyTorch, runs everywhere), ``"triton"`` (CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``), ``"cpu"`` and ``"cuda"`` (the C++ extension ``flood_kernels._C``). ``"auto"`` takes
the first available name of the device's preference list, which never ends without ``"reference"``.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _ops
from ._inputs import functorch_transforms_active
from ._ops import KernelOps

BACKENDS = ("auto", "reference", "triton", "cpu", "cuda")
BUILD_HINT = "build it with `python3 -m pip install --no-build-isolation -e .` (see README, Install)"

# Fastest first, by measurement: the C++ CPU kernel beats eager PyTorch many times over
# (benchmarks/results); the Triton interpreter is a test vehicle, never picked by "auto" on CPU.
_AUTO_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


def _triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _extension_device_types(op: str) -> frozenset:
    """Device types the built extension has kernels of ``op`` for (read once: the query cannot be traced)."""
    if _ops.EXTENSION_OPS is None:
        return frozenset()
    return frozenset(device_type for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"flood_kernels::{op}", key))


_EXTENSION_DEVICE_TYPES = _extension_device_types("forward")
_EXTENSION_SINGLE_READ_DEVICE_TYPES = _extension_device_types("loss_and_grad")
_EXTENSION_FUSED_LOSS_DEVICE_TYPES = _extension_device_types("flooded_loss")


def has_single_read(backend: str) -> bool:
    """Whether a resolved kernel backend has the single-read ops (``loss_and_grad``, ``scale_grad_``)."""
    return backend == "triton" or backend in _EXTENSION_SINGLE_READ_DEVICE_TYPES


def has_fused_loss(backend: str) -> bool:
    """Whether a resolved kernel backend has the whole reduced loss as one op (``flooded_loss``)."""
    return backend in _EXTENSION_FUSED_LOSS_DEVICE_TYPES


# Up to this many rows the GPU epilogue is one Triton program (flood_kernels/triton/flood_epilogue.py).
_EPILOGUE_MAX_ROWS = 1 << 16


def epilogue_op(backend: str, n_rows: int) -> Optional[Callable[..., Tuple[Tensor, Tensor, Tensor]]]:
    """The one-kernel O(N) epilogue (``flood_epilogue`` of :mod:`flood_kernels._ops`) for the losses of a GPU
    backend, or None where the tensor ops of :mod:`flood_kernels._flood` serve: the reference backend, the CPU
    backend (whose fused op has its own), no Triton, or more rows than one program walks quickly."""
    if backend not in ("triton", "cuda") or _ops.TRITON_OPS is None or n_rows > _EPILOGUE_MAX_ROWS:
        return None
    return _ops.TRITON_OPS.flood_epilogue


def available_backends(device: Union[str, torch.device]) -> List[str]:
    """Backend names usable for tensors on ``device``, in the order ``backend="auto"`` prefers them."""
    return list(_usable_backends(torch.device(device).type))


_USABLE_BACKENDS: Dict[str, Tuple[str, ...]] = {}


def _usable_backends(device_type: str) -> Tuple[str, ...]:
    """available_backends, computed once per device type (every loss call resolves its backend)."""
    if device_type not in _USABLE_BACKENDS:
        _USABLE_BACKENDS[device_type] = _find_usable_backends(device_type)
    return _USABLE_BACKENDS[device_type]


def _find_usable_backends(device_type: str) -> Tuple[str, ...]:
    usable = {"reference"}
    if device_type == "cuda" and not torch.cuda.is_available():
        return ("reference",)  # a CUDA build of the extension, but no GPU to run its kernels on
    if _ops.TRITON_OPS is not None and (device_type == "cuda" or (device_type == "cpu" and _triton_interpreter_on())):
        usable.add("triton")
    if device_type in _EXTENSION_DEVICE_TYPES:
        usable.add(device_type)
    preference = _AUTO_PREFERENCE.get(device_type, ("reference",))
    return tuple([name for name in preference if name in usable] + sorted(usable - set(preference)))


def resolve(backend: str, device: torch.device) -> str:
    """The backend that will run: ``backend`` itself if usable on ``device``, or the choice of "auto" (the reference
    backend under ``torch.func`` transforms, see :func:`flood_kernels._inputs.functorch_transforms_active`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    usable = _usable_backends(device.type)
    if backend == "auto":
        return "reference" if functorch_transforms_active() else usable[0]
    if backend in usable:
        return backend
    if backend in ("cpu", "cuda") and device.type == backend:
        raise RuntimeError(f"backend={backend!r} needs the C++ extension flood_kernels._C, which is not built: "
                           f"{BUILD_HINT}")
    if backend == "triton" and _ops.TRITON_OPS is None:
        raise RuntimeError("backend='triton' needs the triton package: python3 -m pip install triton")
    if backend == "triton" and device.type == "cpu":
        raise RuntimeError("backend='triton' runs on CPU tensors only under TRITON_INTERPRET=1 (set before import)")
    raise RuntimeError(f"backend={backend!r} cannot run on {device.type} tensors; available: {list(usable)}")


def empty_cpu_cache() -> None:
    """Return the CPU gradient buffers the extension keeps for reuse to the OS (like
    ``torch.cuda.empty_cache``). Large CPU gradients are recycled because a fresh buffer from the OS costs a
    page fault and a zeroed page per 4 KB on first write, more than the kernel itself; at most two freed
    blocks are kept. ``FLOOD_KERNELS_CPU_BUFFER_CACHE=0`` (read once) turns the recycling off."""
    if _ops.EXTENSION_OPS is not None:
        torch.ops.flood_kernels.empty_cpu_cache()


def kernel_ops(backend: str) -> KernelOps:
    """The op triple behind a resolved kernel backend name."""
    ops = _ops.TRITON_OPS if backend == "triton" else _ops.EXTENSION_OPS
    assert ops is not None, backend
    return ops
