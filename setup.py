"""Build of flood_kernels and its C++/CUDA extension flood_kernels._C.

    python3 -m pip install --no-build-isolation -e .     # after torch is installed

The CPU kernels are always built. The CUDA kernels are built when torch is a CUDA build and nvcc is found
(CUDA_HOME); FLOOD_KERNELS_CUDA=1 requires them (fails instead of silently skipping), FLOOD_KERNELS_CUDA=0
skips them. scripts/check_cuda_compile.sh compiles the .cu sources without a GPU or a CUDA torch.
Architectures come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0"). MAX_JOBS limits parallel compilation.
"""

import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
LIMITED_API = "cp310"  # the module has no pybind11 and only calls PyModule_Create: one abi3 wheel per platform


def _sources(pattern: str):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda() -> bool:
    flag = os.environ.get("FLOOD_KERNELS_CUDA", "").strip()
    if flag == "0":
        return False
    if flag == "1":
        if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
            raise RuntimeError(
                "FLOOD_KERNELS_CUDA=1 needs a CUDA build of torch and nvcc (set CUDA_HOME); "
                f"found torch {torch.__version__}, CUDA_HOME={cpp_extension.CUDA_HOME}. "
                "To only compile-check the .cu sources without a GPU: scripts/check_cuda_compile.sh"
            )
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extensions():
    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # -fopenmp: at::parallel_for is inline OpenMP code (ATen/ParallelOpenMP.h); without it the loop is serial.
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    link_flags = ["-fopenmp"]
    # The per-ISA kernels pick their instruction set themselves (csrc/cpu/flood_ce_avx*.cpp), so no -march:
    # the same binary runs on any x86-64 CPU and uses AVX2 / AVX-512 where torch reports them.
    common = dict(
        name="flood_kernels._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        py_limited_api=True,
    )
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cuda_sources = _sources("csrc/cuda/*.cu")
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return [
            cpp_extension.CUDAExtension(
                sources=cpu_sources + cuda_sources,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=link_flags,
                **common,
            )
        ]
    return [cpp_extension.CppExtension(sources=cpu_sources, extra_compile_args={"cxx": cxx_flags},
                                       extra_link_args=link_flags, **common)]


# Tested with triton 3.6 (GPU machine) and 3.9 (CPU interpreter, and the sm_90 compile check's API).
EXTRAS_REQUIRE = {
    "triton": ["triton>=3.6,<3.10"],
    "transformers": ["transformers>=4.46,<6", "accelerate>=1.1.0"],
    "examples": ["matplotlib"],
}
# The test suite exercises every optional part: Triton kernels (interpreted on CPU), the Transformers integration
# and the examples' plots; pylint checks the calls of the code CI cannot run (scripts/check_calls.sh).
EXTRAS_REQUIRE["test"] = ["pytest", "pytest-benchmark", "pylint>=4,<5"] + [
    req for extra in ("triton", "transformers", "examples") for req in EXTRAS_REQUIRE[extra]]


# Guarded so that scripts can read EXTRAS_REQUIRE (runpy) without building; pip runs this file as __main__.
if __name__ == "__main__":
    setup(
        name="flood_kernels",
        version="0.1.0",
        description="Fused cross-entropy with flooding for PyTorch (Triton, C++ and CUDA kernels)",
        packages=find_packages(include=["flood_kernels", "flood_kernels.*"]),
        python_requires=">=3.10",
        install_requires=["torch"],
        extras_require=EXTRAS_REQUIRE,
        ext_modules=_extensions(),
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": LIMITED_API}},
        zip_safe=False,
    )
