"""A PNG of three orthogonal slices through a point, with mask outlines, to look at a result."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .imageio import PathLike, write_image_atomic

MASK_COLOUR = (255, 60, 60)
TRUTH_COLOUR = (60, 220, 60)
CLICK_COLOUR = (255, 230, 0)


def save_preview(
    image: sitk.Image,
    mask: sitk.Image,
    point_ijk: Sequence[float],
    path: PathLike,
    truth: Optional[sitk.Image] = None,
    window: tuple[float, float] = (-200.0, 300.0),
) -> None:
    """Axial, coronal and sagittal slices through `point_ijk` (radiological display, LPS-oriented),
    the mask outlined in red, the truth (if given) in green, the point in yellow."""
    physical = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in point_ijk])
    image, mask = sitk.DICOMOrient(image, "LPS"), sitk.DICOMOrient(mask, "LPS")
    truth = sitk.DICOMOrient(truth, "LPS") if truth is not None else None
    i, j, k = (int(round(v)) for v in image.TransformPhysicalPointToContinuousIndex(physical))
    grey = _window(sitk.GetArrayFromImage(image), window)
    layers = [(sitk.GetArrayFromImage(mask) > 0, MASK_COLOUR)]
    if truth is not None:
        layers.append((sitk.GetArrayFromImage(truth) > 0, TRUTH_COLOUR))
    sx, sy, sz = image.GetSpacing()
    views = [
        (lambda a: a[k], (sy, sx), (j, i)),  # axial: anterior up, patient right on the left
        (lambda a: a[::-1, j, :], (sz, sx), (grey.shape[0] - 1 - k, i)),  # coronal: superior up
        (lambda a: a[::-1, :, i], (sz, sy), (grey.shape[0] - 1 - k, j)),  # sagittal: superior up
    ]
    panels = [_panel(cut, grey, layers, pixel, dot) for cut, pixel, dot in views]
    height = max(p.shape[0] for p in panels)
    row = np.concatenate([np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels], axis=1)
    write_image_atomic(sitk.GetImageFromArray(row, isVector=True), path)


def _window(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    return (np.clip((array.astype(np.float32) - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _panel(cut, grey: np.ndarray, layers, pixel_mm: tuple[float, float], dot: tuple[int, int]) -> np.ndarray:
    rgb = np.repeat(cut(grey)[..., None], 3, axis=2)
    for layer, colour in layers:
        rgb[_outline(cut(layer))] = colour
    rows, columns = dot
    rgb[max(rows - 1, 0) : rows + 2, max(columns - 1, 0) : columns + 2] = CLICK_COLOUR
    return _square_pixels(rgb, pixel_mm)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _square_pixels(rgb: np.ndarray, pixel_mm: tuple[float, float], target_mm: Optional[float] = None) -> np.ndarray:
    """Nearest-neighbour rescale so that one output pixel is the same size in mm on both axes."""
    target = target_mm or min(pixel_mm)
    rows = np.minimum(
        (np.arange(int(round(rgb.shape[0] * pixel_mm[0] / target))) * target / pixel_mm[0]).astype(int),
        rgb.shape[0] - 1,
    )
    columns = np.minimum(
        (np.arange(int(round(rgb.shape[1] * pixel_mm[1] / target))) * target / pixel_mm[1]).astype(int),
        rgb.shape[1] - 1,
    )
    return rgb[rows][:, columns]
