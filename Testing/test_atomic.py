"""Files are written whole or not at all, with the usual permissions."""

from __future__ import annotations

import os

import pytest

from SAMMed3DLib.atomic import atomic_destination, check_output_path, write_text_atomic
from SAMMed3DLib.errors import InputError


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


def test_a_name_near_the_file_system_limit_is_written(tmp_path):
    name = "liver" * 47 + ".json"  # 240 bytes: the name fits, the name with a temporary suffix would not
    path = write_text_atomic(tmp_path / name, "{}\n")
    assert path.read_text() == "{}\n" and [p.name for p in tmp_path.iterdir()] == [name]


def test_an_output_that_is_an_input_under_another_name_is_refused(tmp_path):
    image = tmp_path / "ct.nii.gz"
    image.write_text("scan")
    other_name = tmp_path / "link.nii.gz"  # as `CT.nii.gz` would be on a case-insensitive disk
    os.link(image, other_name)
    with pytest.raises(InputError, match="one of the input files"):
        check_output_path(other_name, inputs=[image], overwrite=True)


def test_output_checks_protect_inputs_and_existing_files(tmp_path):
    image = tmp_path / "ct.nii.gz"
    image.write_text("scan")
    with pytest.raises(InputError, match="one of the input files"):
        check_output_path(tmp_path / "sub" / ".." / "ct.nii.gz", inputs=[image], overwrite=True)
    with pytest.raises(InputError, match="--overwrite"):
        check_output_path(image)
    assert check_output_path(image, overwrite=True) == image
    assert check_output_path(tmp_path / "new" / "mask.nii.gz") == tmp_path / "new" / "mask.nii.gz"
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output_path(image / "mask.nii.gz")
    with pytest.raises(InputError, match="is a folder"):
        check_output_path(tmp_path)
    assert image.read_text() == "scan"
    dangling = tmp_path / "linked_mask.nii.gz"
    dangling.symlink_to(tmp_path / "gone.nii.gz")  # found before the work, not as "created meanwhile" after it
    with pytest.raises(InputError, match="already exists"):
        check_output_path(dangling)


@pytest.mark.parametrize("hard_links", [True, False])
def test_without_replace_a_file_that_appeared_meanwhile_is_kept(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # FAT and some network shares: the fallback checks, then renames

        def no_links(source, target):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "mask.nii.gz"
    with atomic_destination(path, ".nii.gz", replace=False) as temporary:
        temporary.write_text("new")
    assert path.read_text() == "new"
    later = tmp_path / "later.nii.gz"
    with pytest.raises(InputError, match="was created by something else while this ran; it was kept"):
        with atomic_destination(later, ".nii.gz", replace=False) as temporary:
            temporary.write_text("new")
            later.write_text("the user's")
    assert later.read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["later.nii.gz", "mask.nii.gz"]
