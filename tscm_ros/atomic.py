"""Atomic writes: a file or a directory appears complete under its name or not at all, even across a crash.

Both forms write into a temporary sibling (same directory, so the rename stays on one file system), flush
it to disk, rename it into place and flush the parent directory, so a power cut leaves either the old or
the new content. On any error the temporary is removed and an existing target is left as it was. What is
written gets the permissions of a plainly created file (the process umask applies).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0o022)  # reading the umask means setting it; put it straight back
os.umask(_UMASK)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's content and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` with the same suffix (libraries pick formats by suffix) to write;
    renamed onto ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp creates 0600
        fsync_path(temp)
        os.replace(temp, path)
        fsync_path(path.parent)
    finally:
        temp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """An empty temporary directory to fill, named like ``path`` (writers such as rosbag2 name files after
    their directory) inside a hidden sibling; when the block succeeds it replaces ``path`` (an existing
    directory there is moved aside, then deleted). Callers decide beforehand whether an existing ``path``
    may be replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    staging = holder / path.name
    staging.mkdir()
    try:
        yield staging
        for root, _, files in os.walk(staging):
            for name in files:
                fsync_path(Path(root) / name)
            fsync_path(Path(root))
        if path.exists():
            os.rename(path, holder / f"{path.name}.old")
        os.rename(staging, path)
        fsync_path(path.parent)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
