"""A click on a single slice or a thin slab, end to end: the mask is what the model drew on the slice's plane."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY

from SAMMed3DLib.config import build_model
from SAMMed3DLib.predictor import RegionPredictor
from SAMMed3DLib.preprocess import ROI_SIZE, PreparedVolume
from SAMMed3DLib.session import Click, InteractiveSession
from SAMMed3DLib.volume import Volume

DATA_PLANE = ROI_SIZE // 2  # a slice is one canonical voxel thick; regions centre it, as they centre clicks


class DataPlanePredictor(RegionPredictor):
    """Draws the whole region plane that holds the slice's data, and nothing else."""

    def upsample_to_mask(self, logits: torch.Tensor) -> np.ndarray:
        mask = np.zeros((ROI_SIZE,) * 3, dtype=np.uint8)
        mask[:, :, DATA_PLANE] = 1
        return mask


@pytest.fixture(scope="module")
def predictor() -> DataPlanePredictor:
    torch.manual_seed(7)
    return DataPlanePredictor(build_model(TINY))


def slab(slices: int, thickness: float) -> Volume:
    """`slices` textured slices `thickness` mm thick, 50 x 60 voxels of 0.8 mm (48 mm: well inside one region)."""
    values = np.random.default_rng(0).integers(50, 150, size=(slices, 50, 60)).astype(np.int16)
    return Volume.from_array(values, np.diag([0.8, 0.8, thickness, 1.0]))


def click_in_the_middle(predictor: RegionPredictor, volume: Volume) -> np.ndarray:
    click = Click(tuple(volume.ijk_to_ras_points([30, 25, 0])[0]))
    return InteractiveSession(predictor, PreparedVolume(volume), regions="1").add_click(click).mask


@pytest.mark.parametrize("thickness", [1.5, 5.0, 10.0])
def test_the_mask_of_a_thick_single_slice_is_the_plane_the_model_drew(predictor, thickness):
    assert click_in_the_middle(predictor, slab(1, thickness)).all()


@pytest.mark.parametrize("slices, thickness", [(1, 0.5), (2, 0.3)])
def test_a_click_on_a_slab_thinner_than_half_a_voxel_gives_its_mask(predictor, slices, thickness):
    assert click_in_the_middle(predictor, slab(slices, thickness)).all()
