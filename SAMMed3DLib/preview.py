"""A PNG of three orthogonal slices through a point, with mask outlines, to look at a result."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .imageio import PathLike, write_image_atomic

MASK_COLOUR = (255, 60, 60)
TRUTH_COLOUR = (60, 220, 60)
BOTH_COLOUR = (60, 200, 255)  # where the mask's and the truth's outlines coincide: neither hides the other
CLICK_COLOUR = (255, 230, 0)
CT_WINDOW = (-200.0, 300.0)  # soft tissue, Hounsfield units
AIR_HU = -500.0  # slices holding values below this are a CT in Hounsfield units


def save_preview(
    image: sitk.Image,
    mask: sitk.Image,
    point_ijk: Sequence[float],
    path: PathLike,
    truth: Optional[sitk.Image] = None,
    window: Optional[tuple[float, float]] = None,
) -> None:
    """Axial, coronal and sagittal slices through `point_ijk` (radiological display, LPS-oriented) at one mm
    scale, the mask outlined in red, the truth (if given) in green, both where they coincide in blue, the point in
    yellow. `window` (low, high) maps intensities to black..white; by default the soft-tissue window for a CT (air
    in the slices), else the slices' 1st to 99th percentiles, so that an MR or any scan in other units is not all
    white or all black."""
    physical = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in point_ijk])
    oriented = [sitk.DICOMOrient(item, "LPS") for item in (image, mask, truth) if item is not None]
    i, j, k = (int(round(v)) for v in oriented[0].TransformPhysicalPointToContinuousIndex(physical))
    arrays = [sitk.GetArrayViewFromImage(item) for item in oriented]  # views: only three slices are copied
    depth = arrays[0].shape[0]
    sx, sy, sz = oriented[0].GetSpacing()
    views = [
        (lambda a: a[k], (sy, sx), (j, i)),  # axial: anterior up, patient right on the left
        (lambda a: a[::-1, j, :], (sz, sx), (depth - 1 - k, i)),  # coronal: superior up
        (lambda a: a[::-1, :, i], (sz, sy), (depth - 1 - k, j)),  # sagittal: superior up
    ]
    cuts = [[cut(array) for array in arrays] for cut, _, _ in views]
    low, high = window or _default_window([planes[0] for planes in cuts])
    mm = min(sx, sy, sz)  # one scale for all three panels, so that a structure has one size in each
    panels = [
        _panel(_grey(planes[0], low, high), zip(planes[1:], (MASK_COLOUR, TRUTH_COLOUR)), pixel, dot, mm)
        for planes, (_, pixel, dot) in zip(cuts, views)
    ]
    height = max(p.shape[0] for p in panels)
    row = np.concatenate([np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels], axis=1)
    write_image_atomic(sitk.GetImageFromArray(row, isVector=True), path)


def _default_window(planes: list[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([plane.ravel() for plane in planes]).astype(np.float64)
    if values.min() < AIR_HU:
        return CT_WINDOW
    low, high = np.percentile(values, [1.0, 99.0])
    return float(low), float(high)


def _grey(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low if high > low else 1.0  # a constant image is one grey, not a division by zero
    return (np.clip((plane.astype(np.float64) - low) / span, 0, 1) * 255).astype(np.uint8)


def _panel(
    grey: np.ndarray,
    layers: Iterable[tuple[np.ndarray, tuple[int, int, int]]],
    pixel_mm: tuple[float, float],
    dot: tuple[int, int],
    target_mm: float,
) -> np.ndarray:
    rgb = np.repeat(grey[..., None], 3, axis=2)
    outlines = []
    for layer, colour in layers:
        outlines.append(_outline(layer > 0))
        rgb[outlines[-1]] = colour
    if len(outlines) == 2:
        rgb[outlines[0] & outlines[1]] = BOTH_COLOUR
    rgb = _square_pixels(rgb, pixel_mm, target_mm)
    # The click is drawn after the rescale: a 3-pixel dot at its voxel's centre, not a bar three thick slices tall.
    rows, columns = (int((index + 0.5) * size / target_mm) for index, size in zip(dot, pixel_mm))
    rgb[max(rows - 1, 0) : rows + 2, max(columns - 1, 0) : columns + 2] = CLICK_COLOUR
    return rgb


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _square_pixels(rgb: np.ndarray, pixel_mm: tuple[float, float], target_mm: float) -> np.ndarray:
    """Nearest-neighbour rescale so that one output pixel is `target_mm` wide and tall."""
    rows = np.minimum(
        (np.arange(int(round(rgb.shape[0] * pixel_mm[0] / target_mm))) * target_mm / pixel_mm[0]).astype(int),
        rgb.shape[0] - 1,
    )
    columns = np.minimum(
        (np.arange(int(round(rgb.shape[1] * pixel_mm[1] / target_mm))) * target_mm / pixel_mm[1]).astype(int),
        rgb.shape[1] - 1,
    )
    return rgb[rows][:, columns]
