"""Best-fit-decreasing packing of sequence lengths into rows of a token budget.

`pack_lengths(lengths, budget)` returns the bin (row) of every sequence. The C++ implementation in `vibeperf._C`
runs in O(n log n) (an ordered set of open bins); the pure-Python twin here gives identical bins and is the
fallback. Order and ties are part of the contract, so both agree exactly:
sequences by decreasing length (ties: lower index first); each goes to the open bin with the least remaining room
that still fits it (ties: lower bin id), else to a new bin; bin ids count up from 0 in opening order.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from vibeperf import _ext


def _check(lengths: torch.Tensor, budget: int) -> None:
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > budget):
        bad = int(torch.nonzero((lengths < 1) | (lengths > budget))[0, 0])
        raise ValueError(f"lengths[{bad}] = {int(lengths[bad])} is outside [1, budget={budget}]")


def pack_lengths_python(lengths: Sequence[int] | torch.Tensor, budget: int) -> torch.Tensor:
    """Pure-Python best-fit-decreasing; identical output to the C++ path."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    _check(lengths, budget)
    ls = lengths.tolist()
    order = sorted(range(len(ls)), key=lambda i: -ls[i])  # sorted() is stable: ties keep index order
    out = [0] * len(ls)
    open_bins: list[tuple[int, int]] = []  # sorted (remaining room, bin id)
    num_bins = 0
    for i in order:
        pos = bisect.bisect_left(open_bins, (ls[i], -1))
        if pos == len(open_bins):
            bin_id, room = num_bins, budget
            num_bins += 1
        else:
            room, bin_id = open_bins.pop(pos)
        out[i] = bin_id
        if room - ls[i] > 0:
            bisect.insort(open_bins, (room - ls[i], bin_id))
    return torch.tensor(out, dtype=torch.int64)


def pack_lengths(lengths: Sequence[int] | torch.Tensor, budget: int, *, backend: str = "auto") -> torch.Tensor:
    """Bin id [n] (int64) of each length. backend: "auto" (C++ when built, else Python) | "cpp" | "python"."""
    if backend not in ("auto", "cpp", "python"):
        raise ValueError(f"backend must be 'auto', 'cpp' or 'python', got {backend!r}")
    if backend == "python" or (backend == "auto" and not _ext.HAS_EXT):
        return pack_lengths_python(lengths, budget)
    if not _ext.HAS_EXT:
        raise RuntimeError(f"backend='cpp' asked for, but vibeperf._C did not load: {_ext.EXT_ERROR}")
    lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
    return _ext.C.pack_best_fit_decreasing(lengths, int(budget))


def bins_to_rows(bins: torch.Tensor) -> list[list[int]]:
    """Sequence indices of each bin, in bin order; within a bin, in index order."""
    rows: list[list[int]] = [[] for _ in range(int(bins.max()) + 1 if bins.numel() else 0)]
    for i, b in enumerate(bins.tolist()):
        rows[b].append(i)
    return rows
