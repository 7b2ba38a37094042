"""Reading and writing user images, and points, where a file or a call is unusual: a cut-off NIfTI whatever its
name or pair, a header whose bitpix disagrees with its datatype, NaN voxels, paths that cannot be looked at,
fractional labels in a .seg.nrrd, one-component vector images and odd array types."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SAMMed3DLib import geometry, imageio
from SAMMed3DLib.batch import Case, plan_outputs
from SAMMed3DLib.errors import InputError
from SAMMed3DLib.volume import Volume

VOXELS = np.arange(1, 1 + 20 * 30 * 40, dtype=np.int16).reshape(20, 30, 40)  # no zero: zeros mark missing voxels
CUT = 5000  # bytes cut off the end of a file


def nifti_bytes(tmp_path: Path) -> bytes:
    sitk.WriteImage(sitk.GetImageFromArray(VOXELS), str(tmp_path / "whole.nii"))
    return (tmp_path / "whole.nii").read_bytes()


def test_an_uncompressed_nifti_named_nii_gz_is_checked_whole(tmp_path):
    data = nifti_bytes(tmp_path)
    named = tmp_path / "plain.nii.gz"  # ITK reads it: the name says gzip, the bytes do not
    named.write_bytes(data)
    np.testing.assert_array_equal(Volume.from_file(named).array_kji, VOXELS)
    named.write_bytes(data[:-CUT])
    with pytest.raises(InputError, match=r"plain.nii.gz is cut off \(\d+ bytes, its header needs"):
        Volume.from_file(named)


@pytest.mark.parametrize(
    "header, data, given",
    [
        ("pair.hdr", "pair.img", "pair.img"),  # the pair given by its data file
        ("PAIR.HDR", "PAIR.IMG", "PAIR.HDR"),  # upper case names, as old scanners write them
        ("PAIR.HDR", "PAIR.IMG", "PAIR.IMG"),
        ("pair.hdr", "pair.img.gz", "pair.hdr"),  # the data gzipped: a whole stream of too few bytes
        ("pair.hdr", "pair.img.gz", "pair.img.gz"),
    ],
)
def test_a_cut_off_img_of_a_pair_is_refused_whichever_name_is_given(tmp_path, header, data, given):
    sitk.WriteImage(sitk.GetImageFromArray(VOXELS), str(tmp_path / "made.hdr"))
    (tmp_path / header).write_bytes((tmp_path / "made.hdr").read_bytes())
    voxels = (tmp_path / "made.img").read_bytes()
    for made in ("made.hdr", "made.img"):
        (tmp_path / made).unlink()
    compress = gzip.compress if data.endswith(".gz") else bytes
    (tmp_path / data).write_bytes(compress(voxels))
    np.testing.assert_array_equal(Volume.from_file(tmp_path / given).array_kji, VOXELS)
    (tmp_path / data).write_bytes(compress(voxels[:-CUT]))
    with pytest.raises(InputError, match=f"{data} is cut off"):
        Volume.from_file(tmp_path / given)


def test_voxel_bytes_go_by_the_datatype_as_itk_reads_them_not_by_bitpix(tmp_path):
    """ITK sizes voxels by the datatype: a wrong bitpix must neither refuse a whole file nor pass a cut one."""
    data = nifti_bytes(tmp_path)
    for bitpix, cut in ((32, 0), (8, CUT)):
        edited = bytearray(data)
        struct.pack_into("<h", edited, 72, bitpix)  # int16 voxels (datatype 4) said to take 32 or 8 bits
        path = tmp_path / f"bitpix{bitpix}.nii"
        path.write_bytes(bytes(edited[: len(edited) - cut]))
        if cut:
            with pytest.raises(InputError, match="is cut off"):
                Volume.from_file(path)
        else:
            np.testing.assert_array_equal(Volume.from_file(path).array_kji, VOXELS)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_a_float_image_holding_nan_or_infinity_is_written(tmp_path, suffix):
    voxels = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    voxels[0, 1, 2], voxels[2, 3, 4] = np.nan, -np.inf
    path = imageio.write_image_atomic(sitk.GetImageFromArray(voxels), tmp_path / f"map{suffix}")
    finite = np.isfinite(voxels)  # ITK's NIfTI reader gives NaN and infinity back as 0; they are in the file
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[finite], voxels[finite])


@pytest.fixture
def locked(tmp_path, monkeypatch) -> Path:
    """A folder this user may not enter: looking at a path inside raises PermissionError, as Path.exists and
    Path.is_dir do before Python 3.13 (root may enter any folder, so the refusal is simulated)."""
    folder = tmp_path / "locked"
    for method in ("exists", "is_dir"):
        original = getattr(Path, method)

        def refusing(path, *args, original=original, **kwargs):
            if folder in Path(path).parents:
                raise PermissionError(13, "Permission denied", str(path))
            return original(path, *args, **kwargs)

        monkeypatch.setattr(Path, method, refusing)
    return folder


def test_a_path_that_cannot_be_looked_at_is_an_input_error(locked):
    with pytest.raises(InputError, match="Cannot look at .*Permission denied.*permissions"):
        imageio.check_image_exists(locked / "ct.nii.gz")
    with pytest.raises(InputError, match="Cannot write .*Permission denied.*permissions"):
        imageio.check_image_output(locked / "mask.nii.gz")
    assert imageio.image_stem(locked / "ct.nii.gz") == "ct"


def test_a_batch_case_whose_paths_cannot_be_looked_at_fails_alone(tmp_path, locked):
    """README: a missing image fails that case alone; so does one in a folder this user may not enter."""
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkInt16), str(tmp_path / "good.nii.gz"))
    click = [((0.0, 0.0, 0.0), True)]
    cases = [
        Case(tmp_path / "good.nii.gz", click),
        Case(locked / "ct.nii.gz", click),
        Case(tmp_path / "good.nii.gz", click, out=locked / "mask.nii.gz"),
    ]
    planned = plan_outputs(cases, tmp_path / "masks")
    assert [case.problem is None for case in planned] == [True, False, False]


def test_a_seg_nrrd_refuses_fractional_labels_rather_than_filing_them_as_background():
    mask = np.zeros((2, 3, 4), np.float32)
    mask[0, 0, :2] = 0.5
    mask[1] = 2.0
    with pytest.raises(InputError, match="fractions such as 0.5"):
        imageio.slicer_segmentation_fields(mask, "liver")
    whole = imageio.slicer_segmentation_fields(np.where(mask == 0.5, 1.0, mask), "liver")
    assert [whole[f"Segment{n}_LabelValue"] for n in range(2)] == ["1", "2"]


def test_nan_voxels_of_a_one_component_vector_image_are_refused():
    voxels = np.zeros((4, 5, 6, 1), np.float32)
    voxels[1, 2, 3] = np.nan
    image = sitk.GetImageFromArray(voxels, isVector=True)
    assert image.GetNumberOfComponentsPerPixel() == 1
    with pytest.raises(InputError, match="NaN or infinite"):
        Volume.from_sitk(image)


def test_from_array_takes_extended_precision_and_refuses_complex_in_one_sentence():
    voxels = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4)
    volume = Volume.from_array(voxels.astype(np.longdouble), np.eye(4))
    assert volume.dtype == np.float64
    np.testing.assert_array_equal(volume.array_kji, voxels)
    for dtype in (np.complex64, ">c16"):
        with pytest.raises(InputError, match="complex"):
            Volume.from_array(voxels.astype(dtype), np.eye(4))


@pytest.mark.parametrize("points", [[[1, 2, 3], [1, 2]], [["a", 2, 3]], "1,2,3"])
def test_points_that_are_not_triples_of_numbers_are_an_input_error(points):
    with pytest.raises(InputError, match="three numbers each"):
        geometry.as_points(points)


def test_a_gzipped_nifti_named_nii_is_named_with_the_fix(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(VOXELS), str(tmp_path / "scan.nii.gz"))
    (tmp_path / "scan.nii.gz").rename(tmp_path / "scan.nii")
    with pytest.raises(InputError, match=r"gzip-compressed but its name does not end in \.gz; rename it \(e\.g\. scan"):
        Volume.from_file(tmp_path / "scan.nii")
