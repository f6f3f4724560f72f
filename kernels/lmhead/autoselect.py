"""backend="auto" on CUDA tensors: Triton or the CUDA extension, from measurements rather than guesses.

`backend_table.json` beside this file is written by `python -m benchmarks.backend_table` from the committed benchmark
results (benchmarks/results/*.json: B1 scoring forward, B2 cross-entropy forward+backward, B3 MGPO loss), one entry
per (GPU, work, dtype, H, V, N) that both backends ran correctly in one run. The rule:

1. the entries of this GPU (by `torch.cuda.get_device_name`), this work ("forward": no gradient; "train": the
   three-pass engine with gradients; "mgpo"), dtype, H and V;
2. of those, the entry whose N is nearest on a log scale (ties: the smaller N);
3. its winner: "cuda" only where the CUDA path was at least `CUDA_MARGIN` faster than Triton in that run (closer
   calls stay on Triton, the better-tested default), and only when vibeperf._C has its CUDA part;
4. no matching entry (another GPU, shape or dtype): "triton";
5. work with gradients ("train", "mgpo") under $VIBEPERF_LMHEAD_DW_ACC=weight: "triton" (the CUDA engine sums dW in
   fp32 only; `settings.py`).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from . import settings

TABLE = Path(__file__).with_name("backend_table.json")
WORKS = ("forward", "train", "mgpo")
CUDA_MARGIN = 0.03  # the CUDA path must be >= 3% faster than Triton to be picked (timing noise is ~1%)


@functools.cache
def load_table(path: Path = TABLE) -> tuple[dict, ...]:
    """The table's entries (empty when the file is missing: auto then always picks Triton)."""
    if not path.exists():
        return ()
    return tuple(json.loads(path.read_text())["entries"])


@functools.cache
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def choose(work: str, gpu: str, dtype: torch.dtype, n: int, h: int, v: int, entries=None) -> str:
    """The backend the table picks for this call ("triton" or "cuda"), the rule of the module docstring (without the
    extension check)."""
    if work not in WORKS:
        raise ValueError(f"work must be one of {WORKS}, got {work!r}")
    dt = str(dtype).removeprefix("torch.")
    entries = load_table() if entries is None else entries
    same = [e for e in entries if (e["gpu"], e["work"], e["dtype"], e["H"], e["V"]) == (gpu, work, dt, h, v)]
    if not same:
        return "triton"
    near = min(same, key=lambda e: (abs(math.log2(e["N"]) - math.log2(max(n, 1))), e["N"]))
    return near["winner"]


def auto_backend(work: str, hidden: torch.Tensor, weight: torch.Tensor) -> str:
    """The backend ("cuda" or "triton") for CUDA tensors by the table; the caller handles CPU tensors."""
    from vibeperf import _ext

    if not _ext.HAS_CUDA_EXT or (work != "forward" and settings.dw_accumulate() != "fp32"):
        return "triton"
    index = hidden.device.index if hidden.device.index is not None else torch.cuda.current_device()
    return choose(work, _gpu_name(index), hidden.dtype, hidden.shape[0], hidden.shape[1], weight.shape[0])
