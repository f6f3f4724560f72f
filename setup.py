"""Build of vibeperf's compiled extension `vibeperf._C` and the package layout; every other piece of metadata
(name, version, dependencies, extras, entry point) is in pyproject.toml.

The C++ part of `vibeperf._C` builds everywhere; the CUDA part only where torch is a CUDA build and nvcc exists.
It is compiled against the torch of the build environment, which must be the torch that will run it, so build
without isolation: `pip install --no-build-isolation .` (an isolated build has no torch and stops here, saying so).
The torch version it was built against is written beside it (`vibeperf/_C_build.json`); `vibeperf._ext` refuses a
build made for another torch at import time.
Environment switches:
  VIBEPERF_BUILD_CUDA=0|1   force the CUDA part off / on (default: auto-detect)
  VIBEPERF_SKIP_EXT=1       build no extension at all (every op then runs through its Triton or torch path)
  VIBEPERF_CUDA_ARCHS=90a   gencode targets for the CUDA part (default "90a": Hopper)
  MAX_JOBS                  parallel compile jobs (torch's own switch)
"""

import glob
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

# `kernels/` is installed as `vibeperf.kernels`, never as a top-level `kernels` (that name is Hugging Face's);
# `recipes/` (recipe files and the tiny runs' data) as `vibeperf/recipes/`. pyproject.toml cannot express the
# renamed folders without listing every package, so the layout stays here.
PACKAGES = find_packages(include=["vibeperf", "vibeperf.*"]) + [
    "vibeperf.kernels", *(f"vibeperf.kernels.{p}" for p in find_packages("kernels")), "vibeperf.recipes"
]
PACKAGE_DIR = {"vibeperf.kernels": "kernels", "vibeperf.recipes": "recipes"}
PACKAGE_DATA = {
    "vibeperf.kernels.lmhead": ["backend_table.json"],
    "vibeperf.bench": ["floors.json"],
    "vibeperf.recipes": ["*.toml", "data/*.jsonl"],
}
BUILD_INFO = "_C_build.json"
BUILDING = {"bdist_wheel", "build", "build_ext", "develop", "editable_wheel", "install", "bdist_egg"}
NO_TORCH = (
    "vibeperf: torch is not importable in this build environment. vibeperf._C is compiled against the torch that "
    "will run it, so install torch first and build without isolation: `pip install --no-build-isolation .` "
    "(or `pip install --no-build-isolation vibeperf`); set VIBEPERF_SKIP_EXT=1 to build without the extension."
)


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
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if BUILDING & set(sys.argv[1:]):
            sys.exit(NO_TORCH)
        return [], {}  # metadata or sdist only: no extension is compiled

    prebuilt = os.environ.get("VIBEPERF_PREBUILT_EXT")

    class BuildExtensionWithInfo(BuildExtension):
        """torch's BuildExtension, then `_C_build.json` beside the built module: the torch it was compiled for.
        VIBEPERF_PREBUILT_EXT=path/_C...so packages a module this setup.py already built for this torch (its
        `_C_build.json` beside it) instead of compiling again (the wheel check in tests/test_wheel.py)."""

        def build_extension(self, ext):
            if not prebuilt:
                return super().build_extension(ext)
            out = self.get_ext_fullpath(ext.name)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copy2(prebuilt, out)

        def run(self):
            super().run()
            if prebuilt:
                with open(os.path.join(os.path.dirname(prebuilt), BUILD_INFO)) as f:
                    info = json.load(f)
                if info["torch"] != torch.__version__:
                    sys.exit(f"VIBEPERF_PREBUILT_EXT={prebuilt} was built for torch {info['torch']}, "
                             f"not this torch {torch.__version__}")  # fmt: skip
            else:
                with_cuda = any(("VIBEPERF_WITH_CUDA", "1") in (e.define_macros or []) for e in self.extensions)
                info = {"torch": torch.__version__, "cuda": torch.version.cuda if with_cuda else None}
            out = os.path.join(os.path.dirname(self.get_ext_fullpath("vibeperf._C")), BUILD_INFO)
            with open(out, "w") as f:
                json.dump(info, f)

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
    return [ext], {"build_ext": BuildExtensionWithInfo.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
