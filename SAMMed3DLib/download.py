"""Resumable, SHA-256-verified, atomic HTTP download of one file, with a progress callback.

The file grows in `<destination>.part` and is renamed onto the destination only once it is complete and
verified, so the destination is never a half file. Its hash is recorded in `<destination>.sha256`
(the `sha256sum` format) so that later loads can check the file again. The server's version of the file
(its ETag or Last-Modified) is kept in `<destination>.part.version` and sent as If-Range when resuming,
so a file replaced on the server in between is downloaded whole again instead of being spliced.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional, TextIO
from urllib.parse import urlparse

from .atomic import write_text_atomic
from .errors import DownloadError

ProgressCallback = Callable[[int, Optional[int]], Optional[bool]]

_USER_AGENT = "sammed3d-downloader"
_MANUAL_HINT = "download the file yourself and pass its path with --checkpoint PATH"
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")


class DownloadCancelled(DownloadError):
    """The progress callback asked to stop; the partial file is kept so a later call resumes."""


class ChecksumMismatch(DownloadError):
    """The downloaded file does not have the expected SHA-256; it has been deleted."""


def part_path(destination: Path) -> Path:
    """Where the file grows until it is complete."""
    return destination.with_name(destination.name + ".part")


def version_path(part: Path) -> Path:
    """Where the server's version of the file that `part` holds the start of is kept."""
    return part.with_name(part.name + ".version")


def sidecar_path(destination: Path) -> Path:
    """Where the SHA-256 of a completed download is recorded."""
    return destination.with_name(destination.name + ".sha256")


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    return _hash_file(path, chunk_size).hexdigest()


def read_recorded_sha256(destination: Path) -> str | None:
    """The hash recorded next to `destination` by an earlier download, or None if absent or unreadable."""
    try:
        words = sidecar_path(destination).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if words and _HEX_DIGEST.fullmatch(words[0].lower()):
        return words[0].lower()
    return None


def record_sha256(destination: Path, digest: str) -> None:
    """Write `<destination>.sha256` atomically, in the format `sha256sum -c` reads."""
    write_text_atomic(sidecar_path(destination), f"{digest}  {destination.name}\n", encoding="ascii")


def download_file(
    url: str,
    destination: Path,
    *,
    sha256: str | None = None,
    progress: ProgressCallback | None = None,
    timeout: float = 30.0,
    chunk_size: int = 1 << 20,
    check: Callable[[Path], None] | None = None,
) -> str:
    """Download `url` to `destination` and return the hex SHA-256 of the complete file.

    An existing `<destination>.part` is resumed with an HTTP Range request. `progress(done, total)` is
    called as data arrives (total is None when the server does not say); returning False cancels.
    If `sha256` is given, a file with another hash is deleted and `ChecksumMismatch` is raised. `check(file)`,
    if given, inspects the complete file before it is accepted; an exception from it deletes the file.
    The hash is recorded in `<destination>.sha256` before the file is moved into place.
    """
    destination = Path(destination)
    if urlparse(url).scheme not in ("http", "https"):
        raise DownloadError(
            f"Cannot download {destination.name} from '{url}': only http and https URLs can be downloaded."
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(destination)
    digest = _fetch(url, destination.name, part, progress, timeout, chunk_size).hexdigest()
    expected = sha256.lower() if sha256 else None
    if expected is not None and digest != expected:
        _discard(part)
        raise ChecksumMismatch(
            f"The downloaded {destination.name} has SHA-256 {digest} but {expected} was expected, so it was "
            f"deleted: retry the download, and if it fails again check that the URL {url} is right."
        )
    if check is not None:
        try:
            check(part)
        except Exception:  # a verdict on the file; Ctrl+C while checking is none, so the file is kept
            _discard(part)
            raise
    record_sha256(destination, digest)
    os.replace(part, destination)
    version_path(part).unlink(missing_ok=True)
    return digest


def _fetch(url: str, name: str, part: Path, progress, timeout: float, chunk_size: int):
    """Complete `part` from `url` and return the hash object of the whole file."""
    if part.exists():
        hasher = _resume(url, name, part, progress, timeout, chunk_size)
        if hasher is not None:
            return hasher
    with _open(url, name, 0, timeout) as response:
        _remember_version(part, response)
        return _receive(response, url, name, part, 0, progress, chunk_size)


def _resume(url: str, name: str, part: Path, progress, timeout: float, chunk_size: int):
    """Continue `part` with a Range request and return the whole file's hash object.

    Returns None, having deleted `part`, when the server cannot continue it: a 416 for a size that is not
    the full size (a longer or foreign file), or a 206 for another offset.
    """
    offset = part.stat().st_size
    try:
        response = _open(url, name, offset, timeout, _read_version(part))
    except urllib.error.HTTPError as error:
        error.close()
        if _content_range_total(error.headers.get("Content-Range")) == offset:
            _report(progress, name, offset, offset)
            return _hash_file(part, chunk_size)
        _discard(part)
        return None
    with response:
        if response.status != 206:
            # The server ignored the Range header, or the file changed since (If-Range): start over.
            _remember_version(part, response)
            return _receive(response, url, name, part, 0, progress, chunk_size)
        if _content_range_start(response.headers.get("Content-Range")) == offset:
            return _receive(response, url, name, part, offset, progress, chunk_size)
    _discard(part)
    return None


def _remember_version(part: Path, response: http.client.HTTPResponse) -> None:
    """Keep the response's strong ETag, else its Last-Modified: what If-Range compares when resuming."""
    etag = response.headers.get("ETag")
    version = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
    if version:
        version_path(part).write_text(version, encoding="latin-1")
    else:
        version_path(part).unlink(missing_ok=True)


def _read_version(part: Path) -> str | None:
    try:
        return version_path(part).read_text(encoding="latin-1").strip() or None
    except OSError:
        return None


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    version_path(part).unlink(missing_ok=True)


def _open(url: str, name: str, offset: int, timeout: float, version: str | None = None) -> http.client.HTTPResponse:
    """Send the GET request, with a Range header when resuming after `offset` bytes (and If-Range, when the
    `version` of the file it continues is known, so that a changed file comes whole).

    A 416 answer to a Range request is raised as urllib's HTTPError for `_resume` to judge; every other
    failure becomes a DownloadError.
    """
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if version:
            headers["If-Range"] = version
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if offset and error.code == 416:
            raise
        error.close()
        raise _http_error(url, name, error) from error
    except (OSError, http.client.HTTPException) as error:
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        raise DownloadError(
            f"Cannot reach {urlparse(url).hostname} to download {name} ({reason}): check the network "
            f"connection, or {_MANUAL_HINT}."
        ) from error


def _receive(response, url: str, name: str, part: Path, offset: int, progress, chunk_size: int):
    """Write the response body to `part` (appending after `offset` bytes) and hash the whole file."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):  # its bytes would be stored as they came: not the file, whatever it says
        raise DownloadError(
            f"The server of {url} sent it compressed (Content-Encoding: {encoding}) although asked for the file as "
            f"it is; try again later, or {_MANUAL_HINT}."
        )
    hasher = _hash_file(part, chunk_size) if offset else hashlib.sha256()
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit():
        total = offset + int(length)
    else:  # a 206 without a length still states the full size, so that a body cut short is not taken as whole
        total = _content_range_total(response.headers.get("Content-Range"))
    done = offset
    _report(progress, name, done, total)
    try:
        with open(part, "ab" if offset else "wb") as out:
            while True:
                try:
                    chunk = response.read1(chunk_size)  # what has arrived, so progress and cancelling keep up
                except (OSError, http.client.HTTPException) as error:
                    raise _interrupted(url, name, done, total, str(error) or type(error).__name__) from error
                if not chunk:
                    break
                out.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                _report(progress, name, done, total)
    except OSError as error:  # a full disk: the error of a write names no file, so say where it was going
        raise DownloadError(
            f"Cannot write the download of {name} into {part.parent} ({error.strerror or error}): make room or "
            f"fix the permissions there and run the same command again to resume it, or {_MANUAL_HINT}."
        ) from error
    if total is not None and done != total:
        raise _interrupted(url, name, done, total, "the connection closed early")
    return hasher


def _report(progress, name: str, done: int, total: int | None) -> None:
    if progress is not None and progress(done, total) is False:
        raise DownloadCancelled(
            f"The download of {name} was cancelled after {done} bytes: run it again to resume where it stopped."
        )


def _interrupted(url: str, name: str, done: int, total: int | None, reason: str) -> DownloadError:
    of_total = f" of {total}" if total is not None else ""
    return DownloadError(
        f"The download of {name} from {urlparse(url).hostname} stopped after {done}{of_total} bytes "
        f"({reason}): run the same command again to resume it, or {_MANUAL_HINT}."
    )


def _http_error(url: str, name: str, error: urllib.error.HTTPError) -> DownloadError:
    reason = " ".join(str(error.reason).split())  # urllib's redirect-loop reason spans two lines
    return DownloadError(
        f"{urlparse(url).hostname} answered HTTP {error.code} ({reason}) to the request for {name}: "
        f"check that the URL {url} is right, or {_MANUAL_HINT}."
    )


def _content_range_start(header: str | None) -> int | None:
    match = _CONTENT_RANGE.fullmatch(header.strip()) if header else None
    return int(match[1]) if match and match[1] is not None else None


def _content_range_total(header: str | None) -> int | None:
    match = _CONTENT_RANGE.fullmatch(header.strip()) if header else None
    return int(match[2]) if match and match[2] != "*" else None


def _hash_file(path: Path, chunk_size: int = 1 << 20):
    hasher = hashlib.sha256()
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(chunk_size), b""):
            hasher.update(chunk)
    return hasher


class TerminalProgress:
    """A one-line progress bar on stderr, usable as `download_file`'s progress callback.

    Redraws at most every `interval` seconds, and once more when the total is reached.
    """

    def __init__(self, label: str, *, interval: float = 0.2, width: int = 30, stream: TextIO | None = None):
        self.label = label
        self.interval = interval
        self.width = width
        self.stream = stream
        self._last_draw = float("-inf")
        self._finished = False

    def __call__(self, done: int, total: int | None) -> None:
        finished = total is not None and done >= total
        now = time.monotonic()
        if self._finished or (not finished and now - self._last_draw < self.interval):
            return
        self._last_draw = now
        self._finished = finished
        stream = self.stream or sys.stderr
        stream.write("\r" + self.line(done, total) + ("\n" if finished else ""))
        stream.flush()

    def finish(self) -> None:
        """End the line, for transfers that stopped before reaching their total (or had none)."""
        if not self._finished and self._last_draw != float("-inf"):
            (self.stream or sys.stderr).write("\n")
        self._finished = True

    def line(self, done: int, total: int | None) -> str:
        megabytes = f"{done / 1e6:.1f}"
        if not total:
            return f"{self.label} {megabytes} MB"
        fraction = min(done / total, 1.0)
        filled = round(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        return f"{self.label} [{bar}] {fraction:4.0%} {megabytes}/{total / 1e6:.1f} MB"
