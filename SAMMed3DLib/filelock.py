"""An exclusive lock between processes on a lock file, so that two of them never write one download at once.

The operating system holds the lock for the open file (flock on POSIX, msvcrt on Windows) and releases it
when the holder closes it or dies, so a crash leaves no stale lock behind; the empty lock file stays.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional


@contextmanager
def exclusive_lock(path: Path, on_wait: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Hold the lock on `path` (created if absent) for the block, waiting while another process holds it;
    `on_wait()` is called once if it has to wait, before waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(path, "a+b")
    except PermissionError:  # made by another user of a shared cache: taking the lock needs no write access
        handle = open(path, "rb")
    with handle:
        if not _try_lock(handle):
            if on_wait is not None:
                on_wait()
            _lock(handle)
        try:
            yield
        finally:
            _unlock(handle)


if os.name == "nt":
    import msvcrt

    def _lock(handle: BinaryIO) -> None:
        handle.seek(0)
        while True:
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # waits about 10 s, then raises
                return
            except OSError:
                continue

    def _try_lock(handle: BinaryIO) -> bool:
        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(handle: BinaryIO) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock(handle: BinaryIO) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)

    def _try_lock(handle: BinaryIO) -> bool:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(handle: BinaryIO) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
