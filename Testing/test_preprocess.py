"""The official preprocessing: 1.5 mm grid rule, canonical grid, regions, label boxes, z-normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMMed3DLib import geometry
from SAMMed3DLib.errors import InputError
from SAMMed3DLib.preprocess import (
    ROI_SIZE,
    PreparedVolume,
    begin_for_label_bbox,
    crop_with_zero_padding,
    normalise_intensities,
    official_sitk_image,
    prepare,
    resample_to_target_spacing,
)
from SAMMed3DLib.volume import Volume


def affine_from(direction_lps_rows, spacing, origin_lps) -> np.ndarray:
    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    image.SetDirection(np.asarray(direction_lps_rows, dtype=float).flatten().tolist())
    image.SetSpacing(spacing)
    image.SetOrigin(origin_lps)
    return geometry.ijk_to_ras_from_sitk(image)


def smooth_volume(shape_kji, affine, dtype=np.int16) -> Volume:
    k, j, i = np.indices(shape_kji)
    values = 100 + 40 * np.sin(i / 3.0) + 30 * np.cos(j / 4.0) + 5 * k
    return Volume.from_array(values.astype(dtype), affine)


# 0.8 mm as a NIfTI header stores it (float32): 0.800000011920929.
SPACING_08 = float(np.float32(0.8))


def test_grid_rule_ceil_with_float_error_and_corner_alignment():
    # 180 x 0.800000011920929 / 1.5 = 96.0000014 -> 97 voxels; 60 x 2.5 / 1.5 = 100 exactly.
    affine = affine_from([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], (SPACING_08, SPACING_08, 2.5), (-40.0, 95.5, 120.25))
    prepared = PreparedVolume(smooth_volume((60, 180, 200), affine))
    assert prepared.resampled_shape == (107, 97, 100)
    # The outer corner of the first 1.5 mm voxel is the outer corner of the first original voxel.
    corner = geometry.apply_affine(prepared.resampled_affine, [-0.5, -0.5, -0.5])
    np.testing.assert_allclose(corner, geometry.apply_affine(affine, [-0.5, -0.5, -0.5]), atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(prepared.resampled_affine[:3, :3], axis=0), 1.5)


def test_canonical_grid_is_ras_ordered_and_keeps_world_positions():
    affine = affine_from([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], (SPACING_08, SPACING_08, 2.5), (-40.0, 95.5, 120.25))
    volume = smooth_volume((60, 180, 200), affine)
    prepared = PreparedVolume(volume)
    assert prepared.canonical_shape == (100, 107, 97)
    np.testing.assert_allclose(np.diag(prepared.canonical_affine)[:3], [1.5, 1.5, 1.5])
    resampled = resample_to_target_spacing(official_sitk_image(volume.image), sitk.sitkLinear)
    resampled_ijk = sitk.GetArrayFromImage(resampled).transpose()
    for voxel in ([0, 0, 0], [10, 20, 30], [99, 106, 96]):
        world = geometry.apply_affine(prepared.canonical_affine, voxel)
        same = geometry.round_half_up(geometry.ras_to_continuous_ijk(prepared.resampled_affine, world))[0]
        assert prepared.canonical[tuple(voxel)] == resampled_ijk[tuple(same)]


def test_integer_interpolation_truncates_toward_zero():
    # Along i (3 mm -> 1.5 mm) the samples sit a quarter voxel from the originals: 0.75 a + 0.25 b.
    values = np.array([[[1, 3, 1, 3]], [[-1, -3, -1, -3]]], dtype=np.int16)  # K=2, J=1, I=4
    prepared = PreparedVolume(Volume.from_array(values, np.diag([3.0, 1.5, 1.5, 1.0])))
    row_positive, row_negative = prepared.canonical[:, 0, 0], prepared.canonical[:, 0, 1]
    # 0.75*1 + 0.25*3 = 1.5 -> 1 and 0.75*-1 + 0.25*-3 = -1.5 -> -1 (floor would give -2).
    assert row_positive[1] == 1 and row_negative[1] == -1
    assert prepared.canonical.dtype == np.int16


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
def test_pixel_type_is_kept(dtype):
    prepared = PreparedVolume(smooth_volume((6, 7, 8), np.diag([2.0, 2.0, 2.0, 1.0]), dtype))
    assert prepared.canonical.dtype == dtype
    assert prepared.region([0, 0, 0]).raw.dtype == dtype


def test_single_slice_volume_stays_one_slice_and_gives_a_region():
    volume = smooth_volume((1, 60, 70), np.diag([0.8, 0.8, 5.0, 1.0]))
    prepared = PreparedVolume(volume)
    assert prepared.canonical_shape == (38, 32, 1)
    click = volume.ijk_to_ras_points([35, 30, 0])[0]
    # The single 1.5 mm slice sits at the low face of the 5 mm slice; the click is clamped onto it.
    assert prepared.canonical_voxel_of_ras(click)[2] == 0
    region = prepared.region_centred_on(click)
    assert region.begin[2] == -64
    assert region.ras_to_region_index(click)[2] == 64
    assert np.count_nonzero(region.raw[:, :, 64]) > 0 and np.count_nonzero(region.raw[:, :, 65:]) == 0
    assert region.network_input().shape == (1, 1, ROI_SIZE, ROI_SIZE, ROI_SIZE)


def test_anisotropic_oblique_volume_keeps_its_obliqueness():
    rotation = np.array(sitk.VersorTransform((0.1, 0.2, 0.9), 0.3).GetMatrix()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = rotation * [0.6, 0.9, 4.0]
    affine[:3, 3] = [20.0, -30.0, 5.0]
    volume = smooth_volume((12, 60, 80), affine)
    prepared = PreparedVolume(volume)
    linear = prepared.canonical_affine[:3, :3]
    np.testing.assert_allclose(np.linalg.norm(linear, axis=0), 1.5)
    assert np.all(np.argmax(np.abs(linear), axis=0) == [0, 1, 2])
    assert not np.allclose(linear, np.diag(np.diag(linear)))
    # The canonical grid covers the original volume: its centre maps to a voxel inside.
    centre = volume.ijk_to_ras_points([39.5, 29.5, 5.5])[0]
    voxel = prepared.canonical_voxel_of_ras(centre)
    assert np.all((voxel >= 0) & (voxel < prepared.canonical_shape))


def test_region_is_a_zero_padded_slice_with_its_own_affine():
    prepared = PreparedVolume(smooth_volume((20, 40, 50), np.diag([1.5, 1.5, 1.5, 1.0])))
    canonical = prepared.canonical
    region = prepared.region([-10, 5, -3])
    assert region.raw.shape == (ROI_SIZE,) * 3
    np.testing.assert_array_equal(region.raw[10:60, 0:35, 3:23], canonical[0:50, 5:40, 0:20])
    assert np.count_nonzero(region.raw[:10]) == 0 and np.count_nonzero(region.raw[60:]) == 0
    np.testing.assert_allclose(region.affine[:3, 3], geometry.apply_affine(prepared.canonical_affine, [-10, 5, -3])[0])
    far = prepared.region([500, 0, 0])
    assert not far.raw.any()


def test_region_centred_on_a_click_and_its_indices():
    volume = smooth_volume((30, 40, 50), np.diag([-1.0, -1.0, 2.0, 1.0]))
    prepared = PreparedVolume(volume)
    click = volume.ijk_to_ras_points([20, 10, 12])[0]
    voxel = prepared.canonical_voxel_of_ras(click)
    region = prepared.region_centred_on(click)
    np.testing.assert_array_equal(region.begin, voxel - 64)
    np.testing.assert_array_equal(region.ras_to_region_index(click), [64, 64, 64])
    assert region.contains_index([64, 64, 64]) and not region.contains_index([64, 128, 0])
    np.testing.assert_allclose(region.ras_to_continuous_index(click)[0], [64, 64, 64], atol=0.5)
    np.testing.assert_allclose(region.size_mm, [192.0, 192.0, 192.0])
    np.testing.assert_allclose(region.axes, np.eye(3))
    np.testing.assert_allclose(region.center_ras, geometry.apply_affine(region.affine, [63.5] * 3)[0])
    assert prepared.canonical_voxel_of_ras(np.array([click, click])).shape == (2, 3)


def test_network_input_is_z_normalised_over_positive_voxels():
    raw = np.zeros((ROI_SIZE,) * 3, dtype=np.int16)
    raw[10:20, 10:20, 10:20] = np.arange(1000).reshape(10, 10, 10) % 37 + 1
    raw[30:40, 30:40, 30:40] = -500
    tensor = normalise_intensities(raw)
    assert tensor.shape == (1, 1, ROI_SIZE, ROI_SIZE, ROI_SIZE) and tensor.dtype == torch.float32
    values = torch.from_numpy(raw).float()
    selected = values[values > 0]
    expected = (values - selected.mean()) / selected.std()
    assert torch.equal(tensor[0, 0], expected)
    assert abs(float(tensor[0, 0][torch.from_numpy(raw) > 0].std()) - 1.0) < 1e-5


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_unsigned_voxels_normalise_like_their_values(dtype):
    raw = np.zeros((ROI_SIZE,) * 3, dtype=dtype)
    high = np.iinfo(dtype).max - 2  # uint64: above 2^63, where a cast to int64 turns values negative
    raw[10:20, 10:20, 10:20] = high
    raw[10:20, 10:20, 10:15] = high - high // 2
    tensor = normalise_intensities(raw)[0, 0]
    assert tensor[15, 15, 12] < 0 < tensor[15, 15, 17]
    assert float(tensor[raw > 0].mean()) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("fill", [0, -1000, 7])
def test_constant_or_empty_region_is_a_clear_error(fill):
    prepared = PreparedVolume(Volume.from_array(np.full((10, 10, 10), fill, np.int16), np.eye(4)))
    region = prepared.region([0, 0, 0])
    with pytest.raises(InputError, match="(no voxels above 0|constant intensity).*another point or image"):
        region.network_input()


@pytest.mark.parametrize(
    "box, shape, expected",
    [
        (((23, 63), (42, 71), (28, 81)), (100, 107, 97), [-21, -8, -10]),  # fixture P1, category 1
        (((10, 11), (0, 1), (5, 6)), (30, 30, 30), [-54, -64, -59]),  # one voxel v -> v - 64
        (((0, 200), (0, 3), (1, 3)), (200, 30, 30), [36, -63, -62]),
    ],
)
def test_begin_for_label_bbox(box, shape, expected):
    label = np.zeros(shape, dtype=np.uint8)
    label[tuple(slice(low, high) for low, high in box)] = 1
    np.testing.assert_array_equal(begin_for_label_bbox(label), expected)


def test_empty_label_centres_on_the_volume():
    # ceil((n - 128) / 2) for n >= 128, -ceil((128 - n) / 2) otherwise.
    np.testing.assert_array_equal(begin_for_label_bbox(np.zeros((131, 128, 97))), [2, 0, -16])
    np.testing.assert_array_equal(begin_for_label_bbox(np.zeros((130, 127, 100))), [1, -1, -14])


def test_crop_with_zero_padding_matches_a_padded_copy():
    rng = np.random.default_rng(3)
    array = rng.integers(1, 100, (7, 9, 11))
    padded = np.pad(array, 20)
    for begin in ([-5, -5, -5], [2, -20, 8], [-20, 0, 0], [6, 8, 10]):
        block = crop_with_zero_padding(array, begin, size=16)
        start = [b + 20 for b in begin]
        expected = padded[tuple(slice(low, low + 16) for low in start)]
        np.testing.assert_array_equal(block, expected)


def test_prepare_label_binarises_before_resampling_and_checks_the_grid():
    affine = np.diag([-0.9, 0.9, 2.0, 1.0])
    volume = smooth_volume((10, 40, 40), affine)
    labels = np.zeros((10, 40, 40), dtype=np.uint8)
    labels[2:8, 10:20, 10:20] = 3
    labels[2:8, 20:30, 20:30] = 7
    prepared = PreparedVolume(volume)
    canonical_label = prepared.prepare_label(Volume.from_array(labels, affine), 7)
    assert canonical_label.shape == prepared.canonical_shape
    assert set(np.unique(canonical_label)) == {0, 1}
    # Label 7's voxels only: the canonical label's centre lies in the 7 block.
    centre_ras = geometry.apply_affine(prepared.canonical_affine, np.argwhere(canonical_label).mean(axis=0))
    ijk = volume.ras_to_ijk(centre_ras)[0]
    assert 20 <= ijk[0] < 30 and 20 <= ijk[1] < 30
    with pytest.raises(InputError, match="voxels but image has"):
        prepared.prepare_label(Volume.from_array(labels[:, :, :30], affine), 7)
    with pytest.raises(InputError, match="different origins, spacings or directions"):
        prepared.prepare_label(Volume.from_array(labels, np.diag([-0.9, 0.9, 2.5, 1.0])).image, 7)


def test_prepare_is_cached_per_volume():
    volume = smooth_volume((5, 6, 7), np.eye(4))
    assert prepare(volume) is prepare(volume)
    assert prepare(volume) is not prepare(smooth_volume((5, 6, 7), np.eye(4)))


def test_a_spacing_far_beyond_any_body_is_refused_before_resampling():
    image = sitk.Image([10, 10, 10], sitk.sitkInt16)
    image.SetSpacing((1000.0, 1000.0, 1000.0))  # a header in micrometres read as millimetres, say
    with pytest.raises(InputError, match=r"spans 10000 x 10000 x 10000 mm .* check the spacing"):
        resample_to_target_spacing(image, sitk.sitkLinear)
    rod = sitk.Image([70000, 1, 1], sitk.sitkInt16)  # few voxels, but more than 16 bits of them along one axis
    rod.SetSpacing((1.5, 1.5, 1.5))
    with pytest.raises(InputError, match=r"spans 105000 x 2 x 2 mm"):
        resample_to_target_spacing(rod, sitk.sitkLinear)


def test_a_spacing_in_metres_is_refused_before_resampling():
    image = sitk.Image([200, 200, 100], sitk.sitkInt16)
    image.SetSpacing((0.0008, 0.0008, 0.003))  # a header in metres read as millimetres
    with pytest.raises(InputError, match=r"spans only 0.16 x 0.16 x 0.3 mm .*metres instead of millimetres"):
        resample_to_target_spacing(image, sitk.sitkLinear)
    single_slice = sitk.Image([200, 200, 1], sitk.sitkInt16)
    single_slice.SetSpacing((0.8, 0.8, 5.0))
    assert resample_to_target_spacing(single_slice, sitk.sitkLinear).GetSize() == (107, 107, 1)


def slab_volume(slices: int, thickness: float) -> Volume:
    """A slab of `slices` slices `thickness` mm thick, 0.8 mm in plane: slice k holds (k + 1) x an in-plane step."""
    in_plane = np.where(np.arange(60) < 30, 100.0, 200.0).astype(np.float32) * np.ones((50, 1), np.float32)
    values = np.arange(1, slices + 1, dtype=np.float32)[:, None, None] * in_plane
    return Volume.from_array(values, np.diag([0.8, 0.8, thickness, 1.0]))


@pytest.mark.parametrize("slices, thickness", [(1, 0.5), (2, 0.3), (1, 0.75)])
def test_a_slab_at_most_half_a_voxel_thick_resamples_onto_its_centre(slices, thickness):
    # The official grid puts the one 1.5 mm voxel's centre 0.75 mm from the low face: outside the slab.
    volume = slab_volume(slices, thickness)
    prepared = PreparedVolume(volume)
    assert prepared.canonical_shape[2] == 1
    centre = geometry.apply_affine(volume.ijk_to_ras, [0, 0, (slices - 1) / 2])[0]
    assert geometry.apply_affine(prepared.canonical_affine, [0, 0, 0])[0][2] == pytest.approx(centre[2])
    # Linear interpolation at the slab's centre: the mean of its slices, resampled in plane as one slice is.
    one_slice = PreparedVolume(slab_volume(1, 1.5)).canonical
    np.testing.assert_allclose(prepared.canonical, np.mean(np.arange(1, slices + 1)) * one_slice, rtol=1e-6)
    click = volume.ijk_to_ras_points([30, 25, 0])[0]
    assert prepared.region_centred_on(click).network_input().shape == (1, 1, ROI_SIZE, ROI_SIZE, ROI_SIZE)
    label = Volume.from_array(np.ones(volume.shape_kji, np.uint8), volume.ijk_to_ras)
    assert prepared.prepare_label(label, 1).all()  # the label lands on the same, centred grid


@pytest.mark.parametrize("slices, thickness", [(1, 0.8), (1, 5.0), (2, 0.4)])
def test_a_slab_thicker_than_half_a_voxel_keeps_the_official_grid(slices, thickness):
    volume = slab_volume(slices, thickness)
    prepared = PreparedVolume(volume)
    low_face = geometry.apply_affine(volume.ijk_to_ras, [0, 0, -0.5])[0][2]
    assert geometry.apply_affine(prepared.canonical_affine, [0, 0, 0])[0][2] == pytest.approx(low_face + 0.75)


def test_clicks_on_the_outer_faces_stay_on_the_canonical_grid():
    # Identity LPS direction: I and J are flipped in RAS, so the low I and J faces become upper canonical faces.
    # 90 x 1.2 = 108 mm, 80 x 1.0 = 80 mm, 40 x 3.0 = 120 mm: the faces are voxel faces of the 1.5 mm grid.
    volume = smooth_volume((40, 80, 90), np.diag([-1.2, -1.0, 3.0, 1.0]))
    prepared = PreparedVolume(volume)
    upper = np.array(prepared.canonical_shape) - 1
    for ijk, axis in [((-0.5, 40, 20), 0), ((45, -0.5, 20), 1), ((45, 40, 39.5), 2)]:
        click = volume.points_to_ras([ijk], "ijk")[0]  # accepted as inside
        voxel = prepared.canonical_voxel_of_ras(click)
        assert voxel[axis] == upper[axis]
        region = prepared.region_centred_on(click)
        assert region.raw[64, 64, 64] != 0  # the click sits on data, not on the zero padding past the grid
