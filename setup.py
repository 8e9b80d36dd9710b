"""Builds g2tr_kernels._C: the torch.ops.g2tr schemas, CPU kernels and, optionally, CUDA kernels.

G2TR_BUILD_CUDA=auto (default): build the CUDA kernels when torch is a CUDA build and a
toolkit is found at CUDA_HOME (its include/cuda_runtime.h); never decided by whether a GPU
is present.
G2TR_BUILD_CUDA=1: require them (fails without nvcc); 0: CPU only.
TORCH_CUDA_ARCH_LIST picks the archs (default "8.0;9.0+PTX"). No network is used.
"""
import glob
import os
import re
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = re.search(r'__version__ = "([^"]+)"', open(os.path.join(ROOT, "g2tr_kernels", "version.py")).read()).group(1)


def want_cuda() -> bool:
    mode = os.environ.get("G2TR_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"G2TR_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    import torch

    has_sources = bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    home = cpp_extension.CUDA_HOME
    toolkit = home is not None and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
    available = has_sources and torch.version.cuda is not None and toolkit
    if mode == "auto" and not available:
        print(f"g2tr_kernels: building without CUDA kernels (csrc/cuda sources: {has_sources}, "
              f"torch CUDA: {torch.version.cuda}, toolkit at CUDA_HOME={home}: {toolkit})")
    if mode == "1" and not available:
        raise RuntimeError(
            "G2TR_BUILD_CUDA=1 needs a CUDA build of torch and nvcc: set CUDA_HOME to the toolkit root "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}, "
            f"csrc/cuda sources: {has_sources})"
        )
    return available


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extension():
    sources = rel(
        glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    sources += ["python/module.cpp"]
    # No contraction of a * b + c into FMA: the AVX-512, AVX2 and portable copies of the row
    # primitives (csrc/cpu/vec.cpp) then round alike, whatever CPU runs them.
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off", f'-DG2TR_VERSION="{VERSION}"']
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "g2tr_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    # sm_80 and sm_90 machine code, plus sm_90 PTX so newer GPUs can JIT it.
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += rel(
        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
    )
    cuda_include = []
    try:  # the pip CUDA headers (cublas_v2.h, cusparse.h) that ATen/cuda/CUDAContext.h pulls in
        import nvidia

        for base in nvidia.__path__:
            cuda_include += glob.glob(os.path.join(base, "cu*", "include"))
    except ImportError:
        pass
    nvcc = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v,-warn-spills",
            f'-DG2TR_VERSION="{VERSION}"', "-DG2TR_WITH_CUDA"]
    cxx += ["-DG2TR_WITH_CUDA", f'-DG2TR_CUDA_ARCHS="{archs}"']
    return cpp_extension.CUDAExtension(
        "g2tr_kernels._C", sources, include_dirs=include_dirs + cuda_include,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
    )


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """G2TR_PREBUILT_EXTENSION=<path to _C*.so> packages that file instead of compiling:
    tools/wheel_check.sh uses it to wheel the extension test.sh has just built and tested,
    without a second compile (minutes on 2 cores). Unset, this is torch's BuildExtension."""

    def build_extension(self, ext):
        prebuilt = os.environ.get("G2TR_PREBUILT_EXTENSION")
        if not prebuilt:
            return super().build_extension(ext)
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(prebuilt, target)


setup(
    name="g2tr_kernels",
    version=VERSION,
    packages=find_packages(include=["g2tr_kernels", "g2tr_kernels.*"]),
    package_data={"g2tr_kernels": ["py.typed"]},  # PEP 561: the inline annotations are the types
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
