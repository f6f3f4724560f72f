"""Build for vibeperf.

The C++ part of `vibeperf._C` builds everywhere; the CUDA part only where torch is a CUDA build and nvcc exists.
Environment switches:
  VIBEPERF_BUILD_CUDA=0|1   force the CUDA part off / on (default: auto-detect)
  VIBEPERF_SKIP_EXT=1       build no extension at all (every op then runs through its Triton or torch path)
  VIBEPERF_CUDA_ARCHS=90a   gencode targets for the CUDA part (default "90a": Hopper)
  MAX_JOBS                  parallel compile jobs (torch's own switch)
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

# `kernels/` is installed as `vibeperf.kernels`, never as a top-level `kernels` (that name is Hugging Face's).
PACKAGES = find_packages(include=["vibeperf", "vibeperf.*"]) + [
    "vibeperf.kernels", *(f"vibeperf.kernels.{p}" for p in find_packages("kernels"))
]


def _want_cuda() -> bool:
    flag = os.environ.get("VIBEPERF_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _extensions():
    if os.environ.get("VIBEPERF_SKIP_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17"]
    if _want_cuda():
        archs = os.environ.get("VIBEPERF_CUDA_ARCHS", "90a").split(",")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        ext = CUDAExtension(
            "vibeperf._C",
            cpp_sources + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu")),
            define_macros=[("VIBEPERF_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", *gencode]},
            libraries=["cublasLt"],
        )
    else:
        ext = CppExtension("vibeperf._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(
    name="vibeperf",
    version="0.1.0",
    description="Performance-first post-training for small reasoning LLMs (VibeThinker recipe)",
    packages=PACKAGES,
    package_dir={"vibeperf.kernels": "kernels"},
    package_data={"vibeperf.kernels.linear_logprob": ["backend_table.json"]},
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["vibeperf=vibeperf.cli:main"]},
)
