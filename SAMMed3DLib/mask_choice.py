"""Choosing among the alternative masks SAM answers a lone first click with, by what the image shows.

A click inside a lesion fits the lesion and its host organ alike. Models trained with alternative masks
(`--first-click-multimask`) return one of each, but a small model's IoU head hardly tells which one the
click meant (the demo model's card: right for 10 of 23 targets). The image does: the intended mask is
bounded by an edge, its inside differing from a thin rim around it, and holds intensities like those at
the click. Both terms are ratios of intensity differences to spreads, so the raw region serves as well as
the normalised network input.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

RIM_VOXELS = 2  # width of the shell around a mask that its edge contrast is measured against
CLICK_REACH = 1  # voxels on each side of the click averaged: a 3x3x3 mean is steadier than one noisy voxel
_EPSILON = 1e-6


def image_support(masks: torch.Tensor, image: torch.Tensor, click: Sequence[int]) -> torch.Tensor:
    """How well each mask agrees with the image around a click: edge contrast minus misfit at the click.

    masks: (M, S, S, S) bool; image: (S, S, S) intensities; click: (3,) region voxel index.
    Returns (M,) float64 scores, higher is better; -inf for an empty mask.
    edge = |mean inside - mean of the rim| / pooled standard deviation of the two;
    misfit = |mean around the click - mean inside| / standard deviation inside.
    """
    near_click = tuple(slice(max(0, int(c) - CLICK_REACH), int(c) + CLICK_REACH + 1) for c in click)
    click_mean = image[near_click].to(torch.float64).mean()
    scores = torch.full((masks.shape[0],), -torch.inf, dtype=torch.float64)
    if not masks.any():
        return scores
    # Only the masks' box and their rims matter: a few percent of the region for most targets, and the
    # statistics of all masks come from sums over it at once.
    box = _box_around(masks.any(dim=0), RIM_VOXELS)
    masks, image = masks[(slice(None), *box)], image[box].to(torch.float64)
    widened = F.max_pool3d(masks[:, None].float(), 2 * RIM_VOXELS + 1, stride=1, padding=RIM_VOXELS)[:, 0] > 0
    inside_mean, inside_var, inside_count = _weighted_moments(masks, image)
    rim_mean, rim_var, rim_count = _weighted_moments(widened & ~masks, image)
    pooled = torch.sqrt((inside_var + rim_var) / 2 + _EPSILON)
    edge = (inside_mean - rim_mean).abs() / pooled
    misfit = (click_mean - inside_mean).abs() / (inside_var.sqrt() + _EPSILON)
    scored = (inside_count > 0) & (rim_count > 0)
    return torch.where(scored, edge - misfit, scores)


def _box_around(mask: torch.Tensor, margin: int) -> tuple[slice, slice, slice]:
    """The bounding box of a non-empty (S, S, S) mask, widened by `margin` voxels and clipped to the region."""
    box = []
    for axis in range(3):
        present = torch.nonzero(mask.any(dim=tuple(a for a in range(3) if a != axis)))[:, 0]
        box.append(slice(max(0, int(present[0]) - margin), int(present[-1]) + margin + 1))
    return box[0], box[1], box[2]


def _weighted_moments(masks: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, population variance and voxel count of `image` under each of `masks` (M, ...); 0 where empty."""
    weights = masks.flatten(1).to(torch.float64)
    values = image.flatten()
    count = weights.sum(dim=1)
    mean = weights @ values / count.clamp(min=1)
    variance = (weights @ (values * values) / count.clamp(min=1) - mean * mean).clamp(min=0)
    return mean, variance, count


def best_supported(masks: torch.Tensor, image: np.ndarray | torch.Tensor, click: Sequence[int]) -> int:
    """Index of the mask the image supports best (the first one when all are empty)."""
    scores = image_support(masks, torch.as_tensor(np.asarray(image)), click)
    return int(torch.argmax(scores)) if torch.isfinite(scores).any() else 0
