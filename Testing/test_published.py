"""resolve_checkpoint and cache_dir, with the published entry pointed at a local HTTP server."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
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


def unreachable_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/sam_med3d_turbo.pth"


def test_needs_download_answers_what_resolving_will_do(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = publish_locally(monkeypatch, server)
    assert published.needs_download("turbo")  # absent
    resolve_checkpoint("turbo")
    assert not published.needs_download("turbo")
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # same size, same hash file: only the hash tells
    path.write_bytes(bytes(damaged))
    assert published.needs_download("turbo")

    sidecar_path(path).unlink()  # a copy placed by hand, no hash known: it must read as a checkpoint
    path.write_bytes(checkpoint_bytes(seed=4))
    assert not published.needs_download("turbo")
    path.write_bytes(b"<html>an error page saved by hand</html>")
    assert published.needs_download("turbo")
    with pytest.raises(CheckpointError, match="no published checkpoint 'tubro'.*turbo"):
        published.needs_download("tubro")
    assert len(server.ranges_seen) == 1  # asking downloads nothing


def test_a_damaged_cached_copy_is_named_when_downloaded_again_and_when_that_fails(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = publish_locally(monkeypatch, server)
    resolve_checkpoint("turbo")
    path.write_bytes(random_bytes(len(CONTENT), seed=1))
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint("turbo").read_bytes() == CONTENT
    assert f"The cached copy at {path} was damaged (hash mismatch): downloading it again" in caplog.text

    path.write_bytes(random_bytes(len(CONTENT), seed=1))
    entry = replace(PUBLISHED_CHECKPOINTS["turbo"], url=unreachable_url())
    monkeypatch.setitem(PUBLISHED_CHECKPOINTS, "turbo", entry)  # offline
    with pytest.raises(DownloadError) as caught:
        resolve_checkpoint("turbo")
    assert str(caught.value).startswith(
        f"The cached copy at {path} was damaged (hash mismatch); downloading it again failed: Cannot reach 127.0.0.1"
    )


def test_the_caller_words_how_to_supply_the_file_by_hand(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hint = "download the file yourself and choose it under Model"
    publish_locally(monkeypatch, server)
    server.content = b"<html>rate limited</html>"
    with pytest.raises(DownloadError, match="not a usable checkpoint") as caught:
        resolve_checkpoint("turbo", manual_hint=hint)
    assert str(caught.value).endswith(f", or {hint}.") and "--checkpoint" not in str(caught.value)

    entry = replace(PUBLISHED_CHECKPOINTS["turbo"], url=unreachable_url())
    monkeypatch.setitem(PUBLISHED_CHECKPOINTS, "turbo", entry)
    with pytest.raises(DownloadError, match="Cannot reach") as caught:
        resolve_checkpoint("turbo", manual_hint=hint)
    assert str(caught.value).endswith(f", or {hint}.") and "--checkpoint" not in str(caught.value)
    with pytest.raises(DownloadError, match=r"--checkpoint PATH\.$"):  # the command line's words stay the default
        resolve_checkpoint("turbo")


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


def test_a_cache_that_cannot_lock_is_used_without_the_lock_and_the_way_out_named(
    server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = publish_locally(monkeypatch, server)

    def no_locks(descriptor: int, operation: int) -> None:  # NFS without lockd
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(filelock, "_try_lock", filelock._posix_try_lock)
    monkeypatch.setattr(filelock, "fcntl", SimpleNamespace(flock=no_locks, LOCK_EX=2, LOCK_NB=4, LOCK_UN=8))
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint("turbo").read_bytes() == CONTENT
    assert "cannot lock files" in caplog.text and "SAMMED3D_CACHE_DIR" in caplog.text
    assert "Another process is downloading" not in caplog.text
    with pytest.raises(OSError, match="No locks available"):  # a caller that accepts no unlocked run gets the error
        with exclusive_lock(path.with_name("other.lock")):
            pass


class FakeMsvcrt:
    """msvcrt.locking as Windows answers it: busy (EACCES) `busy_times` times, then either the lock or `error`."""

    LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2

    def __init__(self, busy_times: int = 0, error: int | None = None):
        self.busy_left, self.error, self.calls = busy_times, error, []

    def locking(self, descriptor: int, mode: int, length: int) -> None:
        self.calls.append(mode)
        if mode == self.LK_UNLCK:
            return
        if self.busy_left:
            self.busy_left -= 1
            raise OSError(errno.EACCES, "Permission denied")
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))


def use_windows_locking(monkeypatch: pytest.MonkeyPatch, fake: FakeMsvcrt) -> list[float]:
    """Make filelock take the Windows path with `fake` as msvcrt; return the list its pauses are recorded in."""
    monkeypatch.setattr(filelock, "msvcrt", fake, raising=False)
    monkeypatch.setattr(filelock, "_lock", filelock._windows_lock)
    monkeypatch.setattr(filelock, "_try_lock", filelock._windows_try_lock)
    monkeypatch.setattr(filelock, "_unlock", filelock._windows_unlock)
    pauses: list[float] = []
    monkeypatch.setattr(filelock.time, "sleep", pauses.append)
    return pauses


def test_windows_waits_for_a_held_lock_with_pauses_between_tries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeMsvcrt(busy_times=3)
    pauses = use_windows_locking(monkeypatch, fake)
    waits = []
    with exclusive_lock(tmp_path / "x.lock", on_wait=lambda: waits.append(1)):
        assert fake.calls == [fake.LK_NBLCK] * 4
    assert waits == [1] and len(pauses) == 2 and all(0 < pause <= 1 for pause in pauses)
    assert fake.calls[-1] == fake.LK_UNLCK


def test_windows_where_locking_is_unsupported_goes_on_without_it_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeMsvcrt(error=errno.EINVAL)
    use_windows_locking(monkeypatch, fake)
    waits, unsupported, ran = [], [], []
    with exclusive_lock(tmp_path / "x.lock", on_wait=lambda: waits.append(1), on_unsupported=unsupported.append):
        ran.append(True)
    assert ran == [True] and waits == [] and [error.errno for error in unsupported] == [errno.EINVAL]
    assert fake.calls == [fake.LK_NBLCK]  # tried once, neither retried forever nor unlocked
    with pytest.raises(OSError):
        with exclusive_lock(tmp_path / "x.lock"):
            pass


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


def test_a_checkpoint_named_with_a_tilde_is_a_file_name_or_in_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "mine.pth").write_bytes(b"weights")
    assert resolve_checkpoint("~/mine.pth") == tmp_path / "home" / "mine.pth"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~mine.pth").write_bytes(b"weights")
    assert resolve_checkpoint("~mine.pth") == Path("~mine.pth")
    with pytest.raises(CheckpointError, match="no checkpoint file '~other.pth'"):
        resolve_checkpoint("~other.pth")


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
    monkeypatch.setenv("SAMMED3D_CACHE_DIR", "~/models")
    assert cache_dir() == tmp_path / "home" / "models"


def test_the_lock_module_imports_where_errno_lacks_edeadlock() -> None:
    """macOS's errno has EDEADLK only: a module-level errno.EDEADLOCK broke every command there."""
    script = "import errno; del errno.EDEADLOCK; import SAMMed3DLib.published; print('imported')"
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert finished.stdout.strip() == "imported", finished.stderr
