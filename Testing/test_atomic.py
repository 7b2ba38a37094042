"""Files are written whole or not at all, with the usual permissions."""

from __future__ import annotations

import os

import pytest

from SAMMed3DLib.atomic import atomic_destination, write_text_atomic


def test_text_lands_whole_with_default_permissions(tmp_path):
    path = write_text_atomic(tmp_path / "report.json", "{}\n")
    assert path.read_text() == "{}\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "mask.nii.gz"
    path.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_destination(path, ".nii.gz") as temporary:
            assert temporary.name.endswith(".nii.gz") and temporary.parent == tmp_path
            temporary.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]
