"""download_file against a real HTTP server on 127.0.0.1 that can cut transfers and ignore Range."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from SAMMed3DLib import download
from SAMMed3DLib.download import (
    ChecksumMismatch,
    DownloadCancelled,
    TerminalProgress,
    download_file,
    part_path,
    read_recorded_sha256,
    sidecar_path,
)
from SAMMed3DLib.errors import DownloadError

TIMEOUT = 5.0
CHUNK = 16 * 1024


class FileServer(ThreadingHTTPServer):
    """Serves `content` at /<name> with an ETag (`version`) that If-Range is checked against; records every Range
    and If-Range header and how many body bytes it sent."""

    daemon_threads = True

    def __init__(self, content: bytes):
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.content = content
        self.cut_after: Optional[int] = None
        self.range_limit: Optional[int] = None  # a 206 holds at most this many bytes (its Content-Range says so)
        self.ignore_range = False
        self.stall_seconds = 0.0
        self.send_length = True  # False: the body ends where the connection closes (HTTP/1.0 style)
        self.content_encoding: Optional[str] = None  # a Content-Encoding header to claim, whatever was asked
        self.ranges_seen: List[Optional[str]] = []
        self.version = '"v1"'
        self.if_ranges_seen: List[Optional[str]] = []
        self.bytes_sent: List[int] = []

    def url(self, name: str = "model.pth") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _RangeHandler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        if self.path.startswith("/missing"):
            self.send_error(404)
            return
        content = self.server.content
        requested, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        self.server.ranges_seen.append(requested)
        self.server.if_ranges_seen.append(if_range)
        if if_range is not None and if_range != self.server.version:
            requested = None  # RFC 9110: a Range whose If-Range no longer matches is ignored, the whole file sent
        start = 0
        if requested and not self.server.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested)[1])
            if start >= len(content):
                self.server.bytes_sent.append(0)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(content)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = (
                len(content) if self.server.range_limit is None else min(len(content), start + self.server.range_limit)
            )
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(content)}")
        else:
            end = len(content)
            self.send_response(200)
        body = content[start:end]
        self.send_header("ETag", self.server.version)
        if self.server.content_encoding:
            self.send_header("Content-Encoding", self.server.content_encoding)
        if self.server.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_after is not None:
            # Promise the whole body, send part of it, then hang up: a transfer cut mid-way.
            body = body[: self.server.cut_after]
            self.close_connection = True
        self.server.bytes_sent.append(len(body))  # before writing: the client may finish reading first
        self.wfile.write(body)
        if self.server.stall_seconds:
            self.wfile.flush()
            time.sleep(self.server.stall_seconds)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""


def serve(content: bytes) -> Iterator[FileServer]:
    """Run a FileServer in a thread for the duration of a fixture."""
    server = FileServer(content)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=TIMEOUT)


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


CONTENT = random_bytes(300_000)
CONTENT_SHA256 = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def server() -> Iterator[FileServer]:
    yield from serve(CONTENT)


def fetch(server: FileServer, destination: Path, **options) -> str:
    options.setdefault("timeout", TIMEOUT)
    options.setdefault("chunk_size", CHUNK)
    return download_file(server.url(), destination, **options)


def test_full_download_returns_hash_and_records_it(server: FileServer, tmp_path: Path) -> None:
    destination = tmp_path / "nested" / "model.pth"
    calls = []
    digest = fetch(server, destination, progress=lambda done, total: calls.append((done, total)))
    assert digest == CONTENT_SHA256
    assert destination.read_bytes() == CONTENT
    assert not part_path(destination).exists()
    assert read_recorded_sha256(destination) == CONTENT_SHA256
    assert sidecar_path(destination).read_text() == f"{CONTENT_SHA256}  model.pth\n"
    assert server.ranges_seen == [None]
    assert calls[0] == (0, len(CONTENT)) and calls[-1] == (len(CONTENT), len(CONTENT))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_interrupted_transfer_keeps_only_the_part_and_resume_fetches_the_rest(
    server: FileServer, tmp_path: Path
) -> None:
    destination = tmp_path / "model.pth"
    server.cut_after = 100_000
    with pytest.raises(DownloadError, match=r"stopped after 100000 of 300000 bytes.*resume"):
        fetch(server, destination)
    assert not destination.exists()
    assert part_path(destination).read_bytes() == CONTENT[:100_000]

    server.cut_after = None
    digest = fetch(server, destination, sha256=CONTENT_SHA256.upper())
    assert server.ranges_seen[-1] == "bytes=100000-"
    assert server.bytes_sent[-1] == 200_000
    assert digest == CONTENT_SHA256
    assert destination.read_bytes() == CONTENT
    assert not part_path(destination).exists()


def test_stalled_transfer_times_out_and_keeps_the_part(server: FileServer, tmp_path: Path) -> None:
    destination = tmp_path / "model.pth"
    server.cut_after = 50_000
    server.stall_seconds = 1.0
    with pytest.raises(DownloadError, match=r"stopped after \d+ of 300000 bytes \(timed out\)"):
        fetch(server, destination, timeout=0.2)
    assert not destination.exists()
    # A chunk read when the timeout struck is lost; everything written before it is kept.
    kept = part_path(destination).read_bytes()
    assert kept == CONTENT[: len(kept)] and len(kept) > 0


def test_progress_and_cancelling_follow_a_slow_server_without_waiting_for_a_whole_chunk(
    server: FileServer, tmp_path: Path
) -> None:
    destination = tmp_path / "model.pth"
    server.cut_after = 50_000
    server.stall_seconds = 3.0  # a slow link: far less than the 1 MB chunk arrives in a while
    started = time.monotonic()
    with pytest.raises(DownloadCancelled):
        fetch(server, destination, chunk_size=1 << 20, progress=lambda done, total: False if done else None)
    assert time.monotonic() - started < 1.5
    kept = part_path(destination).read_bytes()
    assert kept == CONTENT[: len(kept)] and len(kept) > 0


def test_wrong_hash_deletes_the_part_and_names_both_hashes(server: FileServer, tmp_path: Path) -> None:
    destination = tmp_path / "model.pth"
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatch) as caught:
        fetch(server, destination, sha256=wrong)
    assert CONTENT_SHA256 in str(caught.value) and wrong in str(caught.value)
    assert "retry" in str(caught.value)
    assert isinstance(caught.value, DownloadError)
    assert not destination.exists()
    assert not part_path(destination).exists()
    assert not sidecar_path(destination).exists()


def test_progress_returning_false_cancels_and_keeps_the_part_for_resuming(server: FileServer, tmp_path: Path) -> None:
    destination = tmp_path / "model.pth"
    with pytest.raises(DownloadCancelled):
        fetch(server, destination, progress=lambda done, total: False if done >= CHUNK else None)
    assert not destination.exists()
    kept = part_path(destination).read_bytes()
    assert kept == CONTENT[: len(kept)] and 0 < len(kept) < len(CONTENT)

    assert fetch(server, destination) == CONTENT_SHA256
    assert server.ranges_seen[-1] == f"bytes={len(kept)}-"
    assert destination.read_bytes() == CONTENT


def _cut_short_then_replaced_on_the_server(server: FileServer, folder: Path) -> Path:
    """A download stopped after 100,000 bytes of version "v1", whose file the server then replaces ("v2")."""
    destination = folder / "model.pth"
    server.cut_after = 100_000
    with pytest.raises(DownloadError):
        fetch(server, destination)
    server.cut_after = None
    server.content, server.version = random_bytes(300_000, seed=1), '"v2"'
    return destination


def test_a_file_replaced_on_the_server_is_downloaded_whole_not_spliced(server: FileServer, tmp_path: Path) -> None:
    destination = _cut_short_then_replaced_on_the_server(server, tmp_path)
    assert fetch(server, destination) == hashlib.sha256(server.content).hexdigest()
    assert destination.read_bytes() == server.content
    assert server.if_ranges_seen == [None, '"v1"'] and server.ranges_seen[-1] == "bytes=100000-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "model.pth.sha256"]


def test_a_stop_as_a_changed_file_starts_arriving_leaves_no_old_bytes_under_its_new_version(
    server: FileServer, tmp_path: Path
) -> None:
    destination = _cut_short_then_replaced_on_the_server(server, tmp_path)
    with pytest.raises(DownloadCancelled):  # stopped as the whole new file (200) begins to arrive
        fetch(server, destination, progress=lambda done, total: False)
    assert not part_path(destination).exists()  # the old bytes are gone before "v2" is noted

    assert fetch(server, destination) == hashlib.sha256(server.content).hexdigest()
    assert destination.read_bytes() == server.content
    assert server.if_ranges_seen == [None, '"v1"', None]


def test_a_206_that_ends_short_of_the_file_is_an_interrupted_transfer_that_resumes(
    server: FileServer, tmp_path: Path
) -> None:
    destination = tmp_path / "model.pth"
    part_path(destination).write_bytes(CONTENT[:100_000])
    server.range_limit = 50_000  # bytes 100000-149999/300000: a server may send less than asked
    with pytest.raises(DownloadError, match=r"stopped after 150000 of 300000 bytes .*try again to resume"):
        fetch(server, destination)
    assert not destination.exists() and not sidecar_path(destination).exists()
    assert part_path(destination).read_bytes() == CONTENT[:150_000]

    server.range_limit = None
    assert fetch(server, destination) == CONTENT_SHA256
    assert server.ranges_seen == ["bytes=100000-", "bytes=150000-"]
    assert destination.read_bytes() == CONTENT


def test_progress_of_a_resumed_transfer_counts_toward_the_size_its_content_range_gives(
    server: FileServer, tmp_path: Path
) -> None:
    destination = tmp_path / "model.pth"
    part_path(destination).write_bytes(CONTENT[:100_000])
    server.send_length = False
    calls = []
    assert fetch(server, destination, progress=lambda done, total: calls.append((done, total))) == CONTENT_SHA256
    assert calls[0] == (100_000, len(CONTENT)) and calls[-1] == (len(CONTENT), len(CONTENT))


def test_server_ignoring_range_restarts_from_the_beginning(server: FileServer, tmp_path: Path) -> None:
    destination = tmp_path / "model.pth"
    part_path(destination).write_bytes(b"stale bytes that must not survive")
    server.ignore_range = True
    assert fetch(server, destination) == CONTENT_SHA256
    assert server.ranges_seen == ["bytes=33-"]
    assert destination.read_bytes() == CONTENT


def test_complete_part_answered_416_is_verified_without_downloading(server: FileServer, tmp_path: Path) -> None:
    destination = tmp_path / "model.pth"
    part_path(destination).write_bytes(CONTENT)
    assert fetch(server, destination, sha256=CONTENT_SHA256) == CONTENT_SHA256
    assert server.ranges_seen == [f"bytes={len(CONTENT)}-"]
    assert server.bytes_sent == [0]
    assert destination.read_bytes() == CONTENT


def test_part_longer_than_the_file_is_discarded_and_downloaded_again(server: FileServer, tmp_path: Path) -> None:
    destination = tmp_path / "model.pth"
    part_path(destination).write_bytes(CONTENT + b"extra")
    assert fetch(server, destination) == CONTENT_SHA256
    assert server.ranges_seen == [f"bytes={len(CONTENT) + 5}-", None]
    assert destination.read_bytes() == CONTENT


def test_ctrl_c_while_checking_keeps_the_download_for_the_next_run(server: FileServer, tmp_path: Path) -> None:
    destination = tmp_path / "model.pth"

    def interrupted(downloaded: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch(server, destination, check=interrupted)
    assert part_path(destination).read_bytes() == CONTENT
    assert fetch(server, destination, check=lambda downloaded: None) == CONTENT_SHA256
    assert server.bytes_sent == [len(CONTENT), 0]
    assert destination.read_bytes() == CONTENT


def test_resumed_body_without_length_cut_short_is_not_taken_as_whole(server: FileServer, tmp_path: Path) -> None:
    destination = tmp_path / "model.pth"
    part_path(destination).write_bytes(CONTENT[:100_000])
    server.send_length, server.cut_after = False, 50_000
    with pytest.raises(DownloadError, match=r"stopped after 150000 of 300000 bytes"):
        fetch(server, destination, sha256=CONTENT_SHA256)
    assert part_path(destination).read_bytes() == CONTENT[:150_000]

    server.cut_after = None
    assert fetch(server, destination, sha256=CONTENT_SHA256) == CONTENT_SHA256
    assert server.ranges_seen == ["bytes=100000-", "bytes=150000-"]


def test_a_full_disk_names_the_folder_and_the_part_resumes(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    destination = tmp_path / "model.pth"
    real_open = open

    class FillingFile(io.FileIO):
        def write(self, data) -> int:
            if self.tell() + len(data) > 100_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    def filling_open(path, mode: str = "r", *args, **kwargs):
        if Path(path) == part_path(destination) and "r" not in mode:
            return FillingFile(path, mode.replace("b", ""))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(download, "open", filling_open, raising=False)
    with pytest.raises(DownloadError, match=rf"into {re.escape(str(tmp_path))} \(No space left on device\): make room"):
        fetch(server, destination)
    monkeypatch.undo()
    kept = part_path(destination).read_bytes()
    assert kept == CONTENT[: len(kept)] and len(kept) > 0
    assert fetch(server, destination) == CONTENT_SHA256
    assert server.ranges_seen[-1] == f"bytes={len(kept)}-"


def test_a_body_sent_compressed_against_the_request_is_refused_by_name(server: FileServer, tmp_path: Path) -> None:
    destination = tmp_path / "model.pth"
    server.content_encoding = "gzip"
    with pytest.raises(DownloadError, match=r"sent it compressed \(Content-Encoding: gzip\).*--checkpoint PATH"):
        fetch(server, destination)
    assert not destination.exists() and not part_path(destination).exists()


def test_unreachable_host_gives_one_clear_sentence(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    destination = tmp_path / "model.pth"
    with pytest.raises(DownloadError) as caught:
        download_file(f"http://127.0.0.1:{closed_port}/model.pth", destination, timeout=TIMEOUT)
    message = str(caught.value)
    assert message.startswith("Cannot reach 127.0.0.1 to download model.pth (")
    assert "check the network connection" in message and "--checkpoint PATH" in message
    assert not destination.exists()


def test_the_caller_words_how_to_supply_the_file_by_hand(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    hint = "download the file yourself and choose it under Model"
    with pytest.raises(DownloadError) as caught:
        download_file(f"http://127.0.0.1:{closed_port}/model.pth", tmp_path / "model.pth", manual_hint=hint)
    assert str(caught.value).endswith(f", or {hint}.") and "--checkpoint" not in str(caught.value)


def test_http_error_names_the_status(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"HTTP 404 .*check that the URL"):
        download_file(server.url("missing.pth"), tmp_path / "model.pth", timeout=TIMEOUT)
    assert not (tmp_path / "model.pth").exists()


def test_non_http_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="only http and https"):
        download_file((tmp_path / "x").as_uri(), tmp_path / "model.pth")


def test_terminal_progress_throttles_and_ends_the_line() -> None:
    stream = io.StringIO()
    bar = TerminalProgress("turbo", interval=3600, width=10, stream=stream)
    bar(0, 1000)
    bar(500, 1000)
    bar(1000, 1000)
    bar(1000, 1000)
    assert stream.getvalue() == "\r" + bar.line(0, 1000) + "\r" + bar.line(1000, 1000) + "\n"
    assert bar.line(500_000, 1_000_000) == "turbo [#####-----]  50% 0.5/1.0 MB"
    assert bar.line(2_500_000, None) == "turbo 2.5 MB"
