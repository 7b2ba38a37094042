"""`Volume`: a scalar 3D image on its original grid, with its geometry."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from . import geometry
from .errors import InputError
from .imageio import PathLike, read_image
from .transforms import lattice_offset

POINT_SPACES = ("ras", "lps", "ijk")
# A point this far (in voxels) outside the outer voxel faces still counts as inside (float noise).
_INSIDE_TOLERANCE = 1e-6
# Two grids are one when no voxel of one lies further than this (in voxels) from the same voxel of the other:
# header rounding, not another grid. In voxels over the whole grid, not mm per matrix entry: 0.001 mm more
# spacing moves voxel 511 by half a voxel, while origins rounded to 0.01 mm move none.
SAME_GRID_TOLERANCE_VOXELS = 0.1
# Largest departure of a direction matrix's D^T D from the identity still read as header rounding (oblique DICOM
# orientations are written with a few decimals), not as a sheared or scaled grid.
DIRECTION_TOLERANCE = 1e-3

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_POINT_PATTERN = re.compile(rf"^\s*[\[(]?\s*({_NUMBER})\s*[,;\s]\s*({_NUMBER})\s*[,;\s]\s*({_NUMBER})\s*[\])]?\s*$")


def parse_point(text: str) -> tuple[float, float, float]:
    """'x,y,z' (commas, semicolons or spaces; optional brackets) as three floats."""
    match = _POINT_PATTERN.match(text or "")
    if not match:
        raise InputError(f"Point '{text}' is not three numbers separated by commas; write it like '12.5,-30,40'.")
    return tuple(float(value) for value in match.groups())


class Volume:
    """A scalar 3D image (SimpleITK, LPS, original grid). A single-slice 3D volume is allowed."""

    def __init__(self, image: sitk.Image, name: str = "image"):
        _check_image(image, name)
        self._image = image
        self.name = name
        self._array: np.ndarray | None = None
        self._ijk_to_ras = geometry.ijk_to_ras_from_sitk(image)
        geometry.validate_affine(self._ijk_to_ras, f"geometry of {name}")

    @classmethod
    def from_file(cls, path: PathLike) -> Volume:
        return cls(read_image(path), name=str(path))

    @classmethod
    def from_sitk(cls, image: sitk.Image, name: str = "image") -> Volume:
        return cls(image, name=name)

    @classmethod
    def from_array(cls, array_kji: np.ndarray, ijk_to_ras: np.ndarray, name: str = "image") -> Volume:
        """From what Slicer has: a numpy array in (K, J, I) order and the 4x4 IJK-to-RAS matrix."""
        array = np.asarray(array_kji)
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        elif array.dtype.kind == "f" and array.dtype.itemsize == 2:  # SimpleITK has no half-precision voxels
            array = array.astype(np.float32)
        elif array.dtype.kind == "f" and array.dtype.itemsize > 8:  # nor extended precision (np.longdouble)
            array = array.astype(np.float64)
        elif array.dtype.kind == "c":  # refused here: SimpleITK would fail on a big-endian one with a TypeError
            raise InputError(f"The {name} array holds complex values; convert it to real values first.")
        elif array.dtype.kind in "iuf" and not array.dtype.isnative:  # e.g. big-endian data read with nibabel
            array = array.astype(array.dtype.newbyteorder("="))
        elif array.dtype.kind not in "iufc":
            raise InputError(f"The {name} array holds {array.dtype} values; give numbers (integers or floats).")
        if array.ndim != 3:
            raise InputError(f"The {name} array must be 3D in (K, J, I) order, got {array.ndim} dimensions.")
        if 0 in array.shape:
            raise InputError(f"The {name} array has no voxels (shape {array.shape}); give a non-empty volume.")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
        geometry.set_sitk_geometry(image, ijk_to_ras)
        return cls(image, name=name)

    @property
    def image(self) -> sitk.Image:
        return self._image

    @property
    def array_kji(self) -> np.ndarray:
        """The voxels in (K, J, I) order (read-only)."""
        if self._array is None:
            self._array = sitk.GetArrayFromImage(self._image)
            self._array.flags.writeable = False
        return self._array

    @property
    def ijk_to_ras(self) -> np.ndarray:
        return self._ijk_to_ras.copy()

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self._image.GetSize())

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return tuple(reversed(self.size_ijk))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along I, J, K."""
        return tuple(float(s) for s in self._image.GetSpacing())

    @property
    def dtype(self) -> np.dtype:
        return self.array_kji.dtype

    def ras_to_ijk(self, ras_points: Sequence[float] | np.ndarray) -> np.ndarray:
        """Continuous (I, J, K) indices (N, 3) of RAS points."""
        return geometry.ras_to_continuous_ijk(self._ijk_to_ras, ras_points)

    def ijk_to_ras_points(self, ijk_points: Sequence[float] | np.ndarray) -> np.ndarray:
        """RAS points (N, 3) of continuous (I, J, K) indices."""
        return geometry.apply_affine(self._ijk_to_ras, ijk_points)

    def points_to_ras(self, points: Sequence[float] | np.ndarray, space: str = "ras") -> np.ndarray:
        """Points given in `space` ('ras', 'lps' or 'ijk') as RAS (N, 3); every point must lie inside."""
        given = geometry.as_points(points)
        kind = space.lower() if isinstance(space, str) else None
        if kind not in POINT_SPACES:
            raise InputError(f"Point space {space!r} is unknown; use one of {', '.join(POINT_SPACES)}.")
        ras = self._as_ras(given, kind)
        outside = self._outside(ras)
        if np.any(outside):
            point = given[int(np.argmax(outside))]
            shown = ", ".join(f"{value:g}" for value in point)
            raise InputError(
                f"Point ({shown}) {kind.upper()} lies outside {self.name}, which spans {self.extent_text()}; "
                f"place the point inside the volume.{self._other_space_hint(point, kind)}"
            )
        return ras

    def _as_ras(self, points: np.ndarray, space: str) -> np.ndarray:
        if space == "lps":
            return geometry.lps_to_ras(points)
        if space == "ijk":
            return self.ijk_to_ras_points(points)
        return points

    def _outside(self, ras: np.ndarray) -> np.ndarray:
        """Per point, whether it lies beyond the outer faces of the volume's voxels."""
        ijk = self.ras_to_ijk(ras)
        upper = np.array(self.size_ijk) - 0.5
        return np.any((ijk < -0.5 - _INSIDE_TOLERANCE) | (ijk > upper + _INSIDE_TOLERANCE), axis=1)

    def _other_space_hint(self, point: np.ndarray, space: str) -> str:
        """Voxel indices given as mm (or LPS as RAS) are the usual reason a point lands outside: say so."""
        fitting = [
            other for other in POINT_SPACES if other != space and not self._outside(self._as_ras(point[None], other))[0]
        ]
        if not fitting:
            return ""
        return (
            f" Read as {fitting[0].upper()} it lies inside: if that is what it is, give the point space "
            f'(--space {fitting[0]} on the command line, "space": "{fitting[0]}" in a manifest).'
        )

    def check_same_grid(self, other: Volume) -> None:
        """Raise unless `other` (a label map) has this volume's voxels: same size and voxel positions."""
        fix = "they must share one voxel grid: give the label map made on this image"
        if other.size_ijk != self.size_ijk:
            raise InputError(f"{other.name} has {other.size_ijk} voxels but {self.name} has {self.size_ijk}; {fix}.")
        if lattice_offset(self.ijk_to_ras, other.ijk_to_ras, self.size_ijk, SAME_GRID_TOLERANCE_VOXELS) != (0, 0, 0):
            raise InputError(
                f"{other.name} and {self.name} have the same size but different origins, spacings or directions; {fix}."
            )

    def ras_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest RAS coordinates of the volume's outer voxel faces."""
        corners = self.ijk_to_ras_points(geometry.corner_points(self.size_ijk))
        return corners.min(axis=0), corners.max(axis=0)

    def extent_text(self) -> str:
        low, high = self.ras_bounds()
        axes = ", ".join(f"{name} {lo:.1f}..{hi:.1f}" for name, lo, hi in zip("RAS", low, high))
        return f"RAS mm {axes} (voxels I,J,K 0..{', 0..'.join(str(n - 1) for n in self.size_ijk)})"


def _check_image(image: sitk.Image, name: str) -> None:
    if not isinstance(image, sitk.Image):
        raise InputError(f"The {name} must be a SimpleITK image, got {type(image).__name__}.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"The {name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector); "
            "convert it to a single-channel (scalar) volume."
        )
    dimension = image.GetDimension()
    if dimension == 2:
        raise InputError(f"The {name} is a 2D image; give a 3D volume (a single-slice 3D volume is fine).")
    if dimension == 4:
        raise InputError(
            f"The {name} is 4D, {image.GetSize()[3]} volumes (time points or channels) in one; extract the 3D "
            "volume to segment first (e.g. with Slicer's Sequences module, or SimpleITK's Extract)."
        )
    if dimension != 3:
        raise InputError(f"The {name} is {dimension}D; extract a single 3D volume first.")
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), rtol=0, atol=DIRECTION_TOLERANCE):
        raise InputError(
            f"The {name}'s voxel axes are not at right angles with unit length (direction matrix "
            f"{np.round(direction, 4).tolist()}): its header describes a sheared or scaled grid, on which masks would "
            "land in the wrong place; resample it onto a regular grid or fix its header."
        )
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"The {name} has complex voxels; convert it to real values first.")
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.kind == "f":  # by the voxels, not the pixel ID: a one-component vector image may be float too
        if not np.all(np.isfinite(voxels)):
            raise InputError(f"The {name} contains NaN or infinite voxel values; replace them first.")
