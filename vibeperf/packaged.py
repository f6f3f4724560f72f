"""The recipes shipped with the package, so an installed vibeperf runs its tiny recipes from any directory.

The checkout's `recipes/` folder (recipe files and the tiny runs' data) is installed as `vibeperf/recipes/`. A recipe
argument that is not an existing file but names a shipped recipe (`sft_tiny` or `sft_tiny.toml`) loads the shipped
one, and inside a shipped recipe a relative path that starts with `recipes/` and names a shipped file points into
the package; every other relative path (output_dir, ...) is still taken from the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def recipes_dir() -> Path:
    """The shipped recipes: `vibeperf/recipes/` when installed, the checkout's `recipes/` in an editable install."""
    installed = _PKG / "recipes"
    return installed if installed.is_dir() else _PKG.parent / "recipes"


def list_recipes(stage: str) -> list[tuple[str, str]]:
    """(path, first comment line) of every shipped recipe of `stage` (files named `<stage>_*.toml`)."""
    out = []
    for path in sorted(recipes_dir().glob(f"{stage}_*.toml")):
        first = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
        out.append((str(path), first.lstrip("# ").strip()))
    return out


def resolve_recipe(arg: str | os.PathLike) -> Path:
    """`arg` when it is a file; else the shipped recipe it names, when there is one; else `arg` unchanged."""
    path = Path(arg)
    if path.exists() or path.parent != Path("."):
        return path
    shipped = recipes_dir() / (path.name if path.suffix else f"{path.name}.toml")
    return shipped if shipped.is_file() else path


def rebase_shipped_paths(recipe: Path, data: dict) -> dict:
    """`data` of `recipe` with its `recipes/...` strings made absolute when `recipe` is a shipped recipe read from
    outside the folder that holds `recipes/` (from a checkout's root they already resolve to the same files)."""
    root = recipes_dir().parent
    if recipe.resolve().parent != recipes_dir().resolve() or Path.cwd().resolve() == root.resolve():
        return data

    def fix(value):
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, str) and value.startswith("recipes/") and (root / value).exists():
            return str(root / value)
        return value

    return fix(data)
