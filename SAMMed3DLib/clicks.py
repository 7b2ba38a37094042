"""Click simulation of the official evaluation protocol (spec 5.6, `random_sample_next_click`).

Candidates are enumerated in C order over (a0, a1, a2), as `torch.argwhere` does, and one is drawn with
`randint(len(candidates))` from NumPy's legacy global generator (or the RandomState given), so a run seeded
with `np.random.seed(233)` draws the official clicks.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import InputError


def _as_3d_bool(array, name: str) -> np.ndarray:
    values = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
    values = np.squeeze(values)
    if values.ndim != 3:
        raise InputError(f"The {name} must be a 3D array, got shape {values.shape}.")
    return values > 0


def _draw(candidates: np.ndarray, random_state: Optional[np.random.RandomState]) -> np.ndarray:
    """One of the True voxels of `candidates`, uniformly, as an (a0, a1, a2) index."""
    flat = np.flatnonzero(candidates)
    draw = np.random.randint if random_state is None else random_state.randint
    return np.array(np.unravel_index(flat[draw(len(flat))], candidates.shape), dtype=np.int64)


def simulate_click(
    prev_pred, gt, random_state: Optional[np.random.RandomState] = None
) -> tuple[np.ndarray, int]:
    """Next click from the previous binary prediction and the ground truth (both 3D, same shape).

    A uniformly drawn voxel among the errors: label 1 if it is a false negative, 0 if a false positive;
    when there is no error, a uniformly drawn ground-truth voxel with label 1.
    """
    previous = _as_3d_bool(prev_pred, "previous prediction")
    truth = _as_3d_bool(gt, "ground truth")
    if previous.shape != truth.shape:
        raise InputError(f"Prediction {previous.shape} and ground truth {truth.shape} differ in shape.")
    if not truth.any():
        raise InputError("The ground truth is empty in this region; no click can be simulated.")
    false_negative = truth & ~previous
    errors = false_negative | (previous & ~truth)
    if not errors.any():
        return _draw(truth, random_state), 1
    index = _draw(errors, random_state)
    return index, int(false_negative[tuple(index)])
