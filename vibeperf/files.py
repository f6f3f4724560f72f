"""Atomic writes: a reader (or a crash) never sees half a file or half a directory.

- `atomic_dir(final)`: a context manager yielding a temporary sibling directory; on a clean exit it replaces `final`
  (an existing one is removed first), on an error it is deleted. `name` fixes the temporary name (needed under
  torchrun, where every rank must write into the same directory).
- `write_text(path, text)` and `save_figure(fig, path)`: written to a temporary sibling, then `os.replace`d.
- `remove_stale_tmp(directory)`: the temporary siblings that processes which no longer run left in `directory` (a
  kill during a save leaves one; at 3B scale a checkpoint's is a model plus optimizer copy), removed.

Temporary siblings are named `.NAME.tmp-PID-RANDOM` (the writer's process id), so a later run can tell whose they are.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def atomic_dir(final: Path | str, *, tmp: Path | str | None = None) -> Iterator[Path]:
    """Build a directory in a temporary sibling (or `tmp`), then rename it to `final` (see the module docstring)."""
    final = Path(final)
    tmp = Path(tmp) if tmp is not None else _tmp_sibling(final)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_TMP = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}(\.\w+)?$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_tmp(directory: Path | str, *, also: tuple[str, ...] = ()) -> list[Path]:
    """Remove the temporary siblings in `directory` whose writer process is gone (and the names in `also`, fixed
    temporary names a run removes before it writes them again); returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        m = _TMP.match(p.name)
        if (m and not _alive(int(m.group(1)))) or p.name in also:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_text(path: Path | str, text: str) -> None:
    """Write `text` to `path` atomically."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig, path: Path | str, dpi: int = 100) -> None:
    """`fig.savefig` to `path` atomically (the temporary name keeps the suffix, which picks the format)."""
    path = Path(path)
    tmp = _tmp_sibling(path, path.suffix)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
