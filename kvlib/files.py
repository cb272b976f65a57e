"""Atomic file writes: content goes to a temporary file in the target's folder, which is then renamed
onto the target (``os.replace``), so a reader never sees a half-written file and an interrupted write
leaves the previous version in place.

The temporary file is created as ``open()`` would create the target (mode ``0o666`` less the umask), not
``tempfile.mkstemp``'s private ``0o600``, so the renamed file has the permissions a plain write gives it. Its
content is flushed to disk (``fsync``) before the rename, so that after a crash the target holds either the old
or the whole new content."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def temp_file(folder: str | Path, name: str) -> str:
    """A new, empty, uniquely named hidden file ``.<name>.<random>.tmp`` in ``folder``, created with the mode a
    plain ``open()`` gives (``0o666`` less the umask); returns its path."""
    tmp = str(Path(folder) / f".{name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
    return tmp


def sync(path: str | Path) -> None:
    """Flush a written file's content to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path`` (its folder is created), then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path.parent, path.name)
    try:
        write(tmp)
        sync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=1) + "\n")


def save_figure(fig, path: str | Path, **savefig) -> None:
    """Save a matplotlib figure to ``path`` atomically, in the format its suffix names (e.g. ``.png``)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.removeprefix("."), **savefig))
