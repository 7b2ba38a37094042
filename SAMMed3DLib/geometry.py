"""Every coordinate conversion of the engine: RAS, LPS, voxel indices, the canonical grid.

Conventions: world points are RAS unless a name says LPS; an IJK-to-RAS matrix is 4x4 (direction x spacing
in the upper 3x3, origin in the last column), the matrix Slicer's `GetIJKToRASMatrix` gives. SimpleITK images
are LPS. The decompositions below follow torchio 0.20.8 operation by operation (`get_ras_affine_from_sitk`,
`get_sitk_metadata_from_ras_affine`) and nibabel's reorientation (`io_orientation`, `inv_ornt_aff`), because
the official SAM-Med3D pipeline goes through them and its results depend on the last bit of these numbers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# The 3x3 flip torchio multiplies with (an integer matrix, as in torchio; np.dot promotes exactly).
_FLIP_XY = np.diag([-1, -1, 1])


def as_points(points: Sequence[float] | np.ndarray) -> np.ndarray:
    """Points as a float64 (N, 3) array; a single point may be given as 3 numbers."""
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as error:  # ragged lists, text: numpy's own message would not say what to give
        raise InputError(
            "Points must be given as three numbers each, like [x, y, z]; got lists of other lengths or "
            "values that are not numbers."
        ) from error
    if array.ndim == 1:
        array = array[np.newaxis]
    if array.ndim != 2 or array.shape[1] != 3:
        raise InputError(f"Points must be given as three coordinates each, got an array of shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise InputError("Point coordinates must be finite numbers; remove NaN or infinite values.")
    return array


def lps_to_ras(points: Sequence[float] | np.ndarray) -> np.ndarray:
    """LPS points (N, 3) to RAS: x and y change sign."""
    return as_points(points) * np.array([-1.0, -1.0, 1.0])


def ras_to_lps(points: Sequence[float] | np.ndarray) -> np.ndarray:
    """RAS points (N, 3) to LPS: x and y change sign."""
    return as_points(points) * np.array([-1.0, -1.0, 1.0])


def validate_affine(matrix: np.ndarray, what: str = "IJK-to-RAS matrix") -> np.ndarray:
    """A finite, invertible 4x4 affine (last row 0 0 0 1) as float64, or InputError."""
    array = np.asarray(matrix, dtype=np.float64)
    if array.shape != (4, 4):
        raise InputError(f"The {what} must be 4x4, got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise InputError(f"The {what} contains NaN or infinite values; fix the image geometry.")
    if not np.array_equal(array[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(f"The {what} must end with the row 0 0 0 1, got {array[3].tolist()}.")
    linear = array[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    if np.any(norms == 0) or abs(np.linalg.det(linear / norms)) < 1e-6:
        raise InputError(f"The {what} is singular (zero spacing or parallel axes); fix the image geometry.")
    return array


def ijk_to_ras_from_sitk(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a 3D SimpleITK image (torchio `get_ras_affine_from_sitk`)."""
    spacing = np.array(image.GetSpacing())
    direction_lps = np.array(image.GetDirection()).reshape(3, 3)
    origin_lps = np.array(image.GetOrigin())
    affine = np.eye(4)
    affine[:3, :3] = np.dot(_FLIP_XY, direction_lps) * spacing
    affine[:3, 3] = np.dot(_FLIP_XY, origin_lps)
    return affine


def sitk_geometry_from_ijk_to_ras(
    matrix: np.ndarray,
) -> tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, ...]]:
    """(spacing, origin, direction) in LPS for SimpleITK (torchio `get_sitk_metadata_from_ras_affine`).

    Spacing is the length of each matrix column, direction the normalised columns, both flipped to LPS.
    """
    affine = validate_affine(matrix)
    rotation_zoom = affine[:3, :3]
    spacing = np.sqrt(np.sum(rotation_zoom * rotation_zoom, axis=0))
    rotation = rotation_zoom / spacing
    origin_lps = np.dot(_FLIP_XY, affine[:3, 3])
    direction_lps = np.dot(_FLIP_XY, rotation)
    return (
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in origin_lps),
        tuple(float(d) for d in direction_lps.flatten()),
    )


def set_sitk_geometry(image: sitk.Image, matrix: np.ndarray) -> sitk.Image:
    """Give `image` the geometry of an IJK-to-RAS matrix (in place) and return it."""
    spacing, origin, direction = sitk_geometry_from_ijk_to_ras(matrix)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def apply_affine(matrix: np.ndarray, points: Sequence[float] | np.ndarray) -> np.ndarray:
    """Points (N, 3) mapped by a 4x4 affine, computed as nibabel's `apply_affine` does."""
    affine = np.asarray(matrix, dtype=np.float64)
    return np.dot(as_points(points), affine[:3, :3].T) + affine[:3, 3][np.newaxis, :]


def ras_to_continuous_ijk(ijk_to_ras: np.ndarray, ras_points: Sequence[float] | np.ndarray) -> np.ndarray:
    """Continuous voxel indices (N, 3) of RAS points, by solving the affine in double precision."""
    affine = validate_affine(ijk_to_ras)
    offsets = as_points(ras_points) - affine[:3, 3]
    return np.linalg.solve(affine[:3, :3], offsets.T).T


def round_half_up(values: np.ndarray | float) -> np.ndarray:
    """Nearest integer, exact halves rounded up (floor(x + 0.5)), as int64."""
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5).astype(np.int64)


def nearest_voxel(continuous_index: np.ndarray, tie_tolerance: float = 1e-6) -> np.ndarray:
    """Voxel indices of continuous indices, round half up; values within `tie_tolerance` below a half
    count as the half, so a point on a voxel boundary resolves the same way whatever the float noise."""
    return round_half_up(np.asarray(continuous_index, dtype=np.float64) + tie_tolerance)


# ----------------------------------------------------------------------------------------------------
# Canonical (closest to RAS+) reorientation, as nibabel's `as_closest_canonical` does it.


def canonical_orientation(affine: np.ndarray) -> np.ndarray:
    """For each voxel axis, the RAS axis it runs along and its sign: int array (3, 2).

    Row a is (r, s): voxel axis a becomes canonical axis r, flipped when s is -1. The closest rotation
    (polar decomposition) of the normalised direction decides; ties pick axes in order (nibabel).
    """
    rotation_zoom = np.asarray(affine, dtype=np.float64)[:3, :3]
    zooms = np.sqrt(np.sum(rotation_zoom * rotation_zoom, axis=0))
    zooms[zooms == 0] = 1
    u, singular, vt = np.linalg.svd(rotation_zoom / zooms, full_matrices=False)
    keep = singular > singular.max() * 3 * np.finfo(singular.dtype).eps
    closest = np.dot(u[:, keep], vt[keep])
    orientation = np.zeros((3, 2), dtype=np.int64)
    for voxel_axis in range(3):
        column = closest[:, voxel_axis]
        if np.allclose(column, 0):
            raise InputError("The image direction is degenerate; an axis has no orientation.")
        world_axis = int(np.argmax(np.abs(column)))
        orientation[voxel_axis] = (world_axis, 1 if column[world_axis] > 0 else -1)
        closest[world_axis, :] = 0
    return orientation


def is_identity_orientation(orientation: np.ndarray) -> bool:
    return bool(np.array_equal(orientation, [[0, 1], [1, 1], [2, 1]]))


def reorient_array(array: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    """An (a0, a1, a2) voxel array reordered/flipped into the canonical grid (a view, no interpolation)."""
    result = array
    for axis, sign in enumerate(orientation[:, 1]):
        if sign == -1:
            result = np.flip(result, axis=axis)
    return result.transpose(np.argsort(orientation[:, 0]))


def reorientation_matrix(orientation: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """4x4 map from canonical voxel indices to the original voxel indices (nibabel `inv_ornt_aff`)."""
    sizes = np.asarray(shape, dtype=np.float64)[:3]
    reorder = np.eye(4)[list(orientation[:, 0]) + [3], :]
    flip = np.diag(list(orientation[:, 1].astype(np.float64)) + [1.0])
    centre = -(sizes - 1) / 2.0
    flip[:3, 3] = orientation[:, 1] * centre - centre
    return np.dot(flip, reorder)


def reoriented_affine(affine: np.ndarray, orientation: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """IJK-to-RAS of the canonical grid of an array of `shape` (its shape before reorientation)."""
    return np.asarray(affine, dtype=np.float64).dot(reorientation_matrix(orientation, shape))


def reoriented_shape(shape: Sequence[int], orientation: np.ndarray) -> tuple[int, int, int]:
    order = np.argsort(orientation[:, 0])
    return tuple(int(shape[axis]) for axis in order)


# ----------------------------------------------------------------------------------------------------
# Crop / pad of a grid, as torchio's Pad then Crop move the affine.


def shifted_affine(affine: np.ndarray, begin: Sequence[int]) -> np.ndarray:
    """Affine of the sub-grid starting at voxel `begin` (may be negative): torchio pads the low side by
    max(0, -begin) and then crops max(0, begin), moving the origin once per step."""
    start = np.asarray(begin, dtype=np.int64)
    padded = np.array(affine, dtype=np.float64)
    padded[:3, 3] = apply_affine(padded, -np.maximum(0, -start))[0]
    cropped = padded.copy()
    cropped[:3, 3] = apply_affine(padded, np.maximum(0, start))[0]
    return cropped


def corner_points(shape: Sequence[int]) -> np.ndarray:
    """The 8 outer corners (-0.5 and n - 0.5 per axis) of a voxel grid, as continuous indices (8, 3)."""
    lows = [-0.5, -0.5, -0.5]
    highs = [n - 0.5 for n in shape]
    return np.array([[(lows[a], highs[a])[(c >> a) & 1] for a in range(3)] for c in range(8)])
