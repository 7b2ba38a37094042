"""Plain 4x4 matrix maths and voxel boxes (for the engine and the Slicer glue).

Volume coordinate conversions (RAS, LPS, IJK, canonical grid) live in `geometry`; this module only
composes homogeneous matrices, applies them to point lists, compares voxel lattices, finds the box around a
mask's voxels and converts (K, J, I) slice boxes to VTK extents.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

Box = tuple[slice, slice, slice]


def compose(*matrices: np.ndarray) -> np.ndarray:
    """The product `matrices[0] @ matrices[1] @ ...`: the last one is applied to a point first."""
    result = np.eye(4)
    for matrix in matrices:
        result = result @ _as_matrix(matrix)
    return result


def apply(matrix: np.ndarray, points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Map an (N, 3) list of points (or one point) through a 4x4 matrix; returns (N, 3) floats."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    matrix = _as_matrix(matrix)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def object_to_node(center: Sequence[float], axes: np.ndarray) -> np.ndarray:
    """The 4x4 matrix placing an object with unit axis columns `axes` (3x3) at `center`."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(axes, dtype=float).reshape(3, 3)
    matrix[:3, 3] = np.asarray(center, dtype=float).reshape(3)
    return matrix


def lattice_offset(
    index_to_frame_a: np.ndarray, index_to_frame_b: np.ndarray, size_ijk: Sequence[int], tolerance: float = 1e-3
) -> Optional[tuple[int, int, int]]:
    """Whether two voxel grids coincide over grid a's `size_ijk` voxels, and if so the integer shift with
    index_b = index_a + shift.

    Both matrices map (i, j, k) voxel indices into one common frame. The grids coincide when every voxel of
    grid a lands within `tolerance` voxels of a voxel of grid b: the same axes and spacing, origins a whole
    number of voxels apart (a tiny rotation is allowed only as far as it moves the farthest voxel that little).
    Otherwise None.
    """
    a_in_b = np.linalg.inv(_as_matrix(index_to_frame_b)) @ _as_matrix(index_to_frame_a)
    shift = a_in_b[:3, 3]
    rounded = np.round(shift)
    farthest = np.maximum(np.asarray(size_ijk, dtype=float) - 1, 0)
    # Per axis of grid b, a bound on how far any voxel of grid a lies from a voxel of grid b.
    error = np.abs(shift - rounded) + np.abs(a_in_b[:3, :3] - np.eye(3)) @ farthest
    if np.any(error > tolerance) or not np.allclose(a_in_b[:3, :3], np.eye(3), atol=tolerance):
        return None
    return int(rounded[0]), int(rounded[1]), int(rounded[2])


def bounding_box(mask: np.ndarray) -> Optional[Box]:
    """The smallest box (relative to the array) around the True voxels of a 3-D mask, or None when it has none.

    Three reductions along the axes: several times faster than `np.nonzero` on millions of voxels."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(np.any(mask, axis=others))
        if len(present) == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def box_to_vtk_extent(box: Sequence[slice]) -> tuple[int, int, int, int, int, int]:
    """A (K, J, I) half-open slice box as a VTK extent (i0, i1, j0, j1, k0, k1), inclusive ends."""
    k, j, i = box
    return i.start, i.stop - 1, j.start, j.stop - 1, k.start, k.stop - 1


def vtk_extent_to_box(extent: Sequence[int]) -> Optional[Box]:
    """A VTK extent as a (K, J, I) slice box; None for an empty extent."""
    i0, i1, j0, j1, k0, k1 = (int(v) for v in extent)
    if i1 < i0 or j1 < j0 or k1 < k0:
        return None
    return slice(k0, k1 + 1), slice(j0, j1 + 1), slice(i0, i1 + 1)


def shift_box(box: Sequence[slice], shift_ijk: Sequence[int]) -> Box:
    """Move a (K, J, I) box by an (i, j, k) voxel shift."""
    di, dj, dk = shift_ijk
    k, j, i = box
    return slice(k.start + dk, k.stop + dk), slice(j.start + dj, j.stop + dj), slice(i.start + di, i.stop + di)


def intersect_boxes(a: Sequence[slice], b: Sequence[slice]) -> Optional[Box]:
    """The common part of two boxes, or None when they do not overlap."""
    common = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    if any(s.stop <= s.start for s in common):
        return None
    return common  # type: ignore[return-value]


def box_shape(box: Sequence[slice]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in box)


def offset_box(inner: Sequence[slice], outer: Sequence[slice]) -> Box:
    """`inner`, given relative to `outer`, in the coordinates `outer` is given in."""
    return tuple(slice(o.start + i.start, o.start + i.stop) for i, o in zip(inner, outer))  # type: ignore[return-value]


def union_box(a: Sequence[slice], b: Sequence[slice]) -> Box:
    """The smallest box holding both boxes."""
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))  # type: ignore[return-value]


def relative_box(box: Sequence[slice], within: Sequence[slice]) -> Box:
    """`box` in the coordinates of an array that holds the content of `within`."""
    return tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, within))  # type: ignore[return-value]


def _as_matrix(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (4, 4):
        raise ValueError(f"Expected a 4x4 matrix, got shape {matrix.shape}.")
    return matrix
