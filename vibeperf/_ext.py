"""Loads the compiled extension `vibeperf._C` once; its absence is reported once and is never fatal.

`HAS_EXT` says whether the C++ part loaded, `HAS_CUDA_EXT` whether it was built with its CUDA kernels, and
`EXT_ERROR` why it did not load. Every op that has a C++/CUDA path also has a Triton or torch path.
"""

from __future__ import annotations

import importlib
import warnings

import torch  # noqa: F401  (the extension links against libtorch, which must be loaded first)

C = None
EXT_ERROR: str | None = None
try:
    C = importlib.import_module("vibeperf._C")
except ImportError as exc:  # a missing or broken build: say so once, fall back to Python paths
    EXT_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"vibeperf._C is not available ({EXT_ERROR}); C++/CUDA paths are off and every op uses its Triton or torch "
        "path. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_EXT = C is not None
HAS_CUDA_EXT = HAS_EXT and bool(getattr(C, "WITH_CUDA", False))
