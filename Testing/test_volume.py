"""Volume construction, validation, point conversion and atomic image writing."""

from __future__ import annotations

import gzip
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_path

from SAMMed3DLib import geometry, imageio
from SAMMed3DLib.errors import InputError
from SAMMed3DLib.volume import Volume, parse_point


def oblique_affine() -> np.ndarray:
    rotation = sitk.VersorTransform((0.3, -0.2, 0.5), 0.4).GetMatrix()
    affine = np.eye(4)
    affine[:3, :3] = np.array(rotation).reshape(3, 3) * [0.7, 1.1, 2.5]
    affine[:3, 3] = [-12.5, 40.25, 7.0]
    return affine


def test_from_array_keeps_voxels_geometry_and_pixel_type():
    array = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    affine = oblique_affine()
    volume = Volume.from_array(array, affine)
    np.testing.assert_array_equal(volume.array_kji, array)
    assert volume.array_kji.dtype == np.uint16
    assert volume.shape_kji == (4, 5, 6)
    assert volume.size_ijk == (6, 5, 4)
    np.testing.assert_allclose(volume.spacing, [0.7, 1.1, 2.5])
    np.testing.assert_allclose(volume.ijk_to_ras, affine, atol=1e-12)
    # The voxel at array[k, j, i] sits at IJK (i, j, k).
    np.testing.assert_allclose(volume.ras_to_ijk(volume.ijk_to_ras_points([5, 4, 3])), [[5, 4, 3]], atol=1e-9)


@pytest.mark.parametrize(
    "dtype, stored", [(">i2", np.int16), (">f8", np.float64), ("<f2", np.float32), (">f2", np.float32)]
)
def test_from_array_takes_big_endian_and_half_precision_voxels(dtype, stored):
    array = (np.arange(3 * 4 * 5) - 30).reshape(3, 4, 5).astype(dtype)
    volume = Volume.from_array(array, oblique_affine())
    assert volume.array_kji.dtype == stored
    np.testing.assert_array_equal(volume.array_kji, array.astype(stored))


@pytest.mark.parametrize(
    "array, message",
    [(np.zeros((0, 5, 5), np.int16), "has no voxels"), (np.full((2, 2, 2), "a", dtype=object), "holds object")],
)
def test_from_array_refuses_empty_or_non_numeric_arrays(array, message):
    with pytest.raises(InputError, match=message):
        Volume.from_array(array, np.eye(4))


def test_from_array_agrees_with_simpleitk_physical_points():
    volume = Volume.from_array(np.zeros((3, 4, 5), dtype=np.float32), oblique_affine())
    lps = volume.image.TransformContinuousIndexToPhysicalPoint((1.0, 2.0, 0.5))
    np.testing.assert_allclose(volume.ijk_to_ras_points([1.0, 2.0, 0.5]), geometry.lps_to_ras(lps), atol=1e-9)


def test_points_in_every_space_give_the_same_ras():
    volume = Volume.from_array(np.zeros((10, 10, 10), dtype=np.int16), oblique_affine())
    ijk = np.array([[2.0, 3.0, 4.0], [0.0, 9.0, 5.5]])
    ras = volume.ijk_to_ras_points(ijk)
    np.testing.assert_allclose(volume.points_to_ras(ijk, "ijk"), ras)
    np.testing.assert_allclose(volume.points_to_ras(ras, "ras"), ras)
    np.testing.assert_allclose(volume.points_to_ras(geometry.ras_to_lps(ras), "LPS"), ras)


def test_point_outside_names_the_point_and_the_extent():
    volume = Volume.from_array(np.zeros((10, 10, 10), dtype=np.int16), np.diag([1.0, 1.0, 1.0, 1.0]))
    volume.points_to_ras([9.5, -0.5, 0.0], "ijk")  # outer voxel faces are inside
    with pytest.raises(InputError, match=r"Point \(0, 0, 10\.2\) IJK lies outside .* spans RAS mm R -0\.5\.\.9\.5"):
        volume.points_to_ras([[1, 1, 1], [0, 0, 10.2]], "ijk")
    with pytest.raises(InputError, match="unknown"):
        volume.points_to_ras([1, 1, 1], "voxel")
    with pytest.raises(InputError, match="inside the volume.$"):  # inside in no other space either: no hint
        volume.points_to_ras([[1, 1, 1], [0, 0, 10.2]], "ijk")


def test_a_point_outside_that_fits_in_another_space_says_so():
    """Voxel indices typed without --space ijk are read as millimetres: the usual reason a click is outside."""
    affine = np.diag([0.7, 0.7, 5.0, 1.0])
    affine[:3, 3] = (0.0, 0.0, -300.0)  # R and A 0..357.7 mm, S -300..-5 mm
    volume = Volume.from_array(np.zeros((60, 512, 512), dtype=np.int16), affine)
    hint = "Read as IJK it lies inside: if that is what it is, give the point space (--space ijk on the command line"
    with pytest.raises(InputError, match=re.escape(hint)):
        volume.points_to_ras([256, 300, 40], "ras")
    with pytest.raises(InputError, match=re.escape("Read as LPS it lies inside")):
        volume.points_to_ras([-100.0, -100.0, -100.0], "ras")  # inside as LPS, RAS (100, 100, -100), only


@pytest.mark.parametrize(
    "text, expected",
    [("1,2,3", (1.0, 2.0, 3.0)), (" -12.5 , 3e1,0.25 ", (-12.5, 30.0, 0.25)), ("[1.5; -2; .5]", (1.5, -2.0, 0.5))],
)
def test_parse_point(text, expected):
    assert parse_point(text) == expected


@pytest.mark.parametrize("text", ["1,2", "a,b,c", "1,2,3,4", "", "1,,2"])
def test_parse_point_rejects_other_text(text):
    with pytest.raises(InputError, match="three numbers"):
        parse_point(text)


@pytest.mark.parametrize(
    "image, problem",
    [
        (sitk.Image([4, 4], sitk.sitkInt16), "2D image"),
        (sitk.Image([4, 4, 4, 2], sitk.sitkInt16), "4D, 2 volumes .* extract the 3D volume"),
        (sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3), "RGB or vector"),
        (sitk.GetImageFromArray(np.array([[[0.0, np.nan]]], dtype=np.float32)), "NaN or infinite"),
        (sitk.Image([2, 2, 2], sitk.sitkComplexFloat32), "complex"),
    ],
)
def test_unusable_images_are_rejected_in_one_sentence(image, problem):
    with pytest.raises(InputError, match=problem):
        Volume.from_sitk(image)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_a_4d_file_of_one_time_point_is_read_as_its_volume(tmp_path, suffix):
    voxels = np.arange(1, 1 + 3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    frame = sitk.GetImageFromArray(voxels)
    frame.SetSpacing((0.7, 0.8, 2.5))
    frame.SetOrigin((10.0, -20.0, 30.0))
    image = sitk.JoinSeries([frame])  # 4-D, one time point
    assert image.GetSize() == (5, 4, 3, 1)
    sitk.WriteImage(image, str(tmp_path / f"one_frame{suffix}"))
    volume = Volume.from_file(tmp_path / f"one_frame{suffix}")
    np.testing.assert_array_equal(volume.array_kji, voxels)
    np.testing.assert_allclose(volume.spacing, (0.7, 0.8, 2.5))
    np.testing.assert_allclose(volume.image.GetOrigin(), (10.0, -20.0, 30.0))


def _with_direction(direction: tuple) -> sitk.Image:
    image = sitk.Image([4, 4, 4], sitk.sitkInt16)
    image.SetDirection(direction)
    return image


@pytest.mark.parametrize("direction", [(1, 0, 0, 0.5, 1, 0, 0, 0, 1), (2, 0, 0, 0, 2, 0, 0, 0, 2)])
def test_a_sheared_or_scaled_direction_matrix_is_refused(direction):
    with pytest.raises(InputError, match="not at right angles with unit length"):
        Volume.from_sitk(_with_direction(direction))
    sheared = np.diag([1.0, 1.0, 3.0, 1.0])
    sheared[1, 2] = 1.5  # the third voxel axis leans along the second
    with pytest.raises(InputError, match="sheared or scaled grid"):
        Volume.from_array(np.zeros((4, 4, 4), dtype=np.int16), sheared)


def test_header_rounding_of_an_oblique_direction_is_accepted():
    rotation = np.array(sitk.VersorTransform((0.3, -0.2, 0.5), 0.4).GetMatrix())
    assert Volume.from_sitk(_with_direction(tuple(np.round(rotation, 5)))).shape_kji == (4, 4, 4)


def test_single_slice_volume_is_allowed():
    volume = Volume.from_array(np.ones((1, 8, 9), dtype=np.int16), np.diag([0.8, 0.8, 5.0, 1.0]))
    assert volume.shape_kji == (1, 8, 9)
    assert volume.points_to_ras([4, 4, 0], "ijk").shape == (1, 3)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Volume.from_file(tmp_path / "absent.nii.gz")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="Could not read image"):
        Volume.from_file(garbage)
    with pytest.raises(InputError, match="no DICOM series"):
        Volume.from_file(tmp_path)


def test_an_unreadable_header_is_refused_with_itks_reason(tmp_path):
    path = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkInt16), str(path))
    path.write_bytes(path.read_bytes().replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 3 0 3"))
    with pytest.raises(InputError, match=r"\(Zero-valued spacing is not supported.*valid header"):
        Volume.from_file(path)


def test_a_cut_off_uncompressed_nifti_is_refused_not_read_as_zeros(tmp_path):
    image = sitk.GetImageFromArray(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8))
    whole = tmp_path / "whole.nii"
    sitk.WriteImage(image, str(whole))
    np.testing.assert_array_equal(Volume.from_file(whole).array_kji, sitk.GetArrayFromImage(image))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(InputError, match="is cut off"):
        Volume.from_file(cut)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("version", [1, 2])
def test_the_voxel_bytes_a_nifti_header_needs(tmp_path, order, version):
    """NIfTI-1 and NIfTI-2 headers, either byte order: 5 x 6 x 7 int16 voxels after a 352- or 544-byte offset."""
    size = 348 if version == 1 else 540
    header = bytearray(size)
    struct.pack_into(order + "i", header, 0, size)
    if version == 1:
        struct.pack_into(order + "8h", header, 40, 3, 5, 6, 7, 1, 1, 1, 1)
        struct.pack_into(order + "h", header, 72, 16)
        struct.pack_into(order + "f", header, 108, 352.0)
    else:
        struct.pack_into(order + "h", header, 14, 16)
        struct.pack_into(order + "8q", header, 16, 3, 5, 6, 7, 1, 1, 1, 1)
        struct.pack_into(order + "q", header, 168, 544)
    path = tmp_path / "short.nii"
    path.write_bytes(bytes(header) + bytes(100))
    with pytest.raises(InputError, match=f"its header needs {size + 4 + 5 * 6 * 7 * 2}"):
        Volume.from_file(path)


def test_a_short_nifti_compressed_whole_or_a_short_img_of_a_pair_is_refused_not_read_as_zeros(tmp_path):
    array = np.arange(1, 1 + 20 * 30 * 40, dtype=np.int16).reshape(20, 30, 40)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "whole.nii"))
    whole = (tmp_path / "whole.nii").read_bytes()
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(whole[: len(whole) // 2]))  # a whole gzip stream of half a file
    assert np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(short))) == 0) > 0  # ITK alone reads it
    with pytest.raises(InputError, match=f"short.nii.gz is cut off .*once decompressed, its header needs {len(whole)}"):
        Volume.from_file(short)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "pair.hdr"))
    np.testing.assert_array_equal(Volume.from_file(tmp_path / "pair.hdr").array_kji, array)
    data = (tmp_path / "pair.img").read_bytes()
    (tmp_path / "pair.img").write_bytes(data[:-100])
    with pytest.raises(InputError, match="pair.img is cut off"):
        Volume.from_file(tmp_path / "pair.hdr")


def test_a_cut_off_or_damaged_gzip_image_is_refused_not_read_as_zeros(tmp_path):
    whole = tmp_path / "whole.nii.gz"
    array = np.random.default_rng(0).integers(0, 1000, size=(40, 50, 60)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(whole))
    np.testing.assert_array_equal(Volume.from_file(whole).array_kji, array)
    data = whole.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(cut))).shape == array.shape  # ITK alone reads it
    with pytest.raises(InputError, match="is cut off"):
        Volume.from_file(cut)
    damaged = tmp_path / "damaged.nii.gz"
    damaged.write_bytes(data[:20] + bytes(200) + data[220:])
    with pytest.raises(InputError, match="is damaged"):
        Volume.from_file(damaged)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_and_read_back_keeps_voxels_type_and_geometry(tmp_path, dtype, suffix):
    array = (np.arange(3 * 4 * 5) % 200).astype(dtype).reshape(3, 4, 5)
    affine = np.diag([-0.75, -0.75, 2.5, 1.0])
    affine[:3, 3] = [120.5, -30.25, 60.0]
    path = imageio.write_image_atomic(Volume.from_array(array, affine).image, tmp_path / f"out{suffix}")
    back = Volume.from_file(path)
    np.testing.assert_array_equal(back.array_kji, array)
    assert back.array_kji.dtype == dtype
    np.testing.assert_allclose(back.ijk_to_ras, affine, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]


def test_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    image = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"previous content")

    def failing_write(image, path, *args):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(InputError, match="Could not write .*disk full"):
        imageio.write_image_atomic(image, target)
    assert target.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


WRITE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, sys
import numpy as np, SimpleITK as sitk
from SAMMed3DLib import imageio
from SAMMed3DLib.errors import InputError
noise = np.random.RandomState(0).randint(0, 2, (60, 200, 200)).astype(np.uint8)  # compresses poorly
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ
try:
    imageio.write_image_atomic(sitk.GetImageFromArray(noise), sys.argv[1])
except InputError as error:
    print(error)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="sets a file-size limit (RLIMIT_FSIZE), as a full disk would")
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_a_write_cut_short_that_itk_does_not_report_replaces_nothing(tmp_path, suffix):
    target = tmp_path / f"mask{suffix}"
    target.write_bytes(b"the user's previous mask")
    run = subprocess.run(
        [sys.executable, "-c", WRITE_UNDER_A_FILE_SIZE_LIMIT, str(target)], capture_output=True, text=True
    )
    assert f"Could not write {target}" in run.stdout, run.stdout + run.stderr
    assert target.read_bytes() == b"the user's previous mask"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_file_the_writer_cut_short_silently_replaces_nothing(tmp_path, monkeypatch):
    """What ITK's NIfTI writer does on a full disk: it writes part of the file and returns normally."""
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"the user's previous mask")
    write = sitk.WriteImage

    def short_write(image, path, *args):
        write(image, path, *args)
        Path(path).write_bytes(Path(path).read_bytes()[:-10])

    monkeypatch.setattr(sitk, "WriteImage", short_write)
    image = sitk.GetImageFromArray(np.arange(1000, dtype=np.uint8).reshape(10, 10, 10))
    with pytest.raises(InputError, match="Could not write .* whole .*Nothing was replaced"):
        imageio.write_image_atomic(image, target)
    assert target.read_bytes() == b"the user's previous mask"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]


def test_two_file_formats_and_missing_extensions_are_refused(tmp_path):
    image = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    with pytest.raises(InputError, match="atomically"):
        imageio.write_image_atomic(image, tmp_path / "mask.mhd")
    with pytest.raises(InputError, match="no file extension"):
        imageio.write_image_atomic(image, tmp_path / "mask")


@pytest.mark.parametrize("name", ["mask.png", "mask.tif", "mask.txt"])
def test_a_volume_output_in_a_slice_or_unknown_format_is_refused_before_any_work(tmp_path, name):
    with pytest.raises(InputError, match="not a volume format.*nii.gz"):
        imageio.check_image_output(tmp_path / name)
    for good in ("mask.nii.gz", "mask.seg.nrrd", "mask.mha"):
        assert imageio.check_image_output(tmp_path / good) == tmp_path / good


@pytest.mark.parametrize("name, lower", [("mask.MHA", ".mha"), ("mask.Nii.gz", ".nii.gz"), ("mask.NRRD", ".nrrd")])
def test_an_output_extension_not_in_lower_case_is_refused_before_any_work(tmp_path, name, lower):
    with pytest.raises(InputError, match=rf"write it in lower case \({re.escape(lower)}\)"):
        imageio.check_image_output(tmp_path / name)


def test_image_suffix():
    assert imageio.image_suffix("a/b.nii.gz") == ".nii.gz"
    assert imageio.image_suffix("b.seg.nrrd") == ".seg.nrrd"
    assert imageio.image_suffix("x.y.mha") == ".mha"
    assert imageio.image_suffix("1.2.840.113619.2.55.5") == "" and imageio.image_stem("scan.001") == "scan.001"


@pytest.mark.parametrize("case", ["ct_abdomen_pelvis_totalseg_3mm", "ct_upper_abdomen_dicom_totalseg"])
def test_real_label_written_as_mask_keeps_ras_positions(tmp_path, case):
    folder = shared_path(f"data/{case}")
    meta = json.loads((folder / "meta.json").read_text())
    image = Volume.from_file(folder / "image.nii.gz")
    label = Volume.from_file(folder / "label.nii.gz")
    assert image.size_ijk == tuple(meta["size_xyz"])
    np.testing.assert_allclose(image.spacing, meta["spacing_mm"], atol=1e-4)
    np.testing.assert_allclose(image.image.GetDirection(), meta["direction"])
    liver = label.array_kji == 5
    mask = Volume.from_array(liver.astype(np.uint8), image.ijk_to_ras)
    path = imageio.write_image_atomic(mask.image, tmp_path / "liver.nii.gz")
    back = Volume.from_file(path)
    np.testing.assert_array_equal(back.array_kji, liver)
    # Voxel centres of the liver, as RAS through the image, land on liver voxels of the written mask.
    kji = np.argwhere(liver)[:: max(1, int(liver.sum()) // 500)]
    ras = image.ijk_to_ras_points(kji[:, ::-1].astype(float))
    ijk = geometry.round_half_up(back.ras_to_ijk(ras))
    np.testing.assert_array_equal(ijk, kji[:, ::-1])
    assert back.array_kji[ijk[:, 2], ijk[:, 1], ijk[:, 0]].all()


def test_same_grid_means_no_voxel_moves_a_tenth_of_a_voxel_over_the_whole_grid():
    image = Volume.from_array(np.zeros((300, 40, 512), dtype=np.int16), np.diag([1.0, 1.0, 1.0, 1.0]))

    def label(ijk_to_ras: np.ndarray) -> Volume:
        return Volume.from_array(np.zeros((300, 40, 512), dtype=np.uint8), ijk_to_ras, name="label")

    rounded_origin = np.diag([1.0, 1.0, 1.0, 1.0])
    rounded_origin[:3, 3] = [0.004, -0.004, 0.004]  # origins written with two decimals
    image.check_same_grid(label(rounded_origin))
    stretched = np.diag([1.0009, 1.0, 1.0, 1.0])  # voxel 511 lies 0.46 voxel away
    with pytest.raises(InputError, match="must share one voxel grid"):
        image.check_same_grid(label(stretched))
