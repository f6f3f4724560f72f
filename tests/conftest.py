"""Test set-up shared by every test.

- Without a GPU, Triton kernels run under its interpreter (TRITON_INTERPRET=1, set before triton is imported) and
  tests marked `gpu` are skipped.
- Every floating-point result of torch.empty / empty_like / empty_strided / new_empty is filled with NaN, so an
  element a kernel forgot to write fails loudly instead of passing on whatever memory held.
- Every test starts from the same seeds.
- Fixtures several modules share: `one_torch_thread` (module scope), `restore_threads`. Shared plain helpers are in
  tests/helpers.py.
"""

import contextlib
import functools
import os
import random

import numpy as np
import pytest
import torch
import torch.utils._device

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        # Triton imports gluon on the first interpreted launch, and gluon's import asserts that the interpreter is on.
        # Tests that drop TRITON_INTERPRET as a user would (test_demo.py) still reach kernels loaded interpreted, so
        # import it now, or such a test fails whenever it is the process's first interpreted launch.
        with contextlib.suppress(ImportError):  # a Triton without gluon has nothing to trip on
            import triton.experimental.gluon  # noqa: F401


def _poisoned(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if out.is_floating_point() or out.is_complex():
            with torch.no_grad():  # a tensor created with requires_grad=True must not record the fill
                out.fill_(float("nan"))
        return out

    return wrapper


# `with torch.device(...)` finds factory functions by identity in a set it builds (and caches) on first use: build it
# from the original functions first, or models created under it would land on the CPU (seen on the GPU machine).
torch.utils._device._device_constructors()
for _name in ("empty", "empty_like", "empty_strided"):
    setattr(torch, _name, _poisoned(getattr(torch, _name)))
torch.Tensor.new_empty = _poisoned(torch.Tensor.new_empty)


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: the tiny model gains nothing from threads, and on a busy 2-core
    machine 2 OpenMP threads ran ~10x slower. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_threads(monkeypatch):
    """For a test that runs the RL trainer: it fixes torch's thread count and exports OMP_NUM_THREADS (before vLLM
    starts), and its engines run without TRITON_INTERPRET; the rest of the suite gets its own settings back."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(threads)))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
