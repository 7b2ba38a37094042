"""The official pipeline's geometry, regions and output files, reproduced exactly without the network.

Fixtures (spec 10.2 and fixtures/parity/README.md): `pipeline/` (synthetic "AIL" volume, no half-voxel ties)
and `pipeline_real/` (3 mm CT where every original voxel centre is a half-voxel tie).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import shared_path

from SAMMed3DLib import geometry
from SAMMed3DLib.postprocess import paste_into, paste_region_mask
from SAMMed3DLib.preprocess import PreparedVolume, begin_for_label_bbox
from SAMMed3DLib.volume import Volume

REAL_IMAGE = "data/ct_abdomen_pelvis_totalseg_3mm/image.nii.gz"


class Case:
    """One fixture folder: its JSON, its image prepared once, its label."""

    def __init__(self, folder: str, image: str, label: str, json_name: str):
        self.folder = shared_path(f"fixtures/parity/{folder}")
        self.facts = json.loads((self.folder / json_name).read_text())
        self.volume = Volume.from_file(shared_path(image) if image.startswith("data/") else self.folder / image)
        self.prepared = PreparedVolume(self.volume)
        self.label = Volume.from_file(self.folder / label)

    def arrays(self, name: str):
        return np.load(self.folder / name)

    def output(self, name: str) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(self.folder / name)))


@pytest.fixture(scope="module")
def synthetic() -> Case:
    return Case("pipeline", "input_image.nii.gz", "input_label.nii.gz", "pipeline_fixture.json")


@pytest.fixture(scope="module")
def real() -> Case:
    return Case("pipeline_real", REAL_IMAGE, "label_1_2_5.nii.gz", "pipeline_real.json")


def categories(case: Case, run: str) -> list[dict]:
    return case.facts[run]["per_category"]


def assert_grid_matches(case: Case, facts: dict) -> None:
    prepared = case.prepared
    assert list(prepared.resampled_shape) == facts["resampled_shape_before_canonical"]
    np.testing.assert_array_equal(prepared.resampled_affine, facts["resampled_affine_ras_before_canonical"])
    assert list(prepared.canonical_shape) == facts["canonical_shape"]
    np.testing.assert_array_equal(prepared.canonical_affine, facts["canonical_affine_ras"])


def assert_official_regions(case: Case, run: str, intermediates: str) -> None:
    arrays = case.arrays(intermediates)
    for facts in categories(case, run):
        category = facts["category"]
        assert_grid_matches(case, facts)
        label = case.prepared.prepare_label(case.label, category)
        box = facts["label_bbox_in_canonical"]
        present = np.argwhere(label)
        np.testing.assert_array_equal(present.min(axis=0), box["min"])
        np.testing.assert_array_equal(present.max(axis=0) + 1, box["max_exclusive"])
        begin = begin_for_label_bbox(label)
        np.testing.assert_array_equal(begin, facts["roi_begin_in_canonical_index"])
        region = case.prepared.region(begin)
        np.testing.assert_array_equal(region.affine, facts["roi_affine_ras"])
        np.testing.assert_array_equal(region.raw, arrays[f"cat{category}_roi_raw_int16"])
        np.testing.assert_array_equal(case.prepared.label_region(label, region), arrays[f"cat{category}_roi_label"])
        assert_znorm_stats(region.raw, facts)


def assert_znorm_stats(raw: np.ndarray, facts: dict) -> None:
    values = torch.from_numpy(raw).float()
    selected = values[values > 0]
    # float32 sums, as the official code takes them: their rounding depends on how many threads add them up.
    assert selected.mean().item() == pytest.approx(facts["znorm_mean"], rel=1e-6)
    assert selected.std().item() == pytest.approx(facts["znorm_std"], rel=1e-6)
    if "znorm_count" in facts:
        assert selected.numel() == facts["znorm_count"]


def assert_clicks_in_every_space(case: Case, facts: dict) -> None:
    """Each recorded click: LPS -> RAS -> canonical voxel -> region index, and back to the original grid."""
    begin = np.array(facts["roi_begin_in_canonical_index"])
    region = case.prepared.region(begin)
    for click in facts["clicks"]:
        ras = geometry.lps_to_ras(click["lps_mm"])[0]  # may lie in the zero padding, outside the volume
        np.testing.assert_array_equal(ras, click["ras_mm"])
        np.testing.assert_allclose(case.volume.ras_to_ijk(ras)[0], click["original_continuous_ijk"], atol=1e-9)
        canonical = np.array(click["canonical_resampled_index"])
        np.testing.assert_allclose(geometry.apply_affine(case.prepared.canonical_affine, canonical)[0], ras, atol=1e-9)
        np.testing.assert_array_equal(canonical - begin, click["roi_index"])
        in_region = geometry.apply_affine(region.affine, click["roi_index"])[0]
        np.testing.assert_allclose(in_region, ras, atol=1e-9)
        if np.all((canonical >= 0) & (canonical < case.prepared.canonical_shape)):  # not in the padding
            np.testing.assert_array_equal(case.prepared.canonical_voxel_of_ras(ras), canonical)
            np.testing.assert_array_equal(case.volume.points_to_ras(click["lps_mm"], "lps")[0], ras)


def merged_paste_back(case: Case, pieces) -> np.ndarray:
    merged = np.zeros(case.volume.shape_kji, dtype=np.uint8)
    for begin, region_mask, value in pieces:
        patch, box = paste_region_mask(region_mask, case.prepared.region(begin), case.volume)
        paste_into(merged, patch, box, value)
    return merged


# --------------------------------------------------------------------------------------------------
# Synthetic fixture (P1, P2, P3)


def test_p1_regions_labels_and_statistics(synthetic):
    assert_official_regions(synthetic, "P1_official_1click", "P1_official_1click_intermediates.npz")


def test_p1_whole_canonical_volume_and_network_input(synthetic):
    arrays = synthetic.arrays("P1_official_1click_intermediates.npz")
    canonical = synthetic.prepared.canonical
    assert canonical.dtype == np.int16
    np.testing.assert_array_equal(canonical, arrays["cat1_canonical_resampled_image_int16"])
    begin = categories(synthetic, "P1_official_1click")[0]["roi_begin_in_canonical_index"]
    network_input = synthetic.prepared.region(begin).network_input()
    assert network_input.shape == (1, 1, 128, 128, 128) and network_input.dtype == torch.float32
    np.testing.assert_allclose(network_input[0, 0].numpy(), arrays["cat1_roi_normalized_float32"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("run", ["P1_official_1click", "P3_official_3clicks"])
def test_p1_p3_clicks_in_every_coordinate_system(synthetic, run):
    for facts in categories(synthetic, run):
        assert_clicks_in_every_space(synthetic, facts)


def test_p2_click_centred_region(synthetic):
    facts = synthetic.facts["P2_click_centered"]
    ras = synthetic.volume.points_to_ras(facts["click_lps_mm"], "lps")[0]
    np.testing.assert_allclose(ras, facts["click_ras_mm"], atol=1e-12)
    np.testing.assert_allclose(synthetic.volume.ras_to_ijk(ras)[0], facts["click_original_continuous_ijk"], atol=1e-9)
    continuous = geometry.ras_to_continuous_ijk(synthetic.prepared.canonical_affine, ras)[0]
    np.testing.assert_allclose(continuous, facts["click_canonical_continuous_index"], atol=1e-9)
    np.testing.assert_array_equal(synthetic.prepared.canonical_voxel_of_ras(ras), facts["click_canonical_voxel"])
    region = synthetic.prepared.region_centred_on(ras)
    np.testing.assert_array_equal(region.begin, facts["roi_begin_in_canonical_index"])
    np.testing.assert_array_equal(region.ras_to_region_index(ras), facts["roi_click_index"])
    np.testing.assert_array_equal(region.affine, facts["roi_affine_ras"])
    np.testing.assert_array_equal(region.raw, synthetic.arrays("P2_click_centered_intermediates.npz")["roi_raw_int16"])
    assert_znorm_stats(region.raw, facts)


@pytest.mark.parametrize(
    "run, intermediates",
    [
        ("P1_official_1click", "P1_official_1click_intermediates.npz"),
        ("P3_official_3clicks", "P3_official_3clicks_intermediates.npz"),
    ],
)
def test_p1_p3_output_files_from_region_predictions(synthetic, run, intermediates):
    arrays = synthetic.arrays(intermediates)
    pieces = [
        (facts["roi_begin_in_canonical_index"], arrays[f"cat{facts['category']}_roi_pred_uint8"], facts["category"])
        for facts in categories(synthetic, run)
    ]
    merged = merged_paste_back(synthetic, pieces)
    np.testing.assert_array_equal(merged, synthetic.output(f"{run}_pred.nii.gz"))
    for (begin, region_mask, _), facts in zip(pieces, categories(synthetic, run)):
        patch, _ = paste_region_mask(region_mask, synthetic.prepared.region(begin), synthetic.volume)
        assert int(patch.sum()) == facts["original_grid_foreground_voxels"]


def test_p2_output_file_from_region_prediction(synthetic):
    facts = synthetic.facts["P2_click_centered"]
    region_mask = synthetic.arrays("P2_click_centered_intermediates.npz")["roi_pred_uint8"]
    merged = merged_paste_back(synthetic, [(facts["roi_begin_in_canonical_index"], region_mask, 1)])
    np.testing.assert_array_equal(merged, synthetic.output("P2_click_centered_pred.nii.gz"))


# --------------------------------------------------------------------------------------------------
# Real CT with half-voxel ties (pipeline_real)


def test_real_regions_labels_and_statistics(real):
    assert_official_regions(real, "official_1click", "official_1click_intermediates.npz")


def test_real_recorded_clicks(real):
    arrays = real.arrays("official_1click_intermediates.npz")
    for facts in categories(real, "official_1click"):
        assert_clicks_in_every_space(real, facts)
        np.testing.assert_array_equal(
            arrays[f"cat{facts['category']}_click_roi_index_per_click"], [c["roi_index"] for c in facts["clicks"]]
        )


@pytest.mark.parametrize("name", ["click1_positive", "click2_negative"])
def test_real_click_on_a_tie_resolves_like_the_official_path(real, name):
    facts = real.facts["click_centered"]
    click = facts[name]
    ras = real.volume.points_to_ras(click["lps_mm"], "lps")[0]
    np.testing.assert_array_equal(ras, click["ras_mm"])
    via_voxel = real.volume.points_to_ras(click["original_voxel_ijk"], "ijk")[0]
    np.testing.assert_array_equal(via_voxel, ras)
    continuous = geometry.ras_to_continuous_ijk(real.prepared.canonical_affine, ras)[0]
    np.testing.assert_array_equal(continuous, click["canonical_continuous_index"])  # an exact tie on every axis
    np.testing.assert_array_equal(real.prepared.canonical_voxel_of_ras(ras), click["canonical_voxel"])
    region = real.prepared.region(facts["roi_begin_in_canonical_index"])
    np.testing.assert_array_equal(region.ras_to_region_index(ras), click["roi_index"])


def test_real_click_centred_region(real):
    facts = real.facts["click_centered"]
    ras = real.volume.points_to_ras(facts["click1_positive"]["lps_mm"], "lps")[0]
    region = real.prepared.region_centred_on(ras)
    np.testing.assert_array_equal(region.begin, facts["roi_begin_in_canonical_index"])
    np.testing.assert_array_equal(region.affine, facts["roi_affine_ras"])
    np.testing.assert_array_equal(region.raw, real.arrays("click_centered_intermediates.npz")["roi_raw_int16"])
    assert_znorm_stats(region.raw, facts)


def test_real_official_output_file_from_region_predictions(real):
    arrays = real.arrays("official_1click_intermediates.npz")
    pieces = [
        (facts["roi_begin_in_canonical_index"], arrays[f"cat{facts['category']}_roi_pred_uint8"], facts["category"])
        for facts in categories(real, "official_1click")
    ]
    np.testing.assert_array_equal(merged_paste_back(real, pieces), real.output("official_1click_pred.nii.gz"))


@pytest.mark.parametrize("step", ["click1", "click2_newonly", "click2_accum"])
def test_real_click_centred_output_files_from_region_predictions(real, step):
    begin = real.facts["click_centered"]["roi_begin_in_canonical_index"]
    region_mask = real.arrays("click_centered_intermediates.npz")[f"{step}_roi_pred_uint8"]
    merged = merged_paste_back(real, [(begin, region_mask, 1)])
    np.testing.assert_array_equal(merged, real.output(f"click_centered_{step}_pred.nii.gz"))
