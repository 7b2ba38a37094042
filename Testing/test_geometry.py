"""Coordinate conversions against SimpleITK's own index/point maps, and the canonical reorientation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from SAMMed3DLib import geometry
from SAMMed3DLib.errors import InputError


@st.composite
def grids(draw, axis_aligned: bool | None = None):
    """A SimpleITK image with a random orthonormal (possibly flipped, possibly oblique) direction."""
    aligned = draw(st.booleans()) if axis_aligned is None else axis_aligned
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if aligned:
        direction = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
    else:
        direction, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    spacing = draw(st.lists(st.floats(0.2, 6.0), min_size=3, max_size=3))
    origin = draw(st.lists(st.floats(-500.0, 500.0), min_size=3, max_size=3))
    size = draw(st.lists(st.integers(1, 40), min_size=3, max_size=3))
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetDirection(direction.flatten().tolist())
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


continuous_indices = st.lists(st.floats(-5.0, 60.0), min_size=3, max_size=3)


@settings(max_examples=60, deadline=None)
@given(image=grids(), index=continuous_indices)
def test_ijk_to_ras_agrees_with_simpleitk(image, index):
    lps = image.TransformContinuousIndexToPhysicalPoint(index)
    ras = geometry.apply_affine(geometry.ijk_to_ras_from_sitk(image), index)[0]
    np.testing.assert_allclose(ras, geometry.lps_to_ras(lps)[0], rtol=0, atol=1e-9 * (1 + np.abs(ras).max()))


@settings(max_examples=60, deadline=None)
@given(image=grids(), index=continuous_indices)
def test_ras_to_ijk_agrees_with_simpleitk_and_round_trips(image, index):
    affine = geometry.ijk_to_ras_from_sitk(image)
    ras = geometry.apply_affine(affine, index)
    back = geometry.ras_to_continuous_ijk(affine, ras)[0]
    np.testing.assert_allclose(back, index, atol=1e-8)
    lps = geometry.ras_to_lps(ras)[0]
    np.testing.assert_allclose(back, image.TransformPhysicalPointToContinuousIndex(lps.tolist()), atol=1e-8)


@settings(max_examples=60, deadline=None)
@given(image=grids())
def test_sitk_geometry_from_ijk_to_ras_inverts_ijk_to_ras_from_sitk(image):
    spacing, origin, direction = geometry.sitk_geometry_from_ijk_to_ras(geometry.ijk_to_ras_from_sitk(image))
    np.testing.assert_allclose(spacing, image.GetSpacing(), rtol=1e-12)
    np.testing.assert_allclose(origin, image.GetOrigin(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(direction, image.GetDirection(), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(image=grids(axis_aligned=True))
def test_axis_aligned_geometry_survives_the_round_trip_bit_for_bit(image):
    spacing, origin, direction = geometry.sitk_geometry_from_ijk_to_ras(geometry.ijk_to_ras_from_sitk(image))
    assert (spacing, origin, direction) == (image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def test_lps_and_ras_differ_by_the_sign_of_x_and_y():
    points = np.array([[1.0, -2.0, 3.0], [0.5, 0.25, -7.0]])
    np.testing.assert_array_equal(geometry.lps_to_ras(points), [[-1.0, 2.0, 3.0], [-0.5, -0.25, -7.0]])
    np.testing.assert_array_equal(geometry.ras_to_lps(geometry.lps_to_ras(points)), points)
    np.testing.assert_array_equal(geometry.LPS_TO_RAS[:3, :3] @ points.T, geometry.lps_to_ras(points).T)
    assert geometry.lps_to_ras([1.0, 2.0, 3.0]).shape == (1, 3)


@pytest.mark.parametrize(
    "matrix, problem",
    [
        (np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
        (np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "singular"),
        (np.diag([1.0, np.nan, 1.0, 1.0]), "NaN"),
        (np.eye(3), "4x4"),
        (np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]), "0 0 0 1"),
    ],
)
def test_invalid_matrices_are_rejected(matrix, problem):
    with pytest.raises(InputError, match=problem):
        geometry.sitk_geometry_from_ijk_to_ras(matrix)


def test_points_must_be_triples_of_finite_numbers():
    with pytest.raises(InputError, match="three coordinates"):
        geometry.as_points([1.0, 2.0])
    with pytest.raises(InputError, match="finite"):
        geometry.as_points([1.0, np.inf, 2.0])


def test_round_half_up_and_tie_tolerance():
    np.testing.assert_array_equal(geometry.round_half_up([0.5, -0.5, 1.49, 2.5, -2.5, 176.5]), [1, 0, 1, 3, -2, 177])
    # A value a hair below a half (float noise) still counts as the half.
    np.testing.assert_array_equal(geometry.nearest_voxel([176.49999999999997, 176.4999]), [177, 176])


def test_canonical_orientation_of_the_fixture_direction():
    # Direction of the parity fixture ("AIL"): i -> Anterior, j -> Inferior, k -> Left (LPS rows).
    direction_lps = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    affine = np.eye(4)
    affine[:3, :3] = geometry.LPS_TO_RAS[:3, :3] @ direction_lps * [0.8, 0.8, 2.5]
    orientation = geometry.canonical_orientation(affine)
    np.testing.assert_array_equal(orientation, [[1, 1], [2, -1], [0, -1]])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), oblique=st.booleans())
def test_reorientation_keeps_every_voxel_at_its_world_position(seed, oblique):
    rng = np.random.default_rng(seed)
    if oblique:
        # A rotation of a few degrees: every voxel axis stays nearest to one world axis.
        q, r = np.linalg.qr(np.eye(3) + 0.05 * rng.normal(size=(3, 3)))
        small_rotation = q * np.sign(np.diag(r))
        direction = small_rotation @ (np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], 3))
    else:
        direction = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * rng.uniform(0.5, 3.0, 3)
    affine[:3, 3] = rng.uniform(-100, 100, 3)
    shape = tuple(int(n) for n in rng.integers(2, 9, 3))
    array = rng.integers(0, 1000, shape)

    orientation = geometry.canonical_orientation(affine)
    canonical = geometry.reorient_array(array, orientation)
    canonical_affine = geometry.reoriented_affine(affine, orientation, shape)

    assert canonical.shape == geometry.reoriented_shape(shape, orientation)
    # Each canonical axis runs mostly along +R, +A, +S respectively.
    linear = canonical_affine[:3, :3]
    assert np.all(np.argmax(np.abs(linear), axis=0) == [0, 1, 2])
    assert np.all(np.diag(linear) > 0)
    to_original = geometry.reorientation_matrix(orientation, shape)
    for voxel in np.ndindex(*canonical.shape):
        original = np.rint(geometry.apply_affine(to_original, voxel)[0]).astype(int)
        assert canonical[voxel] == array[tuple(original)]
        np.testing.assert_allclose(
            geometry.apply_affine(canonical_affine, voxel), geometry.apply_affine(affine, original), atol=1e-9
        )


def test_ras_direction_needs_no_reorientation():
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    orientation = geometry.canonical_orientation(affine)
    assert geometry.is_identity_orientation(orientation)
    array = np.arange(24).reshape(2, 3, 4)
    np.testing.assert_array_equal(geometry.reorient_array(array, orientation), array)
    np.testing.assert_array_equal(geometry.reoriented_affine(affine, orientation, array.shape), affine)


def test_shifted_affine_moves_the_origin_to_the_begin_voxel():
    affine = np.array([[0.0, 0.0, -1.5, 40.5], [1.5, 0.0, 0.0, -95.15], [0.0, -1.5, 0.0, 119.9], [0, 0, 0, 1]])
    for begin in ([-21, -8, -10], [5, -3, 7], [0, 0, 0], [10, 20, 30]):
        shifted = geometry.shifted_affine(affine, begin)
        np.testing.assert_array_equal(shifted[:3, :3], affine[:3, :3])
        np.testing.assert_allclose(shifted[:3, 3], geometry.apply_affine(affine, begin)[0], atol=1e-12)


def test_corner_points_span_the_outer_voxel_faces():
    corners = geometry.corner_points((4, 5, 6))
    assert corners.shape == (8, 3)
    np.testing.assert_array_equal(corners.min(axis=0), [-0.5, -0.5, -0.5])
    np.testing.assert_array_equal(corners.max(axis=0), [3.5, 4.5, 5.5])
    assert len({tuple(c) for c in corners}) == 8
