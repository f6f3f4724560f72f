"""Loads the compiled extension `vibeperf._C` once; its absence is reported once and is never fatal.

`HAS_EXT` says whether the C++ part loaded, `HAS_CUDA_EXT` whether it was built with its CUDA kernels, and
`EXT_ERROR` why it did not load. Every op that has a C++/CUDA path also has a Triton or torch path.

A build made for another torch is refused with an ImportError naming both versions and the rebuild command: the
build writes the torch it compiled against to `_C_build.json` beside the module (setup.py), and a libtorch ABI
mismatch otherwise shows up as an undefined symbol or a crash far from its cause. `VIBEPERF_SKIP_EXT=1` skips the
extension at run time (every op then takes its Triton or torch path).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch  # the extension links against libtorch, which must be loaded first

REBUILD = (
    "pip install --no-build-isolation --no-deps --force-reinstall vibeperf  "
    "(from a source checkout: pip install --no-build-isolation -e .)"
)


def build_info() -> dict | None:
    """What `vibeperf._C` was compiled for ({"torch": version, "cuda": version or None}); None when unrecorded."""
    path = Path(__file__).with_name("_C_build.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_torch_version(info: dict | None, running: str) -> None:
    """ImportError when the extension was built for another torch than `running` (nothing when unrecorded)."""
    if info and info.get("torch") != running:
        raise ImportError(
            f"vibeperf._C was built against torch {info.get('torch')} but torch {running} is installed; rebuild it "
            f"against this torch: {REBUILD}; or set VIBEPERF_SKIP_EXT=1 to run without it (Triton/torch paths only)"
        )


C = None
EXT_ERROR: str | None = None
if os.environ.get("VIBEPERF_SKIP_EXT") == "1":
    EXT_ERROR = "skipped (VIBEPERF_SKIP_EXT=1)"
else:
    if importlib.util.find_spec("vibeperf._C") is not None:
        check_torch_version(build_info(), torch.__version__)
    try:
        C = importlib.import_module("vibeperf._C")
    except ImportError as exc:  # a missing or broken build: say so once, fall back to Python paths
        EXT_ERROR = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"vibeperf._C is not available ({EXT_ERROR}); C++/CUDA paths are off and every op uses its Triton or "
            f"torch path. Build it with: {REBUILD}.",
            RuntimeWarning,
            stacklevel=2,
        )

HAS_EXT = C is not None
HAS_CUDA_EXT = HAS_EXT and bool(getattr(C, "WITH_CUDA", False))
