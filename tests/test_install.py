"""The package imports as documented, and never shadows Hugging Face's top-level `kernels`."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vibeperf import _ext, packing

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_public_imports(tmp_path):
    r = _py("import vibeperf, vibeperf.kernels, vibeperf._C; from vibeperf.kernels import linear_logprob", tmp_path)
    assert r.returncode == 0, r.stderr


def test_top_level_kernels_is_not_this_project(tmp_path):
    r = _py("import kernels", tmp_path)
    assert r.returncode != 0 and "No module named 'kernels'" in r.stderr
    # From the checkout root Python finds the folder by that name; it must be an empty placeholder that
    # transformers reads as "hub kernels not installed".
    code = (
        "import kernels; assert not hasattr(kernels, 'linear_logprob'), dir(kernels);"
        "from transformers.utils import import_utils as u; assert not u.is_kernels_available()"
    )
    r = _py(code, ROOT)
    assert r.returncode == 0, r.stderr


def test_missing_extension_falls_back(monkeypatch):
    lengths = torch.randint(1, 50, (200,))
    expected = packing.pack_lengths_python(lengths, 64)
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    assert torch.equal(packing.pack_lengths(lengths, 64), expected)
    with pytest.raises(RuntimeError, match="did not load"):
        packing.pack_lengths(lengths, 64, backend="cpp")
