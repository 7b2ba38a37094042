"""Reading DICOM series: slices stacked where their headers put them, or a clear refusal."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from SAMMed3DLib.errors import InputError
from SAMMed3DLib.volume import Volume

SPACING = (0.8, 0.9, 3.0)
# An oblique orientation: rows and columns of each slice, as DICOM's Image Orientation (Patient) gives them (LPS).
ROW, COLUMN = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(0.3), np.sin(0.3)])
NORMAL = np.cross(ROW, COLUMN)
ORIGIN = np.array([-20.0, 35.0, -110.0])


def write_series(
    folder: Path,
    slices: int = 8,
    depths: Optional[Sequence[float]] = None,
    sideways: float = 0.0,
    skip: Sequence[int] = (),
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
    row: np.ndarray = ROW,
    column: np.ndarray = COLUMN,
    first_number: int = 0,
    slopes: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """Write slices k (except `skip`) of a 12 x 10 x `slices` int16 volume, slice k at `depths[k]` mm along the
    normal (default k x 3 mm) and shifted `sideways` x k mm along the columns; returns the voxels (K, J, I)."""
    folder.mkdir(parents=True, exist_ok=True)
    voxels = (np.arange(slices * 10 * 12).reshape(slices, 10, 12) % 997).astype(np.int16) - 200
    depths = [k * SPACING[2] for k in range(slices)] if depths is None else depths
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(slices):
        if k in skip:
            continue
        image = sitk.GetImageFromArray(voxels[k])
        image.SetSpacing(SPACING[:2])
        position = ORIGIN + depths[k] * NORMAL + sideways * k * column
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.0",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{first_number + k + 1}",
            "0020|0013": str(first_number + k + 1),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*row, *column)),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0018|0050": str(SPACING[2]),
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        if slopes is not None:
            image.SetMetaData("0028|1053", "1")
            image.SetMetaData("0028|1052", "0")
        path = folder / f"slice{first_number + k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(image)
        if slopes is not None:
            _set_rescale_slope(path, slopes[k])
    return voxels


def _set_rescale_slope(path: Path, slope: int) -> None:
    """Write a slice's Rescale Slope (0028,1053) as a scanner does: GDCM's writer keeps 1 for integer voxels, so
    its two-byte value is replaced in the file (implicit VR little endian, as GDCM writes it)."""
    data = path.read_bytes()
    tag = b"\x28\x00\x53\x10\x02\x00\x00\x00"  # group, element, value length 2
    at = data.index(tag) + len(tag)
    path.write_bytes(data[:at] + f"{slope:<2d}".encode("ascii") + data[at + 2 :])


def test_a_series_is_stacked_where_its_headers_put_the_slices(tmp_path):
    voxels = write_series(tmp_path / "ct")
    volume = Volume.from_file(tmp_path / "ct")
    np.testing.assert_array_equal(volume.array_kji, voxels)
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-4)
    for k in (0, 7):
        lps = np.array(volume.image.TransformIndexToPhysicalPoint((0, 0, k)))
        np.testing.assert_allclose(lps, ORIGIN + k * SPACING[2] * NORMAL, atol=1e-3)


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"skip": (4,)}, "not evenly spaced"),
        ({"depths": [0, 3, 6, 9, 14, 19, 24, 29]}, "not evenly spaced"),
        ({"depths": [0, 3, 3, 6, 9, 12, 15, 18]}, "lie at the same place"),
        ({"sideways": 1.1}, "gantry tilt"),
    ],
)
def test_a_series_that_cannot_be_stacked_evenly_is_refused(tmp_path, options, problem):
    write_series(tmp_path / "ct", **options)
    with pytest.raises(InputError, match=problem):
        Volume.from_file(tmp_path / "ct")


def test_a_localizer_in_the_series_is_named(tmp_path):
    write_series(tmp_path / "ct")
    write_series(
        tmp_path / "ct", slices=1, row=np.array([0.0, 1.0, 0.0]), column=np.array([0.0, 0.0, 1.0]), first_number=50
    )
    with pytest.raises(InputError, match="slice050.dcm lies in another orientation"):
        Volume.from_file(tmp_path / "ct")


def test_slices_of_different_rescale_slopes_keep_their_values(tmp_path):
    """As in PET: ITK takes the voxel type from the first slice, so a later, larger slope would wrap around."""
    slopes = [1, 1, 2, 5, 30, 90, 1, 1]  # slice 5: up to 519 x 90, beyond int16
    stored = write_series(tmp_path / "pet", slopes=slopes)
    volume = Volume.from_file(tmp_path / "pet")
    expected = stored.astype(np.float64) * np.array(slopes)[:, None, None]
    np.testing.assert_array_equal(volume.array_kji, expected)


def test_a_lone_slice_is_as_thick_as_its_header_says_given_as_its_folder_or_its_file(tmp_path):
    write_series(tmp_path / "one", slices=1)
    for given in (tmp_path / "one", tmp_path / "one" / "slice000.dcm"):
        volume = Volume.from_file(given)
        assert volume.shape_kji == (1, 10, 12)
        np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-4)


def test_a_folder_whose_series_lies_deeper_names_the_sub_folder(tmp_path):
    write_series(tmp_path / "export" / "DICOM" / "S0001")
    with pytest.raises(InputError, match=r"holds no DICOM series; .*S0001 does: give that folder"):
        Volume.from_file(tmp_path / "export")


def test_a_folder_of_two_series_lists_them(tmp_path):
    write_series(tmp_path / "study", slices=3)
    write_series(tmp_path / "study", slices=2, series_uid="1.2.826.0.1.3680043.2.1125.2", first_number=10)
    with pytest.raises(InputError, match=r"holds 2 DICOM series \(.*: 3 files; .*: 2 files\); put one series"):
        Volume.from_file(tmp_path / "study")


def test_one_file_of_a_series_is_refused_naming_the_folder(tmp_path):
    write_series(tmp_path / "ct", slices=3)
    with pytest.raises(InputError, match=r"slice001.dcm is one slice of a 3-slice DICOM series; give its folder"):
        Volume.from_file(tmp_path / "ct" / "slice001.dcm")
    write_series(tmp_path / "one", slices=1)
    assert Volume.from_file(tmp_path / "one" / "slice000.dcm").shape_kji == (1, 10, 12)  # a series of one slice
