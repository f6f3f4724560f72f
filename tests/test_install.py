"""The package imports as documented, and never shadows Hugging Face's top-level `kernels`."""

import json
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


def test_extension_built_for_another_torch_is_refused():
    _ext.check_torch_version(None, "2.13.0")  # unrecorded (an older build): loaded as before
    _ext.check_torch_version({"torch": "2.13.0"}, "2.13.0")
    with pytest.raises(ImportError) as e:
        _ext.check_torch_version({"torch": "2.11.0+cu130", "cuda": "13.0"}, "2.13.0+cpu")
    msg = str(e.value)
    assert "torch 2.11.0+cu130" in msg and "torch 2.13.0+cpu" in msg and "--no-build-isolation" in msg


def test_build_without_torch_says_how_to_build(tmp_path):
    """An isolated build (no torch in the build environment) stops with the --no-build-isolation instruction."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'bdist_wheel'];"
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")  # fmt: skip
    r = _py(code, ROOT)
    assert r.returncode != 0 and "pip install --no-build-isolation" in r.stderr, r.stderr[-2000:]


def test_shipped_recipes_resolve_from_anywhere(tmp_path, monkeypatch):
    from vibeperf.config import load_config
    from vibeperf.packaged import list_recipes, recipes_dir, resolve_recipe
    from vibeperf.sft.config import SFTConfig

    assert resolve_recipe("sft_tiny") == recipes_dir() / "sft_tiny.toml"
    assert resolve_recipe("no_such_recipe") == Path("no_such_recipe")
    assert [Path(p).name for p, _ in list_recipes("rl")] == ["rl_tiny.toml", "rl_vibethinker.toml"]
    monkeypatch.chdir(tmp_path)  # outside the checkout: the recipe's recipes/... data paths point at shipped files
    cfg = load_config(SFTConfig, resolve_recipe("sft_tiny"))
    assert all(Path(d).is_absolute() and Path(d).is_file() for st in cfg.stages for d in st.data)
    assert cfg.output_dir == "runs/sft_tiny"  # everything else stays relative to the working directory
    monkeypatch.chdir(ROOT)
    assert load_config(SFTConfig, "recipes/sft_tiny.toml").stages[0].data == ["recipes/data/sft_tiny_broad.jsonl"]


def test_version_and_env_report(tmp_path):
    import vibeperf

    r = subprocess.run([sys.executable, "-m", "vibeperf", "--version"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith(f"vibeperf {vibeperf.__version__} (torch {torch.__version__}")
    r = subprocess.run([sys.executable, "-m", "vibeperf", "env", "--json"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["packages"]["torch"] == torch.__version__
    assert doc["extension"]["loaded"] == _ext.HAS_EXT and doc["gpu_count"] == torch.cuda.device_count()
    ops = {(row["op"], row["backend"]) for row in doc["auto"]["lmhead"]}
    assert {op for op, _ in ops} == {"linear_logprob", "linear_cross_entropy", "mgpo_loss"}
    if not torch.cuda.is_available():
        assert doc["auto"]["attention"]["backend"] == "exact"
