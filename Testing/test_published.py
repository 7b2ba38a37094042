"""resolve_checkpoint and cache_dir, with the published entry pointed at a local HTTP server."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
import torch
from test_download import FileServer, random_bytes, serve

from SAMMed3DLib import filelock, published
from SAMMed3DLib.download import read_recorded_sha256, sidecar_path
from SAMMed3DLib.errors import CheckpointError, DownloadError, SAMMed3DError
from SAMMed3DLib.filelock import exclusive_lock
from SAMMed3DLib.published import PUBLISHED_CHECKPOINTS, cache_dir, resolve_checkpoint


def checkpoint_bytes(seed: int = 0) -> bytes:
    """What torch.save writes for a small state dict: a file that reads as a checkpoint."""
    buffer = io.BytesIO()
    torch.save({"weight": torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))}, buffer)
    return buffer.getvalue()


CONTENT = checkpoint_bytes()
CONTENT_SHA256 = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def server() -> Iterator[FileServer]:
    yield from serve(CONTENT)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("SAMMED3D_CACHE_DIR", str(directory))
    return directory


def publish_locally(monkeypatch: pytest.MonkeyPatch, server: FileServer, sha256: str | None = None) -> Path:
    """Point the `turbo` entry at the local server; return where its cached copy will be."""
    entry = replace(PUBLISHED_CHECKPOINTS["turbo"], url=server.url("sam_med3d_turbo.pth"), sha256=sha256)
    monkeypatch.setitem(PUBLISHED_CHECKPOINTS, "turbo", entry)
    return cache_dir() / entry.filename


def test_registry_points_at_the_official_turbo_file() -> None:
    turbo = PUBLISHED_CHECKPOINTS["turbo"]
    assert turbo.url == "https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth"
    assert turbo.filename == "sam_med3d_turbo.pth" and turbo.name == "turbo" and turbo.sha256 is None
    with pytest.raises(AttributeError):
        turbo.url = "elsewhere"  # type: ignore[misc]


def test_published_name_is_downloaded_once_into_the_cache(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected_path = publish_locally(monkeypatch, server)
    calls = []
    path = resolve_checkpoint("turbo", progress=lambda done, total: calls.append(done))
    assert path == cache / "sam_med3d_turbo.pth" == expected_path
    assert path.read_bytes() == CONTENT
    assert calls[-1] == len(CONTENT)
    assert read_recorded_sha256(path) == CONTENT_SHA256

    assert resolve_checkpoint("turbo") == path
    assert len(server.ranges_seen) == 1


def test_recorded_hash_detects_a_corrupted_cached_file_and_downloads_it_again(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = publish_locally(monkeypatch, server)
    resolve_checkpoint("turbo")
    path.write_bytes(random_bytes(len(CONTENT), seed=1))

    assert resolve_checkpoint("turbo") == path
    assert len(server.ranges_seen) == 2
    assert path.read_bytes() == CONTENT


def test_changed_published_file_is_refused_against_the_recorded_hash(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = publish_locally(monkeypatch, server)
    resolve_checkpoint("turbo")
    path.unlink()
    server.content = random_bytes(1000, seed=2)

    with pytest.raises(DownloadError, match="differs from the copy first downloaded") as caught:
        resolve_checkpoint("turbo")
    assert str(sidecar_path(path)) in str(caught.value)
    assert not path.exists()
    assert read_recorded_sha256(path) == CONTENT_SHA256


def test_registry_hash_is_checked_when_given(server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = publish_locally(monkeypatch, server, sha256="f" * 64)
    with pytest.raises(DownloadError, match="f" * 64):
        resolve_checkpoint("turbo")
    assert not path.exists()

    publish_locally(monkeypatch, server, sha256=CONTENT_SHA256)
    assert resolve_checkpoint("turbo").read_bytes() == CONTENT


def test_cached_file_without_any_hash_is_trusted_and_recorded_if_it_reads_as_a_checkpoint(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = publish_locally(monkeypatch, server)
    cache.mkdir()
    placed = checkpoint_bytes(seed=5)
    path.write_bytes(placed)
    assert resolve_checkpoint("turbo") == path
    assert server.ranges_seen == []
    assert read_recorded_sha256(path) == hashlib.sha256(placed).hexdigest()


def test_a_cached_file_that_is_no_checkpoint_is_replaced_by_a_download(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = publish_locally(monkeypatch, server)
    cache.mkdir()
    path.write_bytes(b"an error page saved by hand")
    assert resolve_checkpoint("turbo").read_bytes() == CONTENT
    assert read_recorded_sha256(path) == CONTENT_SHA256


@pytest.mark.parametrize("sent", [b"<html>rate limited</html>", CONTENT[: len(CONTENT) // 2]], ids=["page", "cut"])
def test_a_first_download_that_is_no_checkpoint_is_deleted_not_trusted(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch, sent: bytes
) -> None:
    path = publish_locally(monkeypatch, server)
    server.content = sent
    with pytest.raises(DownloadError, match="is not a usable checkpoint, so it was deleted"):
        resolve_checkpoint("turbo")
    assert not path.exists() and read_recorded_sha256(path) is None
    server.content = CONTENT  # a later try downloads the real file
    assert resolve_checkpoint("turbo").read_bytes() == CONTENT


def test_a_cached_copy_is_kept_until_a_verified_download_replaces_it(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = publish_locally(monkeypatch, server)
    resolve_checkpoint("turbo")
    own = checkpoint_bytes(seed=9)
    path.write_bytes(own)  # e.g. copied in by hand while the recorded hash is another file's
    server.content = random_bytes(1000, seed=3)
    with pytest.raises(DownloadError, match="differs from the copy first downloaded"):
        resolve_checkpoint("turbo")
    assert path.read_bytes() == own


def test_two_resolvers_at_once_download_once(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = publish_locally(monkeypatch, server)
    results: list[Path] = []
    with exclusive_lock(path.with_name(path.name + ".lock")):  # as another process downloading it would
        waiting = [threading.Thread(target=lambda: results.append(resolve_checkpoint("turbo"))) for _ in range(2)]
        for thread in waiting:
            thread.start()
        time.sleep(0.3)
        assert server.ranges_seen == [] and results == []
    for thread in waiting:
        thread.join(timeout=30)
    assert results == [path, path] and path.read_bytes() == CONTENT
    assert len(server.ranges_seen) == 1
    assert "Another process is downloading" in caplog.text  # a waiting user is told why nothing happens


def test_a_lock_file_another_user_made_in_a_shared_cache_still_locks(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = publish_locally(monkeypatch, server)
    resolve_checkpoint("turbo")
    lock = path.with_name(path.name + ".lock")
    real_open = open

    def as_another_user(file, mode: str = "r", *args, **kwargs):
        if Path(file) == lock and mode != "rb":  # the lock file is theirs, readable but not writable (umask 022)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)

    results: list[Path] = []
    with exclusive_lock(lock):  # held by the other user's process
        monkeypatch.setattr(filelock, "open", as_another_user, raising=False)
        waiting = threading.Thread(target=lambda: results.append(resolve_checkpoint("turbo")))
        waiting.start()
        time.sleep(0.3)
        assert results == []
    waiting.join(timeout=30)
    assert results == [path] and len(server.ranges_seen) == 1


def test_an_old_pytorch_is_named_before_anything_is_downloaded(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = publish_locally(monkeypatch, server)
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    with pytest.raises(SAMMed3DError, match="PyTorch 2.4.1 is too old"):
        resolve_checkpoint("turbo")
    assert server.ranges_seen == [] and not path.exists()


def test_a_cache_folder_that_is_a_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SAMMED3D_CACHE_DIR", str(blocker))
    with pytest.raises(DownloadError, match="is a file, not a folder: point SAMMED3D_CACHE_DIR at a folder"):
        resolve_checkpoint("turbo")


def test_existing_file_path_is_returned_as_it_is(tmp_path: Path) -> None:
    checkpoint = tmp_path / "mine.pth"
    checkpoint.write_bytes(b"weights")
    assert resolve_checkpoint(checkpoint) == checkpoint
    assert resolve_checkpoint(str(checkpoint)) == checkpoint


def test_unknown_name_lists_the_published_names(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no published checkpoint of that name.*: turbo\.$"):
        resolve_checkpoint("tubro")
    with pytest.raises(CheckpointError, match="is not a file"):
        resolve_checkpoint(tmp_path)


def test_none_means_the_builtin_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = tmp_path / "weights" / "sammed3d_demo.pth"
    monkeypatch.setattr(published, "DEMO_CHECKPOINT", demo)
    with pytest.raises(CheckpointError, match="demo checkpoint .* is missing"):
        resolve_checkpoint(None)
    demo.parent.mkdir()
    demo.write_bytes(b"demo")
    assert resolve_checkpoint(None) == demo


def test_demo_checkpoint_lives_in_the_package() -> None:
    assert published.DEMO_CHECKPOINT == Path(published.__file__).parent / "weights" / "sammed3d_demo.pth"


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(published, "_on_windows", lambda: False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAMMED3D_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "sammed3d"

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == tmp_path / "home" / ".cache" / "sammed3d"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sammed3d"

    monkeypatch.setattr(published, "_on_windows", lambda: True)
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cache_dir() == tmp_path / "local" / "sammed3d"

    monkeypatch.setenv("SAMMED3D_CACHE_DIR", str(tmp_path / "chosen"))
    assert cache_dir() == tmp_path / "chosen"
