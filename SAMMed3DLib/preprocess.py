"""`PreparedVolume`: the whole volume resampled to 1.5 mm and reoriented once; 128^3 regions of it.

This is the official SAM-Med3D preprocessing (spec 5.2-5.5, torchio 0.20.8 semantics) done with SimpleITK
and numpy. The whole volume is resampled once by SimpleITK onto exactly the official grid (resampling only a
block is not bit-exact, spec 5.8), so every region is a slice of one cached array.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from . import geometry
from .errors import InputError
from .transforms import bounding_box
from .volume import Volume

ROI_SIZE = 128
# A whole-body CT is about 50 million voxels at 1.5 mm; far beyond that (or beyond the official grid's 16-bit
# sizes along one axis) the header's spacing must be wrong.
MAX_RESAMPLED_VOXELS = 10**9
TARGET_SPACING = 1.5


def official_sitk_image(image: sitk.Image) -> sitk.Image:
    """The image as torchio hands it to SimpleITK: geometry rebuilt from the RAS affine (float64)."""
    spacing, origin, direction = geometry.sitk_geometry_from_ijk_to_ras(geometry.ijk_to_ras_from_sitk(image))
    if (image.GetSpacing(), image.GetOrigin(), image.GetDirection()) == (spacing, origin, direction):
        return image
    rebuilt = sitk.Image(image)
    rebuilt.SetSpacing(spacing)
    rebuilt.SetOrigin(origin)
    rebuilt.SetDirection(direction)
    return rebuilt


def resample_to_target_spacing(image: sitk.Image, interpolator: int) -> sitk.Image:
    """Resample to 1.5 mm on torchio 0.20.8's grid: size ceil(n*s/1.5) (float64, singleton axes stay 1),
    same direction, first voxel's outer corner on the input's (but for slabs of at most 0.75 mm,
    `first_voxel_index`); default 0, pixel type kept."""
    old_spacing = np.array(image.GetSpacing())
    new_spacing = np.array((TARGET_SPACING,) * 3)
    old_size = np.array(image.GetSize())
    exact_size = np.ceil(old_size * old_spacing / new_spacing)
    if np.prod(exact_size) > MAX_RESAMPLED_VOXELS or exact_size.max() > np.iinfo(np.uint16).max:
        extent = " x ".join(f"{mm:.0f}" for mm in old_size * old_spacing)
        raise InputError(
            f"The image spans {extent} mm (voxel spacing {tuple(round(float(s), 4) for s in old_spacing)} mm in "
            f"its header): far larger than a body, too large to resample to {TARGET_SPACING} mm; check the spacing."
        )
    if np.count_nonzero(exact_size <= 1) >= 2:  # one thin axis is a single slice; two leave nothing to segment
        extent = " x ".join(f"{mm:.3g}" for mm in old_size * old_spacing)
        raise InputError(
            f"The image spans only {extent} mm (voxel spacing {tuple(float(f'{s:.4g}') for s in old_spacing)} mm in "
            f"its header): at most one {TARGET_SPACING} mm voxel across on two axes; check the spacing (metres "
            "instead of millimetres?)."
        )
    new_size = exact_size.astype(np.uint16)
    new_size[old_size == 1] = 1
    origin_index = first_voxel_index(image, new_size)
    resampler = sitk.ResampleImageFilter()
    resampler.SetInterpolator(interpolator)
    resampler.SetSize([int(n) for n in new_size])
    resampler.SetOutputSpacing(new_spacing.tolist())
    resampler.SetOutputOrigin(image.TransformContinuousIndexToPhysicalPoint(origin_index.tolist()))
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetDefaultPixelValue(0)
    return resampler.Execute(image)


def first_voxel_index(image: sitk.Image, new_size: np.ndarray) -> np.ndarray:
    """Continuous input index of the first output voxel's centre: torchio's corner-aligned grid puts it
    0.75 mm inside the input's outer face. An axis resampled to one voxel whose centre then lies at or past
    the other face (a slab at most 0.75 mm thick) is centred on the slab instead: there the official grid
    samples nothing but the default 0. Every other axis keeps the official grid."""
    old_size = np.array(image.GetSize())
    corner_aligned = 0.5 * (TARGET_SPACING / np.array(image.GetSpacing()) - 1)
    # Decide with the index ITK samples (the output origin mapped back), so float noise at the face resolves
    # as in the official resampling; ITK samples an index u only when u < n - 0.5.
    origin = image.TransformContinuousIndexToPhysicalPoint(corner_aligned.tolist())
    sampled = np.array(image.TransformPhysicalPointToContinuousIndex(origin))
    past_the_slab = (new_size == 1) & ~(sampled < old_size - 0.5)
    return np.where(past_the_slab, (old_size - 1) / 2.0, corner_aligned)


def canonical_from_resampled(resampled: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """The resampled image's voxels on the canonical grid, (a0, a1, a2) order, and that grid's affine."""
    affine = geometry.ijk_to_ras_from_sitk(resampled)
    array_ijk = sitk.GetArrayFromImage(resampled).transpose()
    orientation = geometry.canonical_orientation(affine)
    if geometry.is_identity_orientation(orientation):
        return array_ijk, affine
    canonical = geometry.reorient_array(array_ijk, orientation)
    return canonical, geometry.reoriented_affine(affine, orientation, array_ijk.shape)


def crop_with_zero_padding(array: np.ndarray, begin: Sequence[int], size: int = ROI_SIZE) -> np.ndarray:
    """The size^3 block of `array` starting at `begin` (may be negative or run past the end), zeros outside."""
    block = np.zeros((size,) * 3, dtype=array.dtype)
    source, target = [], []
    for start, length in zip(begin, array.shape):
        low, high = max(0, start), min(length, start + size)
        if high <= low:
            return block
        source.append(slice(low, high))
        target.append(slice(low - start, high - start))
    block[tuple(target)] = array[tuple(source)]
    return block


def normalise_intensities(raw: np.ndarray) -> torch.Tensor:
    """(x - mean) / std over voxels > 0 (unbiased std, float32 by torch), as (1, 1, *shape) float32."""
    if raw.dtype in (np.uint16, np.uint32):
        raw = raw.astype(np.int64)
    elif raw.dtype == np.uint64:  # int64 would wrap values of 2^63 and more to negative ones
        raw = raw.astype(np.float64)
    data = torch.from_numpy(np.ascontiguousarray(raw))
    mask = data > 0
    values = data.float()
    selected = values.masked_select(mask)
    if selected.numel() < 2:
        raise InputError(
            "The region around the point has no voxels above 0, so it cannot be normalised; "
            "choose another point or image."
        )
    mean, std = selected.mean(), selected.std()
    if not torch.isfinite(std) or std == 0:
        raise InputError(
            "The region around the point has a constant intensity above 0, so it cannot be normalised; "
            "choose another point or image."
        )
    values -= mean
    values /= std
    return values[None, None]


@dataclass(frozen=True, eq=False)
class Region:
    """A ROI_SIZE^3 block of the canonical grid starting at canonical voxel `begin`."""

    begin: tuple[int, int, int]
    raw: np.ndarray
    affine: np.ndarray
    canonical_affine: np.ndarray
    canonical_shape: tuple[int, int, int]

    def network_input(self) -> torch.Tensor:
        """The z-normalised network input (1, 1, 128, 128, 128) float32."""
        return normalise_intensities(self.raw)

    def ras_to_continuous_index(self, ras: Sequence[float] | np.ndarray) -> np.ndarray:
        """Continuous region indices (N, 3), (a0, a1, a2) order, of RAS points."""
        return geometry.ras_to_continuous_ijk(self.canonical_affine, ras) - np.asarray(self.begin)

    def ras_to_region_index(self, ras: Sequence[float] | np.ndarray) -> np.ndarray:
        """Region voxel index of RAS points: (3,) for one point, (N, 3) for several (may lie outside)."""
        points = np.asarray(ras, dtype=np.float64)
        voxels = canonical_voxels(self.canonical_affine, self.canonical_shape, points) - np.asarray(self.begin)
        return voxels[0] if points.ndim == 1 else voxels

    def contains_index(self, index: Sequence[int] | np.ndarray) -> bool:
        values = np.asarray(index)
        return bool(np.all((values >= 0) & (values < ROI_SIZE)))

    @property
    def axes(self) -> np.ndarray:
        """Unit RAS direction of each region axis, as columns (3, 3)."""
        linear = self.affine[:3, :3]
        return linear / np.linalg.norm(linear, axis=0)

    @property
    def size_mm(self) -> np.ndarray:
        return ROI_SIZE * np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def center_ras(self) -> np.ndarray:
        """RAS centre of the block (the shared corner of its 8 central voxels)."""
        return geometry.apply_affine(self.affine, [(ROI_SIZE - 1) / 2.0] * 3)[0]


def canonical_voxels(
    canonical_affine: np.ndarray, canonical_shape: Sequence[int], ras: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Canonical voxels (N, 3) of RAS points: solve the canonical affine in double precision, round half up,
    then clamp to the grid.

    The clamp keeps points of the volume on the grid: a point on the volume's outer face rounds one voxel past
    the grid where the face is a voxel face of the grid (an upper face, or a lower face flipped by the
    reorientation). Along an axis of one voxel (a single slice: the official rule keeps it at one 1.5 mm
    voxel, thinner than the slice) every point maps to that voxel."""
    voxels = geometry.nearest_voxel(geometry.ras_to_continuous_ijk(canonical_affine, ras))
    return np.clip(voxels, 0, np.asarray(canonical_shape, dtype=np.int64) - 1)


LabelInput = Union[Volume, sitk.Image]


class PreparedVolume:
    """A volume resampled (1.5 mm, linear) and reoriented to canonical once; regions are slices of it."""

    def __init__(self, volume: Volume):
        self.volume = volume
        # A key for caches of per-region results (e.g. embeddings): unlike id(), never reused by another object.
        self.cache_token = object()
        resampled = resample_to_target_spacing(official_sitk_image(volume.image), sitk.sitkLinear)
        self.resampled_shape = tuple(int(n) for n in resampled.GetSize())
        self.resampled_affine = geometry.ijk_to_ras_from_sitk(resampled)
        self.canonical, self.canonical_affine = canonical_from_resampled(resampled)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.canonical.shape)

    def canonical_voxel_of_ras(self, ras: Sequence[float] | np.ndarray) -> np.ndarray:
        """Canonical voxel index of RAS points: (3,) for one point, (N, 3) for several."""
        points = np.asarray(ras, dtype=np.float64)
        voxels = canonical_voxels(self.canonical_affine, self.canonical_shape, points)
        return voxels[0] if points.ndim == 1 else voxels

    def region(self, begin: Sequence[int]) -> Region:
        start = tuple(int(b) for b in begin)
        if len(start) != 3:
            raise InputError(f"A region begin needs three indices, got {len(start)}.")
        return Region(
            begin=start,
            raw=crop_with_zero_padding(self.canonical, start),
            affine=geometry.shifted_affine(self.canonical_affine, start),
            canonical_affine=self.canonical_affine.copy(),
            canonical_shape=self.canonical_shape,
        )

    def region_centred_on(self, ras: Sequence[float] | np.ndarray) -> Region:
        """The region whose voxel (64, 64, 64) is the canonical voxel of the RAS point (spec 5.8)."""
        voxel = self.canonical_voxel_of_ras(np.asarray(ras, dtype=np.float64).reshape(3))
        return self.region(voxel - ROI_SIZE // 2)

    def prepare_label(self, label: LabelInput, value: int) -> np.ndarray:
        """Binary (label == value) resampled (nearest) and reoriented like the image: uint8, canonical grid. The
        label must be on the image's grid (`Volume.check_same_grid`); its voxels are read on the image's geometry,
        so header rounding within that check's tolerance gives the image's canonical grid."""
        label_volume = label if isinstance(label, Volume) else Volume(label, name="label")
        self.volume.check_same_grid(label_volume)
        binary = sitk.GetImageFromArray((label_volume.array_kji == value).astype(np.uint8))
        binary.CopyInformation(self.volume.image)
        canonical, _ = canonical_from_resampled(
            resample_to_target_spacing(official_sitk_image(binary), sitk.sitkNearestNeighbor)
        )
        return canonical

    def label_region(self, canonical_label: np.ndarray, region: Region) -> np.ndarray:
        """The label block matching `region` (zero outside the volume)."""
        return crop_with_zero_padding(canonical_label, region.begin)


def begin_for_label_bbox(canonical_label: np.ndarray, size: int = ROI_SIZE) -> np.ndarray:
    """Region begin centred on the label's bounding box (torchio CropOrPad with a mask, spec 5.4):
    floor((lo + hi) / 2) - size/2 per axis; an empty label centres the region on the volume instead."""
    box = bounding_box(canonical_label)
    if box is None:
        shape = np.array(canonical_label.shape)
        return np.where(shape >= size, -((size - shape) // 2), -((size - shape + 1) // 2)).astype(np.int64)
    return np.array([(s.start + s.stop) // 2 - size // 2 for s in box], dtype=np.int64)


_CACHE: weakref.WeakKeyDictionary[Volume, PreparedVolume] = weakref.WeakKeyDictionary()


def prepare(volume: Volume) -> PreparedVolume:
    """The PreparedVolume of `volume`, computed once and kept as long as the volume lives."""
    prepared = _CACHE.get(volume)
    if prepared is None:
        prepared = PreparedVolume(volume)
        _CACHE[volume] = prepared
    return prepared
