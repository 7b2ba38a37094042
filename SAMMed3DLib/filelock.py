"""An exclusive lock between processes on a lock file, so that two of them never write one download at once.

The operating system holds the lock for the open file (flock on POSIX, msvcrt on Windows) and releases it
when the holder closes it or dies, so a crash leaves no stale lock behind; the empty lock file stays.
Some file systems cannot lock at all (NFS without lockd, some FUSE and SMB mounts); there the caller may choose
to go on without the lock.
"""

from __future__ import annotations

import errno
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

# What a file system that cannot lock answers (EINVAL: what Windows' C runtime makes of "not supported").
UNSUPPORTED_ERRNOS = frozenset((errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL))
# What msvcrt.locking answers while another process holds the lock.
_WINDOWS_BUSY_ERRNOS = frozenset((errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK)))  # macOS has no EDEADLOCK
_WINDOWS_RETRY_SECONDS = 0.1

if os.name == "nt":
    import msvcrt
else:
    import fcntl


@contextmanager
def exclusive_lock(
    path: Path,
    on_wait: Optional[Callable[[], None]] = None,
    on_unsupported: Optional[Callable[[OSError], None]] = None,
) -> Iterator[None]:
    """Hold the lock on `path` (created if absent) for the block, waiting while another process holds it;
    `on_wait()` is called once if it has to wait, before waiting. Where the file system cannot lock, the block
    runs without the lock after `on_unsupported(error)` if that is given; without it the OSError is raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(path, "a+b")
    except PermissionError:  # made by another user of a shared cache: taking the lock needs no write access
        handle = open(path, "rb")
    with handle:
        locked = _acquire(handle, on_wait, on_unsupported)
        try:
            yield
        finally:
            if locked:
                _unlock(handle)


def _acquire(
    handle: BinaryIO, on_wait: Optional[Callable[[], None]], on_unsupported: Optional[Callable[[OSError], None]]
) -> bool:
    """Take the lock and return True; return False when it cannot be had here and `on_unsupported` accepted that."""
    try:
        if not _try_lock(handle):
            if on_wait is not None:
                on_wait()
            _lock(handle)
    except OSError as error:
        if on_unsupported is None or error.errno not in UNSUPPORTED_ERRNOS:
            raise
        on_unsupported(error)
        return False
    return True


def _windows_lock(handle: BinaryIO) -> None:
    # Polled rather than LK_LOCK, which gives up after about 10 s with the same error as a real failure.
    while not _windows_try_lock(handle):
        time.sleep(_WINDOWS_RETRY_SECONDS)


def _windows_try_lock(handle: BinaryIO) -> bool:
    handle.seek(0)
    try:
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError as error:
        if error.errno in _WINDOWS_BUSY_ERRNOS:
            return False
        raise
    return True


def _windows_unlock(handle: BinaryIO) -> None:
    handle.seek(0)
    msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


def _posix_lock(handle: BinaryIO) -> None:
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)


def _posix_try_lock(handle: BinaryIO) -> bool:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _posix_unlock(handle: BinaryIO) -> None:
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


if os.name == "nt":
    _lock, _try_lock, _unlock = _windows_lock, _windows_try_lock, _windows_unlock
else:
    _lock, _try_lock, _unlock = _posix_lock, _posix_try_lock, _posix_unlock
