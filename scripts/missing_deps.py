"""The declared dependencies (pyproject.toml) that this interpreter lacks, for scripts/setup_env.sh.

    python scripts/missing_deps.py [--extra dev] [--hold OUT]

Prints one requirement per line (e.g. `math-verify>=0.8`) for every runtime dependency (and those of each --extra)
whose marker applies here and that is not installed at a version it accepts. --hold OUT writes a pip constraints
file pinning torch and the packages built against it (triton, torchvision, torchaudio) at their installed versions,
so installing what is missing can never replace them. Runs before vibeperf is installed: it reads pyproject.toml and
needs only `packaging` (or pip's vendored copy of it).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELD = ("torch", "triton", "torchvision", "torchaudio")


def declared(extras: list[str]) -> list[str]:
    """The requirement strings of [project].dependencies and of the named optional-dependencies."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]


def missing(requirements: list[str]) -> list[str]:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # every pip carries a copy
        from pip._vendor.packaging.requirements import Requirement
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            version = None
        if version is None or not req.specifier.contains(version, prereleases=True):
            out.append(f"{req.name}{req.specifier}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra", action="append", default=[], help="also the dependencies of this extra (repeatable)")
    ap.add_argument("--hold", type=Path, help="write a constraints file pinning torch & co at their installed versions")
    args = ap.parse_args()
    if args.hold:
        pins = []
        for name in HELD:
            try:
                pins.append(f"{name}=={md.version(name)}")
            except md.PackageNotFoundError:
                continue
        args.hold.parent.mkdir(parents=True, exist_ok=True)
        args.hold.write_text("".join(f"{p}\n" for p in pins))
    print("\n".join(missing(declared(args.extra))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
