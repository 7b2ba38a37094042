"""A 128^3 region mask mapped back onto the original grid, exactly as the official pipeline does it.

Officially (spec 5.7) the region mask is resampled with SimpleITK, nearest neighbour, onto the WHOLE original
grid. On common grids many original voxel centres lie exactly half-way between two region voxels, so the
result depends on ITK's floating-point path. This module reproduces that path for the original voxels near
the region only (its footprint): ITK's `LinearThreadedGenerateData` maps the two ends of each full output
row (index 0 and n_i) to continuous region indices and interpolates between them, then rounds half up.
The matrices ITK uses (its direction x spacing and the SVD-based inverse) are read back from SimpleITK
itself, so the arithmetic matches bit for bit. One departure: along a canonical axis of one voxel (a single
slice or a thin slab) every original voxel reads that voxel's plane, where nearest neighbour can miss it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from . import geometry
from .errors import InputError
from .preprocess import ROI_SIZE, Region
from .transforms import bounding_box, offset_box
from .volume import Volume

Box = tuple[slice, slice, slice]
# The flat index of box voxels whose centre lies outside the region: one past the region's voxels,
# where `Footprint.paste` keeps a zero.
OUTSIDE_REGION = ROI_SIZE**3


class _ItkGrid:
    """Origin, index-to-point and point-to-index matrices of a grid, exactly as ITK holds them."""

    def __init__(self, ijk_to_ras: np.ndarray):
        spacing, origin, direction = geometry.sitk_geometry_from_ijk_to_ras(ijk_to_ras)
        probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
        probe.SetSpacing(spacing)
        probe.SetDirection(direction)
        # With a zero origin, unit vectors read out single matrix columns without rounding.
        unit_vectors = np.eye(3).tolist()
        self.origin = np.array(origin)
        self.index_to_point = np.array([probe.TransformContinuousIndexToPhysicalPoint(e) for e in unit_vectors]).T
        self.point_to_index = np.array([probe.TransformPhysicalPointToContinuousIndex(e) for e in unit_vectors]).T

    def index_to_point_rows(self, i: float, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Physical points (len(j), 3) of indices (i, j[n], k[n]), summed in ITK's order."""
        matrix = self.index_to_point
        points = np.empty((len(j), 3))
        for axis in range(3):
            points[:, axis] = ((self.origin[axis] + matrix[axis, 0] * i) + matrix[axis, 1] * j) + matrix[axis, 2] * k
        return points

    def point_to_continuous_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous indices (N, 3) of physical points (N, 3), summed in ITK's order."""
        offsets = points - self.origin
        result = np.empty_like(offsets)
        for axis in range(3):
            row = self.point_to_index[axis]
            result[:, axis] = (row[0] * offsets[:, 0] + row[1] * offsets[:, 1]) + row[2] * offsets[:, 2]
        return result


def _round_half_up_like_itk(values: np.ndarray) -> np.ndarray:
    """ITK's RoundHalfIntegerUp on x86-64: round-half-even of 2x + 0.5, then halve (arithmetic shift)."""
    return np.right_shift(np.rint(2.0 * values + 0.5).astype(np.int64), 1)


def _candidate_box(region: Region, volume: Volume) -> Box | None:
    """KJI box of original voxels that may have their centre inside the region (a voxel of margin)."""
    corners_ras = geometry.apply_affine(region.affine, geometry.corner_points((ROI_SIZE,) * 3))
    corners_ijk = volume.ras_to_ijk(corners_ras)
    low = np.maximum(np.floor(corners_ijk.min(axis=0)).astype(np.int64) - 1, 0)
    high = np.minimum(np.ceil(corners_ijk.max(axis=0)).astype(np.int64) + 2, np.array(volume.size_ijk))
    if np.any(high <= low):
        return None
    return tuple(slice(int(low[a]), int(high[a])) for a in (2, 1, 0))


def tight_box(inside: np.ndarray, box: Box) -> Box:
    """The smallest box around the True voxels of `inside` (given over `box`, not all False), in volume
    coordinates."""
    return offset_box(bounding_box(inside), box)


def _axis_lookup(start: np.ndarray, end: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Region index along one axis for every row (start, end) and column alpha, -1 outside.

    Rows often share their (start, end) pair (always for axis-aligned grids), so each distinct pair is
    computed once: returns a table (distinct pairs, columns) and each row's position in it."""
    packed = np.empty(len(start), dtype=np.complex128)  # one sortable value per (start, end) pair
    packed.real, packed.imag = start, end
    pairs, row_to_pair = np.unique(packed, return_inverse=True)
    low, high = pairs.real[:, np.newaxis], pairs.imag[:, np.newaxis]
    u = low + alpha[np.newaxis, :] * (high - low)
    inside = (u >= -0.5) & (u < ROI_SIZE - 0.5)
    table = np.where(inside, _round_half_up_like_itk(np.where(inside, u, 0.0)), -1).astype(np.int32)
    return table, row_to_pair.reshape(-1)


def _single_voxel_plane(region: Region, axis: int) -> int:
    """Region plane of the one canonical voxel along `axis` (-1 when the region misses it).

    A single slice resamples to one 1.5 mm voxel 0.75 mm inside its face; nearest neighbour would map a slice
    of 3 mm or more onto a plane of zero padding beside it, as the official paste-back does. The whole slice
    (or slab) is that voxel, as for clicks (`canonical_voxels`), so it reads the plane holding the data."""
    plane = -region.begin[axis]
    return plane if 0 <= plane < ROI_SIZE else -1


@dataclass(frozen=True)
class Footprint:
    """Where a region lands on the original grid: for every voxel of a KJI box, the region voxel whose
    value it takes (`flat_index` into the raveled 128^3 mask) and whether its centre is inside the region.
    It depends only on the two grids, so it is computed once per region and reused for every click."""

    box: Box
    flat_index: np.ndarray  # int32, box shape; OUTSIDE_REGION where outside
    inside: np.ndarray  # bool, box shape

    @property
    def nbytes(self) -> int:
        return self.flat_index.nbytes + self.inside.nbytes

    def paste(self, region_mask: np.ndarray) -> np.ndarray:
        """The region mask (128^3, (a0, a1, a2) order) on the footprint box, uint8 (K, J, I)."""
        mask = np.asarray(region_mask)
        if mask.shape != (ROI_SIZE,) * 3:
            raise InputError(f"A region mask must be {ROI_SIZE}^3 voxels, got shape {mask.shape}.")
        values = np.zeros(OUTSIDE_REGION + 1, dtype=np.uint8)
        np.not_equal(mask.reshape(-1), 0, out=values[:OUTSIDE_REGION].view(np.bool_))
        # torch gathers with the int32 index as it is (numpy would first widen it, a copy per click).
        index = torch.from_numpy(self.flat_index.reshape(-1))
        return torch.index_select(torch.from_numpy(values), 0, index).numpy().reshape(self.inside.shape)


_EMPTY_BOX: Box = (slice(0, 0),) * 3


def region_footprint(region: Region, volume: Volume) -> Footprint:
    """The footprint of `region` on `volume`'s grid (empty when they do not overlap)."""
    empty = Footprint(_EMPTY_BOX, np.zeros((0, 0, 0), dtype=np.int32), np.zeros((0, 0, 0), dtype=bool))
    box = _candidate_box(region, volume)
    if box is None:
        return empty
    output, roi = _ItkGrid(volume.ijk_to_ras), _ItkGrid(region.affine)
    row_length = volume.size_ijk[0]
    alpha = np.arange(box[2].start, box[2].stop) / float(row_length)
    # One row per (k, j) of the box, k slowest.
    k_rows, j_rows = np.meshgrid(
        np.arange(box[0].start, box[0].stop, dtype=np.float64),
        np.arange(box[1].start, box[1].stop, dtype=np.float64),
        indexing="ij",
    )
    k_rows, j_rows = k_rows.reshape(-1), j_rows.reshape(-1)
    starts = roi.point_to_continuous_index(output.index_to_point_rows(0.0, j_rows, k_rows))
    ends = roi.point_to_continuous_index(output.index_to_point_rows(float(row_length), j_rows, k_rows))
    flat_index = np.zeros((len(k_rows), len(alpha)), dtype=np.int32)
    inside = np.ones(flat_index.shape, dtype=bool)
    for axis in range(3):
        if region.canonical_shape[axis] == 1:
            axis_index = _single_voxel_plane(region, axis)
        else:
            table, row_to_pair = _axis_lookup(starts[:, axis], ends[:, axis], alpha)
            axis_index = np.take(table, row_to_pair, axis=0)
        inside &= axis_index >= 0
        flat_index *= ROI_SIZE
        flat_index += axis_index
    np.putmask(flat_index, ~inside, OUTSIDE_REGION)
    shape = tuple(b.stop - b.start for b in box)
    flat_index, inside = flat_index.reshape(shape), inside.reshape(shape)
    if not inside.any():
        return empty
    tight = tight_box(inside, box)
    local = tuple(slice(t.start - b.start, t.stop - b.start) for t, b in zip(tight, box))
    return Footprint(tight, np.ascontiguousarray(flat_index[local]), np.ascontiguousarray(inside[local]))


def paste_region_mask(region_mask: np.ndarray, region: Region, volume: Volume) -> tuple[np.ndarray, Box]:
    """The region mask (128^3, (a0, a1, a2) order) on the original grid, restricted to the region's
    footprint: returns (mask in K, J, I order over the box, box as KJI slices). Voxels of the box whose
    centre lies outside the region are 0; voxels outside the box are 0 as well (not returned)."""
    footprint = region_footprint(region, volume)
    return footprint.paste(region_mask), footprint.box


def paste_into(full_mask: np.ndarray, patch: np.ndarray, box: Box, value: int = 1) -> np.ndarray:
    """Write `value` into `full_mask` (K, J, I) where `patch` is set inside `box`; later pastes overwrite."""
    target = full_mask[box]
    target[patch != 0] = value
    return full_mask
