"""Resumable, SHA-256-verified, atomic HTTP download of one file, with a progress callback.

The file grows in `<destination>.part` and is renamed onto the destination only once it is complete and
verified, so the destination is never a half file. Its hash is recorded in `<destination>.sha256`
(the `sha256sum` format) so that later loads can check the file again. The server's version of the file
(its ETag or Last-Modified) is kept in `<destination>.part.version` and sent as If-Range when resuming,
so a file replaced on the server in between is downloaded whole again instead of being spliced. A resumed answer
that stops short of the end of the file (as its Content-Range may say) is an interrupted transfer, which the next
call resumes.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TextIO
from urllib.parse import urlparse

from .atomic import write_text_atomic
from .errors import DownloadError

ProgressCallback = Callable[[int, Optional[int]], Optional[bool]]

MANUAL_HINT = "download the file yourself and pass its path with --checkpoint PATH"
_USER_AGENT = "sammed3d-downloader"
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


class DownloadCancelled(DownloadError):
    """The progress callback asked to stop; the partial file is kept so a later call resumes."""


class ChecksumMismatch(DownloadError):
    """The downloaded file does not have the expected SHA-256; it has been deleted."""


@dataclass(frozen=True)
class _Transfer:
    """What every step of one download needs to know."""

    url: str
    name: str
    part: Path
    progress: ProgressCallback | None
    timeout: float
    chunk_size: int
    manual_hint: str


@dataclass(frozen=True)
class _ContentRange:
    """A Content-Range header: bytes first-last of total (each None where the server wrote '*')."""

    first: int | None
    last: int | None
    total: int | None


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
    manual_hint: str = MANUAL_HINT,
) -> str:
    """Download `url` to `destination` and return the hex SHA-256 of the complete file.

    An existing `<destination>.part` is resumed with an HTTP Range request. `progress(done, total)` is
    called as data arrives (total is None when the server does not say); returning False cancels.
    If `sha256` is given, a file with another hash is deleted and `ChecksumMismatch` is raised. `check(file)`,
    if given, inspects the complete file before it is accepted; an exception from it deletes the file.
    The hash is recorded in `<destination>.sha256` before the file is moved into place. `manual_hint` ends the
    errors of a failed transfer with how to supply the file by hand (the default names the command line's option).
    """
    destination = Path(destination)
    if urlparse(url).scheme not in ("http", "https"):
        raise DownloadError(
            f"Cannot download {destination.name} from '{url}': only http and https URLs can be downloaded."
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(destination)
    transfer = _Transfer(url, destination.name, part, progress, timeout, chunk_size, manual_hint)
    digest = _fetch(transfer).hexdigest()
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


def _fetch(transfer: _Transfer):
    """Complete the part file from the URL and return the hash object of the whole file."""
    if transfer.part.exists():
        hasher = _resume(transfer)
        if hasher is not None:
            return hasher
    with _open(transfer, 0) as response:
        return _start_over(transfer, response)


def _resume(transfer: _Transfer):
    """Continue the part file with a Range request and return the whole file's hash object.

    Returns None, having deleted the part, when the server cannot continue it: a 416 for a size that is not
    the full size (a longer or foreign file), or a 206 for another offset.
    """
    part = transfer.part
    offset = part.stat().st_size
    try:
        response = _open(transfer, offset, _read_version(part))
    except urllib.error.HTTPError as error:
        error.close()
        if _parse_content_range(error.headers.get("Content-Range")).total == offset:
            _report(transfer, offset, offset)
            return _hash_file(part, transfer.chunk_size)
        _discard(part)
        return None
    with response:
        if response.status != 206:  # the server ignored the Range header, or the file changed since (If-Range)
            return _start_over(transfer, response)
        content_range = _parse_content_range(response.headers.get("Content-Range"))
        if content_range.first == offset:
            return _receive(transfer, response, offset, content_range)
    _discard(part)
    return None


def _start_over(transfer: _Transfer, response: http.client.HTTPResponse):
    """Write the whole file from a full (200) response. The old part goes before the new version is noted: a run
    stopped in between must not leave old bytes under the new version, for a later resume to splice onto."""
    _discard(transfer.part)
    _remember_version(transfer.part, response)
    return _receive(transfer, response, 0)


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


def _open(transfer: _Transfer, offset: int, version: str | None = None) -> http.client.HTTPResponse:
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
    request = urllib.request.Request(transfer.url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=transfer.timeout)
    except urllib.error.HTTPError as error:
        if offset and error.code == 416:
            raise
        error.close()
        raise _http_error(transfer, error) from error
    except (OSError, http.client.HTTPException) as error:
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        raise DownloadError(
            f"Cannot reach {urlparse(transfer.url).hostname} to download {transfer.name} ({reason}): check the "
            f"network connection, or {transfer.manual_hint}."
        ) from error


def _receive(transfer: _Transfer, response, offset: int, content_range: _ContentRange | None = None):
    """Write the response body to the part file (appending after `offset` bytes) and hash the whole file.

    `content_range` is that of a 206 answer: its body ends after byte `last` and the file is `total` bytes long. A
    body that stops short of either is an interrupted transfer (a server may send less than asked), never a whole file.
    """
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):  # its bytes would be stored as they came: not the file, whatever it says
        raise DownloadError(
            f"The server of {transfer.url} sent it compressed (Content-Encoding: {encoding}) although asked for the "
            f"file as it is; try again later, or {transfer.manual_hint}."
        )
    hasher = _hash_file(transfer.part, transfer.chunk_size) if offset else hashlib.sha256()
    end, total = _body_end_and_file_size(response, offset, content_range)
    done = _write_body(transfer, response, hasher, offset, total)
    if end is not None and done != end:
        raise _interrupted(transfer, done, total, "the connection closed early")
    if total is not None and done < total:
        raise _interrupted(transfer, done, total, f"the server sent only bytes {offset}-{done - 1} this time")
    return hasher


def _body_end_and_file_size(
    response, offset: int, content_range: _ContentRange | None
) -> tuple[int | None, int | None]:
    """Where the body should end in the file, and the whole file's size (None where the server does not say)."""
    if content_range is not None:
        end = content_range.last + 1
        return end, content_range.total if content_range.total is not None else end
    length = response.headers.get("Content-Length")
    end = offset + int(length) if length is not None and length.isdigit() else None
    return end, end


def _write_body(transfer: _Transfer, response, hasher, offset: int, total: int | None) -> int:
    """Append the body to the part file as it arrives (or write it anew when `offset` is 0); return the file's size."""
    done = offset
    _report(transfer, done, total)
    try:
        with open(transfer.part, "ab" if offset else "wb") as out:
            while True:
                try:
                    chunk = response.read1(transfer.chunk_size)  # what has arrived, so progress and cancelling keep up
                except (OSError, http.client.HTTPException) as error:
                    raise _interrupted(transfer, done, total, str(error) or type(error).__name__) from error
                if not chunk:
                    return done
                out.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                _report(transfer, done, total)
    except OSError as error:  # a full disk: the error of a write names no file, so say where it was going
        raise DownloadError(
            f"Cannot write the download of {transfer.name} into {transfer.part.parent} ({error.strerror or error}): "
            f"make room or fix the permissions there and try again to resume it, or {transfer.manual_hint}."
        ) from error


def _report(transfer: _Transfer, done: int, total: int | None) -> None:
    if transfer.progress is not None and transfer.progress(done, total) is False:
        raise DownloadCancelled(
            f"The download of {transfer.name} was cancelled after {done} bytes: run it again to resume where it "
            "stopped."
        )


def _interrupted(transfer: _Transfer, done: int, total: int | None, reason: str) -> DownloadError:
    of_total = f" of {total}" if total is not None else ""
    return DownloadError(
        f"The download of {transfer.name} from {urlparse(transfer.url).hostname} stopped after {done}{of_total} bytes "
        f"({reason}): try again to resume it, or {transfer.manual_hint}."
    )


def _http_error(transfer: _Transfer, error: urllib.error.HTTPError) -> DownloadError:
    reason = " ".join(str(error.reason).split())  # urllib's redirect-loop reason spans two lines
    return DownloadError(
        f"{urlparse(transfer.url).hostname} answered HTTP {error.code} ({reason}) to the request for {transfer.name}: "
        f"check that the URL {transfer.url} is right, or {transfer.manual_hint}."
    )


def _parse_content_range(header: str | None) -> _ContentRange:
    """The parts of a Content-Range header; all None when it is absent or does not hold together."""
    match = _CONTENT_RANGE.fullmatch(header.strip()) if header else None
    if match is None:
        return _ContentRange(None, None, None)
    first, last, total = (int(value) if value and value != "*" else None for value in match.groups())
    if first is not None and (last < first or (total is not None and last >= total)):
        return _ContentRange(None, None, None)
    return _ContentRange(first, last, total)


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
