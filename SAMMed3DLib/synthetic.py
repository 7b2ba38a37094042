"""A small synthetic CT scene with known geometry: a bright sphere in soft tissue on an oblique grid.

The Slicer module's self-test builds its scene from here, so what it asserts about the demo model (its mask
matches the sphere) is also checked outside Slicer, by the engine's tests.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SHAPE_KJI = (40, 48, 56)
SPACING_IJK = (1.2, 1.0, 1.6)
CENTER_IJK = (30, 22, 18)
RADIUS_MM = 10.0
# Soft tissue with CT-like noise and a contrast-enhanced sphere, as the demo model's phantoms have them.
TISSUE_HU, NOISE_HU, SPHERE_HU = 40.0, 20.0, 300.0


def oblique_ijk_to_ras() -> np.ndarray:
    """4x4 IJK -> RAS: anisotropic spacing, rotated 25 degrees about S and -15 degrees about R."""
    angle_s, angle_r = np.radians(25.0), np.radians(-15.0)
    about_s = np.array([[np.cos(angle_s), -np.sin(angle_s), 0], [np.sin(angle_s), np.cos(angle_s), 0], [0, 0, 1]])
    about_r = np.array([[1, 0, 0], [0, np.cos(angle_r), -np.sin(angle_r)], [0, np.sin(angle_r), np.cos(angle_r)]])
    matrix = np.eye(4)
    matrix[:3, :3] = about_s @ about_r @ np.diag(SPACING_IJK)
    matrix[:3, 3] = (-30.0, 20.0, -15.0)
    return matrix


def sphere_mask(center_ijk: Sequence[float], radius_mm: float = RADIUS_MM) -> np.ndarray:
    """uint8 KJI mask of the voxels within radius_mm (physical distance) of center_ijk."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in SHAPE_KJI), indexing="ij")
    offsets = np.stack([i - center_ijk[0], j - center_ijk[1], k - center_ijk[2]], axis=-1).astype(float)
    distances = np.linalg.norm(offsets @ oblique_ijk_to_ras()[:3, :3].T, axis=-1)
    return (distances <= radius_mm).astype(np.uint8)


def bright_sphere_image(seed: int = 233) -> np.ndarray:
    """int16 KJI image in Hounsfield units: noisy soft tissue with the sphere at CENTER_IJK."""
    noise = np.random.default_rng(seed).normal(0.0, NOISE_HU, SHAPE_KJI)
    return (TISSUE_HU + noise + (SPHERE_HU - TISSUE_HU) * sphere_mask(CENTER_IJK)).astype(np.int16)
