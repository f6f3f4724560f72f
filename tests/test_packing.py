"""Best-fit-decreasing packer: the C++ path and its Python twin give identical bins, and the bins are valid."""

import time

import pytest
import torch

from vibeperf import _ext
from vibeperf.packing import bins_to_rows, pack_lengths, pack_lengths_python

needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"vibeperf._C not built: {_ext.EXT_ERROR}")


def _check_valid(lengths: torch.Tensor, bins: torch.Tensor, budget: int) -> None:
    assert bins.shape == lengths.shape and bins.dtype == torch.int64
    loads = torch.zeros(int(bins.max()) + 1, dtype=torch.int64).index_add_(0, bins, lengths)
    assert int(loads.max()) <= budget
    assert torch.equal(torch.unique(bins), torch.arange(loads.numel()))  # ids 0..B-1, none empty


@needs_ext
@pytest.mark.parametrize(
    "n, max_len, budget, seed",
    [(1, 5, 5, 0), (10, 7, 7, 1), (1000, 4096, 16384, 2), (5000, 100, 1000, 3), (2000, 8, 16, 4)],
    ids=["one", "all-full", "sft-16k", "many-small", "many-ties"],
)
def test_cpp_and_python_bins_identical(n, max_len, budget, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g)
    cpp = pack_lengths(lengths, budget, backend="cpp")
    py = pack_lengths(lengths, budget, backend="python")
    assert torch.equal(cpp, py)
    _check_valid(lengths, cpp, budget)


def test_best_fit_decreasing_by_hand():
    # decreasing: 6(i1) -> bin0 [room 4]; 5(i3) -> bin1 [5]; 4(i0) best fit bin0 (room 4) -> [0];
    # 3(i2) -> bin1 (room 5, the only fit) -> [2]; 2(i4) -> bin1 (room 2) -> [0]
    bins = pack_lengths_python([4, 6, 3, 5, 2], 10)
    assert bins.tolist() == [0, 0, 1, 1, 1]
    assert bins_to_rows(bins) == [[0, 1], [2, 3, 4]]


def test_ties_go_to_the_lower_bin_id():
    # 3, 3 open two bins (room 2 each); the 2 goes to bin 0, the next 2 to bin 1
    assert pack_lengths_python([3, 3, 2, 2], 5).tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_ext)])
@pytest.mark.parametrize(
    "lengths, budget", [([0, 3], 4), ([5], 4), ([-1], 4), ([1], 0)], ids=["zero", "long", "neg", "b0"]
)
def test_bad_lengths_raise(backend, lengths, budget):
    with pytest.raises((ValueError, RuntimeError), match="outside|budget"):
        pack_lengths(lengths, budget, backend=backend)


@needs_ext
def test_one_million_lengths_well_under_a_second():
    lengths = torch.randint(1, 4097, (1_000_000,), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    bins = pack_lengths(lengths, 16384, backend="cpp")
    elapsed = time.perf_counter() - t0
    _check_valid(lengths, bins, 16384)
    assert elapsed < 1.0, f"packing 1M lengths took {elapsed:.2f} s"
