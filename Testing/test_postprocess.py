"""Region mask -> original grid: equal, voxel for voxel, to SimpleITK resampling onto the whole grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from SAMMed3DLib import geometry
from SAMMed3DLib.errors import InputError
from SAMMed3DLib.postprocess import paste_into, paste_region_mask
from SAMMed3DLib.preprocess import ROI_SIZE, PreparedVolume
from SAMMed3DLib.volume import Volume


def official_paste_back(region_mask: np.ndarray, region, volume: Volume) -> np.ndarray:
    """What the official code does (spec 5.7): SimpleITK nearest neighbour onto the WHOLE original grid."""
    roi = sitk.GetImageFromArray(region_mask.transpose().astype(np.float32))
    geometry.set_sitk_geometry(roi, region.affine)
    spacing, origin, direction = geometry.sitk_geometry_from_ijk_to_ras(volume.ijk_to_ras)
    resampler = sitk.ResampleImageFilter()
    resampler.SetInterpolator(sitk.sitkNearestNeighbor)
    resampler.SetSize(volume.size_ijk)
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputDirection(direction)
    resampler.SetDefaultPixelValue(0)
    return sitk.GetArrayFromImage(resampler.Execute(roi)).astype(np.uint8)


def naive_paste_back(region_mask: np.ndarray, region, volume: Volume) -> np.ndarray:
    """floor(u + 0.5) on inv(A_roi) @ A_orig: right except at half-voxel ties."""
    k, j, i = np.indices(volume.shape_kji)
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    u = geometry.apply_affine(np.linalg.inv(region.affine) @ volume.ijk_to_ras, ijk)
    inside = np.all((u >= -0.5) & (u < ROI_SIZE - 0.5), axis=1)
    index = geometry.round_half_up(u[inside])
    result = np.zeros(len(u), dtype=np.uint8)
    result[inside] = region_mask[index[:, 0], index[:, 1], index[:, 2]]
    return result.reshape(volume.shape_kji)


def pasted_on_full_grid(region_mask: np.ndarray, region, volume: Volume) -> np.ndarray:
    patch, box = paste_region_mask(region_mask, region, volume)
    full = np.zeros(volume.shape_kji, dtype=np.uint8)
    full[box] = patch
    return full


def checkerboard() -> np.ndarray:
    return (np.indices((ROI_SIZE,) * 3).sum(axis=0) % 2).astype(np.uint8)


def test_half_voxel_ties_are_resolved_like_itk():
    # A 1 mm grid: every third original voxel centre lies exactly half-way between two 1.5 mm voxels.
    volume = Volume.from_array(np.ones((24, 40, 40), dtype=np.int16), np.eye(4))
    region = PreparedVolume(volume).region([5, -60, 3])
    mask = checkerboard()
    official = official_paste_back(mask, region, volume)
    assert np.count_nonzero(naive_paste_back(mask, region, volume) != official) > 1000
    np.testing.assert_array_equal(pasted_on_full_grid(mask, region, volume), official)


@st.composite
def geometries(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        direction = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
    else:
        direction, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    tie_prone = draw(st.booleans())
    spacing = rng.choice([0.5, 0.75, 1.0, 1.25, 2.0, 3.0, 5.0], 3) if tie_prone else rng.uniform(0.4, 5.0, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    origins = [0.0, 0.5, -0.25, 12.3, 177.95632934570312]
    affine[:3, 3] = rng.choice(origins, 3) if tie_prone else rng.uniform(-200, 200, 3)
    shape = tuple(int(n) for n in rng.integers(8, 48, 3))
    return affine, shape, seed


@settings(max_examples=25, deadline=None)
@given(geometries())
def test_paste_back_equals_simpleitk_on_the_whole_grid(case):
    affine, shape, seed = case
    rng = np.random.default_rng(seed)
    volume = Volume.from_array(rng.integers(-50, 50, shape).astype(np.int16), affine)
    prepared = PreparedVolume(volume)
    # Regions that cut through the volume, so their edges fall among original voxels.
    begin = np.array(prepared.canonical_shape) // 2 - rng.integers(0, ROI_SIZE, 3)
    region = prepared.region(begin)
    mask = (rng.random((ROI_SIZE,) * 3) > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(pasted_on_full_grid(mask, region, volume), official_paste_back(mask, region, volume))


def test_footprint_box_is_the_bounding_box_of_voxels_inside_the_region():
    affine = np.diag([-0.7, -0.7, 2.5, 1.0])
    volume = Volume.from_array(np.ones((80, 300, 300), dtype=np.int16), affine)
    region = PreparedVolume(volume).region([40, 10, -20])
    patch, box = paste_region_mask(np.ones((ROI_SIZE,) * 3, dtype=np.uint8), region, volume)
    inside = official_paste_back(np.ones((ROI_SIZE,) * 3, dtype=np.uint8), region, volume)
    expected = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in np.nonzero(inside))
    assert box == expected
    np.testing.assert_array_equal(patch, inside[box])
    assert patch.shape == tuple(s.stop - s.start for s in box)


def test_region_outside_the_volume_gives_an_empty_patch():
    volume = Volume.from_array(np.ones((10, 10, 10), dtype=np.int16), np.eye(4))
    region = PreparedVolume(volume).region([400, 0, 0])
    patch, box = paste_region_mask(np.ones((ROI_SIZE,) * 3, dtype=np.uint8), region, volume)
    assert patch.size == 0
    assert np.zeros((10, 10, 10))[box].size == 0


def test_wrong_mask_shape_is_rejected():
    volume = Volume.from_array(np.ones((10, 10, 10), dtype=np.int16), np.eye(4))
    region = PreparedVolume(volume).region([0, 0, 0])
    with pytest.raises(InputError, match="128"):
        paste_region_mask(np.ones((64, 64, 64), dtype=np.uint8), region, volume)


def test_paste_into_overwrites_in_order():
    full = np.zeros((4, 4, 4), dtype=np.uint8)
    box = (slice(0, 2), slice(0, 4), slice(1, 3))
    paste_into(full, np.ones((2, 4, 2), dtype=np.uint8), box, value=1)
    paste_into(full, np.pad(np.ones((1, 4, 2), dtype=np.uint8), ((1, 0), (0, 0), (0, 0))), box, value=2)
    assert np.count_nonzero(full == 1) == 8 and np.count_nonzero(full == 2) == 8
    assert full[1, 0, 1] == 2 and full[0, 0, 1] == 1 and full[0, 0, 0] == 0


@pytest.mark.parametrize("thickness", [5.0, 10.0])
def test_a_thick_single_slice_reads_the_region_plane_that_holds_its_data(thickness):
    rng = np.random.default_rng(4)
    volume = Volume.from_array(rng.integers(1, 100, (1, 50, 60)).astype(np.int16), np.diag([0.8, 0.8, thickness, 1]))
    prepared = PreparedVolume(volume)
    region = prepared.region_centred_on(volume.ijk_to_ras_points([30, 25, 0])[0])
    data_plane = 64  # the one canonical voxel along K, where the image is and where clicks go
    assert region.raw[:, :, data_plane].any() and not np.delete(region.raw, data_plane, axis=2).any()
    drawn = np.zeros((ROI_SIZE,) * 3, dtype=np.uint8)
    drawn[:, :, data_plane] = rng.random((ROI_SIZE, ROI_SIZE)) > 0.5
    # Nearest neighbour (the official paste-back) puts the slice's centre on a plane of zero padding.
    slice_centre = region.ras_to_continuous_index(volume.ijk_to_ras_points([0, 0, 0]))[0]
    nearest_plane = int(geometry.round_half_up(slice_centre[2]))
    assert nearest_plane > data_plane and not official_paste_back(drawn, region, volume).any()
    moved_to_nearest_plane = np.roll(drawn, nearest_plane - data_plane, axis=2)
    expected = official_paste_back(moved_to_nearest_plane, region, volume)
    assert expected.any()
    np.testing.assert_array_equal(pasted_on_full_grid(drawn, region, volume), expected)
    # A region whose planes miss the slice's one canonical voxel has nothing to paste.
    patch, _ = paste_region_mask(np.ones((ROI_SIZE,) * 3, dtype=np.uint8), prepared.region([-34, -39, 2]), volume)
    assert patch.size == 0
