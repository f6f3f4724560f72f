"""The package installs as a user gets it: sdist and wheel built the way the README says, the wheel installed (not the
editable checkout) in a throw-away environment and run from outside the checkout, and its declared dependencies
resolved from an empty environment.

One build serves every test (module fixture): the sdist from a copy of the source, then the wheel from the unpacked
sdist (which proves the sdist is complete), `pip wheel --no-build-isolation` against this environment's torch (the
extension packaged from the checkout's own build for this torch when there is one, see `_prebuilt_env`). The
throw-away environment is a venv whose `.pth` adds this environment's site-packages (the tested torch, transformers,
...), with the wheel installed into the venv itself, so `import vibeperf` finds the wheel's copy and never the
checkout's. The dry-run resolution needs the package index (PyPI), as `pip install vibeperf` does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import vibeperf

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "csrc", "kernels", "recipes", "vibeperf")
IGNORE = shutil.ignore_patterns("*.so", "__pycache__", "*.pyc", "_C_build.json", "*.egg-info")
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIBEPERF_SKIP_EXT")}, **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _prebuilt_env() -> dict:
    """VIBEPERF_PREBUILT_EXT: the checkout's own build of vibeperf._C (setup_env.sh compiles it from the same sources
    with the same setup.py) when it was made for this torch, so the check packages it instead of compiling the
    extension a second time (minutes on 2 cores); with none, the wheel build compiles it."""
    from vibeperf import _ext

    info = _ext.build_info()
    so = sorted((ROOT / "vibeperf").glob("_C.*.so"))
    if so and info and info["torch"] == torch.__version__:
        return {"VIBEPERF_PREBUILT_EXT": str(so[0])}
    return {}


def _pip(*args) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """{"sdist", "wheel", "venv" (the throw-away environment's python), "away" (a directory outside the checkout)}."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree(ROOT / name, src / name, ignore=IGNORE) if (ROOT / name).is_dir()
         else shutil.copy2(ROOT / name, src / name))  # fmt: skip
    dist = tmp / "dist"
    dist.mkdir()
    _run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(dist)!r})"], src)
    (sdist,) = dist.glob("vibeperf-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    _run(_pip("wheel", "-q", "--no-build-isolation", "--no-deps", "-w", dist, unpacked), tmp, env=_prebuilt_env())
    (wheel,) = dist.glob("vibeperf-*.whl")
    env = tmp / "venv"
    venv.create(env, with_pip=False)
    py = env / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp).stdout.strip())
    tested = [p for p in sys.path if p.endswith("site-packages")]
    (site / "_tested_env.pth").write_text("\n".join(tested) + "\n")
    _run(_pip("--python", py, "install", "-q", "--no-deps", "--no-index", wheel), tmp)
    away = tmp / "away"
    away.mkdir()
    return {"sdist": sdist, "wheel": wheel, "venv": py, "away": away, "env": env}


def test_wheel_and_sdist_contents(built):
    names = zipfile.ZipFile(built["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"vibeperf", f"vibeperf-{vibeperf.__version__}.dist-info"}, tops
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) or "/results/" in n for n in names)
    for needed in ("vibeperf/kernels/lmhead/backend_table.json", "vibeperf/recipes/sft_tiny.toml",
                   "vibeperf/recipes/data/sft_tiny_broad.jsonl", "vibeperf/bench/run.py", "vibeperf/bench/floors.json",
                   "vibeperf/_C_build.json"):
        assert needed in names, needed
    assert any(n.startswith("vibeperf/_C.") and n.endswith(".so") for n in names)
    with tarfile.open(built["sdist"]) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {"csrc/cuda/lmhead.cu", "csrc/packing.h", "setup.py", "recipes/sft_tiny.toml"} <= members
    assert not any(m.startswith(("tests/", "benchmarks/")) for m in members)


def test_installed_wheel_runs_outside_the_checkout(built, tmp_path):
    py, away = built["venv"], built["away"]
    cli = built["env"] / "bin" / "vibeperf"
    where = _run([py, "-c", "import vibeperf, vibeperf.kernels; print(vibeperf.__file__, vibeperf.kernels.__file__)"],
                 away).stdout  # fmt: skip
    assert str(ROOT) not in where and str(built["env"]) in where, where
    version = _run([cli, "--version"], away).stdout
    assert version.startswith(f"vibeperf {vibeperf.__version__} (torch ") and "triton" in version, version
    report = json.loads(_run([cli, "env", "--json"], away).stdout)
    assert report["extension"]["loaded"] and report["extension"]["built_for"]["torch"] == report["packages"]["torch"]
    recipes = _run([cli, "sft", "--recipe-list"], away).stdout
    assert "sft_tiny.toml" in recipes and str(built["env"]) in recipes
    out = tmp_path / "run"
    run = _run([cli, "sft", "sft_tiny", f"output_dir={out}", "train.max_steps=2", "train.device=cpu",
                "logging.progress=false", "checkpoint.save_final=false"], away)  # fmt: skip
    assert "sft: 2 steps" in run.stdout, run.stdout
    assert (out / "metrics.jsonl").exists()
    code = (
        "import importlib, pkgutil, vibeperf\n"
        "mods = [m.name for m in pkgutil.walk_packages(vibeperf.__path__, 'vibeperf.')\n"
        "        if not any(p.startswith('_') for p in m.name.split('.'))]\n"
        "for m in mods: importlib.import_module(m)\n"
        "print(len(mods))"
    )
    assert int(_run([py, "-c", code], away).stdout.split()[-1]) > 40
    check = subprocess.run(_pip("--python", py, "check"), capture_output=True, text=True, cwd=away)
    assert not [line for line in check.stdout.splitlines() if line.lower().startswith("vibeperf ")], check.stdout


def test_dry_run_resolves_every_declared_dependency(built, tmp_path):
    empty = tmp_path / "empty"
    venv.create(empty, with_pip=False)
    report = tmp_path / "report.json"
    _run(_pip("--python", empty / "bin" / "python", "install", "-q", "--dry-run", "--ignore-installed", "--report",
              report, built["wheel"]), tmp_path)  # fmt: skip
    resolved = {i["metadata"]["name"].lower().replace("_", "-") for i in json.loads(report.read_text())["install"]}
    with zipfile.ZipFile(built["wheel"]) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        lines = whl.read(meta).decode().splitlines()
    declared = [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    runtime = [r for r in declared if r.marker is None or r.marker.evaluate({"extra": ""})]
    names = {r.name.lower().replace("_", "-") for r in runtime}
    assert {"torch", "transformers", "safetensors", "numpy", "tqdm", "matplotlib", "math-verify"} <= names, names
    assert names <= resolved, f"declared but not resolved: {names - resolved}"
