"""Choosing a first-click alternative by image evidence: the mask bounded by an edge, holding the click's
intensity, wins; an empty mask never does."""

from __future__ import annotations

import numpy as np
import torch

from SAMMed3DLib.mask_choice import best_supported, image_support

SIZE = 64
LESION_CENTRE, ORGAN_CENTRE = np.array([32, 32, 40]), np.array([32, 32, 32])


def _ball(centre, radius: float) -> np.ndarray:
    grid = np.indices((SIZE,) * 3).transpose(1, 2, 3, 0)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


def _scene() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A noisy organ (60 HU over a 20 HU background) holding a brighter lesion (140 HU), and candidate masks."""
    organ, lesion = _ball(ORGAN_CENTRE, 20), _ball(LESION_CENTRE, 6)
    image = np.full((SIZE,) * 3, 20.0) + 40.0 * organ + 80.0 * lesion
    image += np.random.default_rng(0).normal(0.0, 10.0, image.shape)
    candidates = {
        "lesion": lesion,
        "organ": organ,
        "in between": _ball(LESION_CENTRE, 12) & organ,
        "organ-sized blob around the click": _ball(LESION_CENTRE, 20),
    }
    return image, candidates


def _best(image: np.ndarray, candidates: dict[str, np.ndarray], click) -> str:
    names = list(candidates)
    masks = torch.from_numpy(np.stack([candidates[name] for name in names]))
    return names[best_supported(masks, image, click)]


def test_a_click_in_the_lesion_picks_the_lesion():
    image, candidates = _scene()
    assert _best(image, candidates, LESION_CENTRE) == "lesion"


def test_a_click_in_the_organ_picks_the_organ():
    image, candidates = _scene()
    click = ORGAN_CENTRE - np.array([0, 0, 10])  # inside the organ, away from the lesion
    candidates["lesion-sized ball around the click"] = _ball(click, 6)
    del candidates["lesion"]
    assert _best(image, candidates, click) == "organ"


def test_an_empty_alternative_never_wins_and_all_empty_gives_the_first():
    image, candidates = _scene()
    masks = torch.from_numpy(np.stack([np.zeros_like(candidates["lesion"]), candidates["in between"]]))
    scores = image_support(masks, torch.from_numpy(image), LESION_CENTRE)
    assert scores[0] == -torch.inf and torch.isfinite(scores[1])
    assert best_supported(masks, image, LESION_CENTRE) == 1
    assert best_supported(torch.zeros((3, SIZE, SIZE, SIZE), dtype=torch.bool), image, LESION_CENTRE) == 0


def _support_by_definition(mask: np.ndarray, image: np.ndarray, click) -> float:
    """The docstring's formula, voxel by voxel over the whole region (rim: the 2-voxel shell outside the mask)."""
    rim = np.zeros_like(mask)
    for offset in np.ndindex(5, 5, 5):
        shifted = np.zeros_like(mask)
        source = tuple(slice(max(0, 2 - o), SIZE - max(0, o - 2)) for o in offset)
        target = tuple(slice(max(0, o - 2), SIZE - max(0, 2 - o)) for o in offset)
        shifted[target] = mask[source]
        rim |= shifted
    rim &= ~mask
    inside, around = image[mask], image[rim]
    pooled = np.sqrt((inside.var() + around.var()) / 2 + 1e-6)
    click_mean = image[tuple(slice(c - 1, c + 2) for c in click)].mean()
    return abs(inside.mean() - around.mean()) / pooled - abs(click_mean - inside.mean()) / (inside.std() + 1e-6)


def test_scores_follow_the_definition_also_for_masks_at_the_region_border():
    image, candidates = _scene()
    at_border = _ball((0, 32, 63), 9)
    masks = [candidates["lesion"], candidates["in between"], at_border]
    scores = image_support(torch.from_numpy(np.stack(masks)), torch.from_numpy(image), LESION_CENTRE)
    expected = [_support_by_definition(mask, image, LESION_CENTRE) for mask in masks]
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-9, atol=1e-9)
