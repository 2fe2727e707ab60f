"""Atomic writes: a file or a directory appears complete under its name or not at all, even across a crash.

Both forms write into a temporary sibling (same directory, so the rename stays on one file system), flush
it to disk, move it into place and flush the parent directory, so a power cut leaves either the old or
the new content. On any error the temporary is removed and an existing target is left as it was. What is
written gets the permissions of a plainly created file (the process umask applies).

A directory that already exists is replaced by an atomic exchange (Linux ``renameat2`` with
``RENAME_EXCHANGE``): at every instant the target path holds the old or the new directory, never nothing.
Where the kernel or the file system refuses the exchange, the old directory is renamed aside and the new one
renamed into place, with a warning: a crash between those two renames leaves the old directory inside the
hidden temporary.

A process killed while writing leaves its temporary (``.<name>.tmp-XXXX``) behind. Each writer holds an
advisory lock (``flock``) on its temporary while it lives, which the kernel drops when the process dies; the
next successful write of the same target removes every temporary whose lock is free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_UMASK = os.umask(0o022)  # reading the umask means setting it; put it straight back
os.umask(_UMASK)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_EXCHANGE_REFUSED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's content and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _renameat2() -> Callable | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28, or not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the kernel or the file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_REFUSED:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _locked(make: Callable[[], tuple[int, Path]]) -> tuple[int, Path]:
    """A new temporary from ``make`` (an open descriptor and its path), locked; made again if a cleaner of
    stale temporaries removed it before the lock was taken."""
    while True:
        fd, temp = make()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(temp)):
                return fd, temp
        except FileNotFoundError:
            pass
        os.close(fd)


def _remove_stale(pattern: str, directory: Path, directories: bool) -> None:
    """Remove the temporaries matching ``pattern`` whose writer is gone (their lock is free)."""
    for name in glob.glob(pattern, root_dir=directory, include_hidden=True):
        candidate = directory / name
        if candidate.is_symlink() or candidate.is_dir() != directories:
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live writer
            os.close(fd)
            continue
        try:
            if directories:
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted write", candidate)
        finally:
            os.close(fd)


def _file_prefix_suffix(path: Path) -> tuple[str, str]:
    return f".{path.stem}.tmp-", path.suffix


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` with the same suffix (libraries pick formats by suffix) to write;
    renamed onto ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _file_prefix_suffix(path)

    def make() -> tuple[int, Path]:
        handle, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        return handle, Path(name)

    lock, temp = _locked(make)
    try:
        yield temp
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp creates 0600
        fsync_path(temp)
        os.replace(temp, path)
        fsync_path(path.parent)
        _remove_stale(glob.escape(prefix) + "*" + glob.escape(suffix), path.parent, directories=False)
    finally:
        temp.unlink(missing_ok=True)
        os.close(lock)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def _put_in_place(staging: Path, path: Path, holder: Path) -> None:
    """Move the complete ``staging`` to ``path``; an existing ``path`` ends up inside ``holder``."""
    if not (path.exists() or path.is_symlink()):
        os.rename(staging, path)
    elif not exchange(staging, path):
        log.warning("%s: the file system refuses an atomic exchange (renameat2 RENAME_EXCHANGE); replacing it in "
                    "two renames", path)
        os.rename(path, holder / f"{path.name}.old")
        os.rename(staging, path)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """An empty temporary directory to fill, named like ``path`` (writers such as rosbag2 name files after
    their directory) inside a hidden sibling; when the block succeeds it replaces ``path`` (an existing
    directory there is exchanged with it, then deleted). Callers decide beforehand whether an existing
    ``path`` may be replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"

    def make() -> tuple[int, Path]:
        holder = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        return os.open(holder, os.O_RDONLY), holder

    lock, holder = _locked(make)
    staging = holder / path.name
    try:
        staging.mkdir()
        yield staging
        _fsync_tree(staging)
        _put_in_place(staging, path, holder)
        fsync_path(path.parent)
        _remove_stale(glob.escape(prefix) + "*", path.parent, directories=True)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
        os.close(lock)
