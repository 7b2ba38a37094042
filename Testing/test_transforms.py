"""4x4 matrix composition, point mapping, lattice comparison and (K, J, I) boxes vs VTK extents."""

from __future__ import annotations

import numpy as np
import pytest

from SAMMed3DLib.transforms import (
    apply,
    bounding_box,
    box_to_vtk_extent,
    compose,
    intersect_boxes,
    lattice_offset,
    object_to_node,
    offset_box,
    relative_box,
    shift_box,
    union_box,
    vtk_extent_to_box,
)


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [n for n in range(3) if n != axis]
    matrix = np.eye(4)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


def translation(x: float, y: float, z: float) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = (x, y, z)
    return matrix


OBLIQUE_IJK_TO_RAS = compose(
    translation(-80.0, 12.5, 40.0), rotation(2, 30), rotation(0, -20), np.diag([0.8, 0.9, 2.5, 1])
)


def test_compose_applies_the_last_matrix_first():
    point = np.array([[1.0, 2.0, 3.0]])
    moved = apply(compose(translation(10, 0, 0), rotation(2, 90)), point)
    np.testing.assert_allclose(moved, [[10 - 2.0, 1.0, 3.0]], atol=1e-12)
    np.testing.assert_allclose(compose(), np.eye(4))


def test_apply_maps_point_lists_and_single_points_like_homogeneous_multiplication():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(7, 3)) * 50
    homogeneous = (OBLIQUE_IJK_TO_RAS @ np.c_[points, np.ones(7)].T).T[:, :3]
    np.testing.assert_allclose(apply(OBLIQUE_IJK_TO_RAS, points), homogeneous)
    assert apply(OBLIQUE_IJK_TO_RAS, points[0]).shape == (1, 3)
    with pytest.raises(ValueError, match="4x4"):
        apply(np.eye(3), points)


def test_world_to_local_and_back_round_trip_through_a_parent_transform():
    parent_to_world = compose(translation(5, -7, 11), rotation(1, 17))
    world = np.array([[12.0, -3.0, 40.0], [0.0, 0.0, 0.0]])
    local = apply(np.linalg.inv(parent_to_world), world)
    np.testing.assert_allclose(apply(parent_to_world, local), world, atol=1e-12)


def test_object_to_node_places_unit_axes_at_the_center():
    axes = rotation(2, 45)[:3, :3]
    matrix = object_to_node((1, 2, 3), axes)
    np.testing.assert_allclose(apply(matrix, [0, 0, 0]), [[1, 2, 3]])
    np.testing.assert_allclose(apply(matrix, [1, 0, 0]) - [1, 2, 3], [axes[:, 0]])


SIZE = (512, 512, 300)


def test_lattice_offset_finds_whole_voxel_shifts_of_the_same_grid():
    shifted = compose(OBLIQUE_IJK_TO_RAS, translation(-3, 4, 2))  # index 0 of b is index (-3, 4, 2) of a
    assert lattice_offset(OBLIQUE_IJK_TO_RAS, OBLIQUE_IJK_TO_RAS, SIZE) == (0, 0, 0)
    assert lattice_offset(OBLIQUE_IJK_TO_RAS, shifted, SIZE) == (3, -4, -2)
    index_a = np.array([[10.0, 20.0, 5.0]])
    index_b = index_a + (3, -4, -2)
    np.testing.assert_allclose(apply(OBLIQUE_IJK_TO_RAS, index_a), apply(shifted, index_b), atol=1e-9)


def test_lattice_offset_rejects_other_spacing_axes_or_half_voxel_shifts():
    assert lattice_offset(OBLIQUE_IJK_TO_RAS, compose(OBLIQUE_IJK_TO_RAS, np.diag([2, 1, 1, 1])), SIZE) is None
    assert lattice_offset(OBLIQUE_IJK_TO_RAS, compose(OBLIQUE_IJK_TO_RAS, rotation(2, 1)), SIZE) is None
    assert lattice_offset(OBLIQUE_IJK_TO_RAS, compose(OBLIQUE_IJK_TO_RAS, translation(0.5, 0, 0)), SIZE) is None


def test_lattice_offset_takes_a_tiny_rotation_only_where_no_voxel_moves_more_than_the_tolerance():
    """A 0.05 degree turn moves voxel 511 by 0.45 voxel: the same grid for a small volume, not for a large one."""
    turned = compose(OBLIQUE_IJK_TO_RAS, rotation(2, 0.05))
    assert lattice_offset(OBLIQUE_IJK_TO_RAS, turned, SIZE) is None
    assert lattice_offset(OBLIQUE_IJK_TO_RAS, turned, (1, 1, 1)) == (0, 0, 0)
    header_rounding = compose(OBLIQUE_IJK_TO_RAS, rotation(2, 1e-5))  # 1e-4 voxel at voxel 511
    assert lattice_offset(OBLIQUE_IJK_TO_RAS, header_rounding, SIZE) == (0, 0, 0)


def test_bounding_box_is_the_smallest_box_around_the_true_voxels():
    mask = np.zeros((6, 7, 8), dtype=bool)
    assert bounding_box(mask) is None
    mask[1, 2, 3] = mask[4, 2, 6] = True
    assert bounding_box(mask) == (slice(1, 5), slice(2, 3), slice(3, 7))


def test_boxes_and_vtk_extents_convert_both_ways():
    box = (slice(3, 10), slice(0, 5), slice(7, 8))
    assert box_to_vtk_extent(box) == (7, 7, 0, 4, 3, 9)
    assert vtk_extent_to_box((7, 7, 0, 4, 3, 9)) == box
    assert vtk_extent_to_box((0, -1, 0, -1, 0, -1)) is None


def test_box_helpers():
    a = (slice(0, 10), slice(5, 15), slice(2, 4))
    b = (slice(5, 20), slice(0, 8), slice(3, 9))
    assert intersect_boxes(a, b) == (slice(5, 10), slice(5, 8), slice(3, 4))
    assert intersect_boxes(a, (slice(10, 12), slice(5, 6), slice(2, 3))) is None
    assert union_box(a, b) == (slice(0, 20), slice(0, 15), slice(2, 9))
    assert relative_box(b, union_box(a, b)) == (slice(5, 20), slice(0, 8), slice(1, 7))
    assert offset_box(relative_box(b, a), a) == b
    assert shift_box(a, (1, 2, 3)) == (slice(3, 13), slice(7, 17), slice(3, 5))
