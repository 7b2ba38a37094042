"""Click simulation: the official random rule, replayed against the recorded fixture clicks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import shared_path

from SAMMed3DLib.clicks import deepest_voxel_ijk, simulate_click
from SAMMed3DLib.errors import InputError


def binary_prediction(low_res_logits: np.ndarray) -> np.ndarray:
    """What the official code thresholds: sigmoid(trilinear upsample of the 32^3 logits) > 0.5."""
    logits = torch.from_numpy(low_res_logits).reshape(1, 1, 32, 32, 32)
    upsampled = F.interpolate(logits, size=(128, 128, 128), mode="trilinear", align_corners=False)
    return (torch.sigmoid(upsampled) > 0.5)[0, 0].numpy()


def test_fixture_p3_clicks_are_reproduced_with_seed_233():
    folder = shared_path("fixtures/parity/pipeline")
    facts = json.loads((folder / "pipeline_fixture.json").read_text())["P3_official_3clicks"]
    labels = np.load(folder / "P1_official_1click_intermediates.npz")
    steps = np.load(folder / "P3_official_3clicks_intermediates.npz")
    np.random.seed(233)
    for category in facts["per_category"]:
        name = f"cat{category['category']}"
        truth = labels[f"{name}_roi_label"]
        previous = np.zeros_like(truth)
        for step, recorded in enumerate(category["clicks"]):
            index, label = simulate_click(previous, truth)
            assert index.tolist() == recorded["roi_index"] and label == recorded["label"]
            previous = binary_prediction(steps[f"{name}_low_res_logits_per_click"][step])
        np.testing.assert_array_equal(previous, steps[f"{name}_roi_pred_uint8"])


def test_fixture_real_clicks_share_one_random_stream_across_categories():
    folder = shared_path("fixtures/parity/pipeline_real")
    arrays = np.load(folder / "official_1click_intermediates.npz")
    np.random.seed(233)
    for category in (1, 2, 5):
        truth = torch.from_numpy(arrays[f"cat{category}_roi_label"])[None, None]  # torch input, official shape
        index, label = simulate_click(torch.zeros(128, 128, 128), truth)
        np.testing.assert_array_equal(index, arrays[f"cat{category}_click_roi_index_per_click"][0])
        assert label == arrays[f"cat{category}_click_label_per_click"][0] == 1


def test_candidates_are_enumerated_in_c_order():
    truth = np.zeros((4, 5, 6), dtype=bool)
    truth[1, 2, 3] = truth[0, 4, 5] = truth[3, 0, 0] = True
    drawn = set()
    for seed in range(12):
        expected = np.argwhere(truth)[np.random.RandomState(seed).randint(3)]
        index, label = simulate_click(np.zeros_like(truth), truth, random_state=np.random.RandomState(seed))
        np.testing.assert_array_equal(index, expected)
        assert label == 1
        drawn.add(tuple(index))
    assert len(drawn) == 3


def test_false_negatives_are_positive_and_false_positives_negative():
    truth = np.zeros((3, 3, 3), dtype=np.uint8)
    truth[0, 0, 0] = 1
    only_false_positive = truth.copy()
    only_false_positive[2, 2, 2] = 1
    index, label = simulate_click(only_false_positive, truth)
    assert index.tolist() == [2, 2, 2] and label == 0
    index, label = simulate_click(np.zeros_like(truth), truth)
    assert index.tolist() == [0, 0, 0] and label == 1


def test_a_perfect_prediction_gets_a_positive_click_inside_the_truth():
    truth = np.zeros((5, 5, 5), dtype=np.uint8)
    truth[1:3, 1:3, 1:3] = 1
    for _ in range(10):
        index, label = simulate_click(truth, truth)
        assert truth[tuple(index)] == 1 and label == 1


def test_empty_truth_and_mismatched_shapes_are_errors():
    with pytest.raises(InputError, match="empty"):
        simulate_click(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)))
    with pytest.raises(InputError, match="differ in shape"):
        simulate_click(np.zeros((4, 4, 4)), np.ones((4, 4, 5)))
    with pytest.raises(InputError, match="3D"):
        simulate_click(np.zeros((4, 4)), np.ones((4, 4)))


def brute_force_depth(mask: np.ndarray) -> np.ndarray:
    """Distance from each True voxel to the nearest False voxel, with a False ring around (float32, as edt)."""
    padded = np.pad(mask, 1)
    outside = np.argwhere(~padded)
    depth = np.zeros(padded.shape, dtype=np.float32)
    for voxel in np.argwhere(padded):
        depth[tuple(voxel)] = np.sqrt(np.float32(((outside - voxel) ** 2).sum(axis=1).min()))
    return depth[1:-1, 1:-1, 1:-1]


def reference_ritm(previous: np.ndarray, truth: np.ndarray, state: np.random.RandomState):
    """The official 'ritm' rule written out plainly (distances by brute force)."""
    false_negative, false_positive = truth & ~previous, previous & ~truth
    fn_depth, fp_depth = brute_force_depth(false_negative), brute_force_depth(false_positive)
    positive = fn_depth.max() > fp_depth.max()
    depth = fn_depth if positive else fp_depth
    candidates = np.argwhere(depth > max(fn_depth.max(), fp_depth.max()) / 2.0)
    if len(candidates) == 0:
        return np.array(truth.shape) // 2, 0
    point = candidates[state.randint(len(candidates))]
    return point, int(false_negative[tuple(point)])


@pytest.mark.parametrize("seed", range(6))
def test_ritm_clicks_match_the_rule_with_exact_distances(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 10, 11)
    truth = np.zeros(shape, dtype=bool)
    truth[2:8, 1:9, 3:10] = True
    previous = np.zeros(shape, dtype=bool)
    previous[rng.integers(0, 4) : 9, 2:7, rng.integers(0, 6) : 11] = True
    previous ^= rng.random(shape) > 0.9
    index, label = simulate_click(previous, truth, random_state=np.random.RandomState(seed), method="ritm")
    expected_index, expected_label = reference_ritm(previous, truth, np.random.RandomState(seed))
    np.testing.assert_array_equal(index, expected_index)
    assert label == expected_label


def test_ritm_without_errors_clicks_the_centre_negative():
    truth = np.zeros((6, 8, 10), dtype=bool)
    truth[1:3, 1:3, 1:3] = True
    index, label = simulate_click(truth, truth, method="ritm")
    assert index.tolist() == [3, 4, 5] and label == 0
    with pytest.raises(InputError, match="unknown"):
        simulate_click(truth, truth, method="edge")


def test_the_deepest_voxel_is_the_centre_of_a_ball_in_ijk_order():
    k, j, i = np.ogrid[:21, :31, :41]
    ball = (k - 10) ** 2 + (j - 12) ** 2 + (i - 30) ** 2 <= 36
    assert deepest_voxel_ijk(ball) == (30, 12, 10)


def test_the_deepest_voxel_is_deepest_in_mm_and_central_among_ties():
    k, j, i = np.ogrid[:9, :60, :60]
    disc = ((j - 30) ** 2 + (i - 30) ** 2 <= 25**2) & (k >= 2) & (k <= 6)  # 5 slices of 5 mm, 1 mm pixels
    # In voxels every voxel of the middle slice farther than 2 from the rim ties, and raster order took one
    # near the rim; in mm the slice is the shallow direction and the centre of the disc is the deepest.
    assert deepest_voxel_ijk(disc, spacing_ijk=(1.0, 1.0, 5.0)) == (30, 30, 4)
    cut = np.zeros((20, 20, 20), dtype=bool)
    cut[0:11, 4:15, 4:15] = True  # a box cut by the first slice of the volume
    assert deepest_voxel_ijk(cut) == (9, 9, 5)  # the cut is surface too: the middle of what is there


def test_the_deepest_voxel_is_found_on_the_mask_s_bounding_box_alone(monkeypatch):
    """A small target in a large volume: the distance map covers its box and a layer around it, not the volume."""
    k, j, i = np.ogrid[:120, :150, :160]
    ball = (k - 60) ** 2 + (j - 70) ** 2 + (i - 90) ** 2 <= 36
    ball |= (k == 60) & (j == 70) & (i == 97)  # a lone voxel beside it widens the box on one side
    sizes = []
    distance_map = sitk.SignedMaurerDistanceMap

    def recorded(image, *args, **kwargs):
        sizes.append(image.GetSize())
        return distance_map(image, *args, **kwargs)

    monkeypatch.setattr(sitk, "SignedMaurerDistanceMap", recorded)
    assert deepest_voxel_ijk(ball, spacing_ijk=(0.8, 0.8, 2.0)) == (90, 70, 60)
    assert sizes == [(16, 15, 15)]  # i 84..97, j 64..76, k 54..66, each padded by one voxel on both sides
