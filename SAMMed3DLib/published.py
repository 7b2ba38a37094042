"""Named published checkpoints, the per-user download cache, and turning a name or path into a file."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Union

from .checkpoint import read_checkpoint_file
from .download import (
    MANUAL_HINT,
    ChecksumMismatch,
    DownloadCancelled,
    ProgressCallback,
    download_file,
    file_sha256,
    read_recorded_sha256,
    record_sha256,
    sidecar_path,
)
from .errors import CheckpointError, DownloadError
from .filelock import exclusive_lock
from .paths import user_path
from .torch_version import require_supported_torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedCheckpoint:
    """A checkpoint file published by the SAM-Med3D authors."""

    name: str
    url: str
    filename: str
    sha256: str | None
    description: str


PUBLISHED_CHECKPOINTS: Dict[str, PublishedCheckpoint] = {
    "turbo": PublishedCheckpoint(
        name="turbo",
        url="https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth",
        filename="sam_med3d_turbo.pth",
        # The authors publish no hash; the first download records one (see resolve_checkpoint).
        sha256=None,
        description="SAM-Med3D-turbo, the authors' recommended general-purpose model",
    ),
}

DEMO_CHECKPOINT: Path = Path(__file__).parent / "weights" / "sammed3d_demo.pth"

CACHE_DIR_VARIABLE = "SAMMED3D_CACHE_DIR"

# What `_cached_copy_problem` says of a copy that is not there (every other answer is a kind of damage).
_ABSENT = "absent"


def cache_dir() -> Path:
    """Where published checkpoints are downloaded: $SAMMED3D_CACHE_DIR, else the per-user cache."""
    override = os.environ.get(CACHE_DIR_VARIABLE)
    if override:
        return user_path(override)
    if _on_windows():
        local = os.environ.get("LOCALAPPDATA")
        return (Path(local) if local else Path.home() / "AppData" / "Local") / "sammed3d"
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "sammed3d"
    return Path.home() / ".cache" / "sammed3d"


def resolve_checkpoint(
    name_or_path: Union[str, os.PathLike, None],
    progress: ProgressCallback | None = None,
    manual_hint: str = MANUAL_HINT,
) -> Path:
    """The checkpoint file for None (the built-in demo), an existing file, or a published name.

    A published checkpoint is downloaded into `cache_dir()` when absent, and a cached copy that does not
    match the registry hash (or the hash recorded at its first download) is downloaded again (a warning says
    so). `manual_hint` ends the errors of a failed download with how to supply the file by hand; the default
    names the command line's --checkpoint, so other front ends pass their own words.
    """
    if name_or_path is None:
        return _demo_checkpoint()
    path = user_path(name_or_path)
    if path.is_file():
        return path
    entry = PUBLISHED_CHECKPOINTS.get(os.fspath(name_or_path))
    if entry is not None:
        return _cached_published(entry, progress, manual_hint)
    names = ", ".join(sorted(PUBLISHED_CHECKPOINTS))
    if path.exists():
        raise CheckpointError(f"The checkpoint '{path}' is not a file: pass a .pth file or one of: {names}.")
    raise CheckpointError(
        f"There is no checkpoint file '{path}' and no published checkpoint of that name: pass the path of "
        f"an existing .pth file or one of the published names: {names}."
    )


def checkpoint_file(name_or_path: Union[str, os.PathLike, None]) -> Path:
    """Where `resolve_checkpoint` finds or puts the file of `name_or_path`, without reading or downloading it: the
    demo model, an existing file, else a published name's place in the cache (else the path as given)."""
    if name_or_path is None:
        return DEMO_CHECKPOINT
    path = user_path(name_or_path)
    entry = PUBLISHED_CHECKPOINTS.get(os.fspath(name_or_path))
    if entry is not None and not path.is_file():
        return cache_dir() / entry.filename
    return path


def needs_download(name: str) -> bool:
    """Whether `resolve_checkpoint(name)` would download the published checkpoint `name`: its cached copy is
    absent, or fails the check resolving makes before every use. Ask it just before resolving, to decide whether
    to ask the user first and show progress.

    It makes that same check, so that its answer is the one resolving will reach: when a hash is known (from the
    registry or recorded at the first download) one SHA-256 pass over the file, about 0.4 s for the 400 MB turbo
    file, and otherwise (a copy placed by hand, until its first use records its hash) reading it as a checkpoint.
    A cheaper test (size, or the hash file alone) would miss a copy damaged on disk, which resolving would then
    download again with no consent asked and no progress shown.
    """
    entry = PUBLISHED_CHECKPOINTS.get(name)
    if entry is None:
        raise CheckpointError(
            f"There is no published checkpoint '{name}': use one of {', '.join(sorted(PUBLISHED_CHECKPOINTS))}."
        )
    target = cache_dir() / entry.filename
    return _cached_copy_problem(target, _expected_sha256(entry, target)) is not None


def _demo_checkpoint() -> Path:
    if not DEMO_CHECKPOINT.is_file():
        raise CheckpointError(
            f"The built-in demo checkpoint {DEMO_CHECKPOINT} is missing: reinstall SAMMed3D, or pass a "
            f"checkpoint file or a published name ({', '.join(sorted(PUBLISHED_CHECKPOINTS))})."
        )
    return DEMO_CHECKPOINT


def _cached_published(entry: PublishedCheckpoint, progress: ProgressCallback | None, manual_hint: str) -> Path:
    """The cached file of `entry`, verified, downloading it when absent or damaged. One process at a time (a
    lock beside the file): two downloading at once would write into one partial file."""
    require_supported_torch()  # checked first: an old PyTorch would refuse the file only after the whole download
    folder = cache_dir()
    if folder.exists() and not folder.is_dir():
        raise DownloadError(
            f"The download cache {folder} is a file, not a folder: point {CACHE_DIR_VARIABLE} at a folder."
        )
    target = folder / entry.filename
    # A cache nobody can write (filled by hand, mounted read-only) needs no lock and could not hold one.
    writable = not folder.exists() or os.access(folder, os.W_OK)

    def waiting() -> None:
        log.warning("Another process is downloading %s: waiting for it to finish.", target)

    def unlocked(error: OSError) -> None:
        log.warning(
            "The download cache %s cannot lock files (%s): going on without the lock, so do not fetch %s in two "
            "programs at once; to avoid this, point %s at a folder on a local disk.",
            folder,
            error.strerror or error,
            entry.filename,
            CACHE_DIR_VARIABLE,
        )

    lock = exclusive_lock(target.with_name(target.name + ".lock"), on_wait=waiting, on_unsupported=unlocked)
    with lock if writable else nullcontext():
        return _verified_or_downloaded(entry, target, progress, manual_hint)


def _expected_sha256(entry: PublishedCheckpoint, target: Path) -> str | None:
    """The registry's hash, else the one recorded at the first download; None when neither is known."""
    return entry.sha256.lower() if entry.sha256 else read_recorded_sha256(target)


def _cached_copy_problem(target: Path, expected: str | None) -> str | None:
    """Why the cached copy cannot be used as it is, or None when it can. Without a known hash only loading tells
    a checkpoint from an error page or a cut-off file."""
    if not target.is_file():
        return _ABSENT
    if expected is not None:
        return None if file_sha256(target) == expected else "hash mismatch"
    return None if _reads_as_checkpoint(target) else "not a readable checkpoint"


def _verified_or_downloaded(
    entry: PublishedCheckpoint, target: Path, progress: ProgressCallback | None, manual_hint: str
) -> Path:
    expected = _expected_sha256(entry, target)
    problem = _cached_copy_problem(target, expected)
    if problem is None:
        if expected is None:  # neither the registry nor an earlier download knows the hash: trust this copy from now on
            _record_if_possible(target, file_sha256(target))
        return target
    if problem != _ABSENT:
        log.warning("The cached copy at %s was damaged (%s): downloading it again.", target, problem)
    try:
        _download(entry, target, expected, progress, manual_hint)
    except DownloadCancelled:
        raise
    except DownloadError as error:
        if problem == _ABSENT:
            raise
        raise DownloadError(
            f"The cached copy at {target} was damaged ({problem}); downloading it again failed: {error}"
        ) from error
    return target


def _download(
    entry: PublishedCheckpoint, target: Path, expected: str | None, progress: ProgressCallback | None, manual_hint: str
) -> None:
    """Download `entry` onto `target`. A copy that does not match stays in place until a verified download replaces
    it. Without a known hash the download must read as a checkpoint before it is accepted and its hash recorded."""

    def require_checkpoint(downloaded: Path) -> None:
        try:
            read_checkpoint_file(downloaded)
        except CheckpointError as error:
            raise DownloadError(
                f"What was downloaded is not a usable checkpoint, so it was deleted ({error}): retry later, or "
                f"{manual_hint}."
            ) from error

    check = None if expected is not None else require_checkpoint
    try:
        download_file(entry.url, target, sha256=expected, progress=progress, check=check, manual_hint=manual_hint)
    except ChecksumMismatch as error:
        if entry.sha256:
            raise
        raise DownloadError(
            f"The downloaded {entry.filename} differs from the copy first downloaded (hash recorded in "
            f"{sidecar_path(target)}): retry, or if the published file has changed on purpose, delete "
            f"{sidecar_path(target)} and try again."
        ) from error


def _reads_as_checkpoint(path: Path) -> bool:
    try:
        read_checkpoint_file(path)
    except CheckpointError:
        return False
    return True


def _record_if_possible(target: Path, digest: str) -> None:
    try:
        record_sha256(target, digest)
    except OSError as error:  # a read-only cache filled by hand: the file is still good to use
        log.warning("Could not record the hash of %s (%s); it is used unrecorded.", target, error)


def _on_windows() -> bool:
    return sys.platform == "win32"
