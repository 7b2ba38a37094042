"""Procedural CT phantoms: determinism, CT-like content, labels, geometry, resolution independence, files."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk

from SAMMed3DLib.commands import phantom as phantom_command
from SAMMed3DLib.errors import InputError
from SAMMed3DLib.phantom import MIN_MAX_VOXELS, Phantom, make_phantom, write_phantom

SMALL = 400_000  # voxels: a coarse grid, quick to generate
MEDIUM = 1_500_000


def arrays(phantom: Phantom) -> tuple[np.ndarray, np.ndarray]:
    return sitk.GetArrayFromImage(phantom.image), sitk.GetArrayFromImage(phantom.label)


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def direction_matrix(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetDirection()).reshape(3, 3)


def dilate(mask: np.ndarray, radius: tuple[int, int, int]) -> np.ndarray:
    """Box dilation by `radius` voxels per numpy axis, without wrapping around."""
    result = mask.copy()
    for axis, steps in enumerate(radius):
        grown = result.copy()
        for step in range(1, steps + 1):
            ahead = [slice(None)] * 3
            behind = [slice(None)] * 3
            ahead[axis], behind[axis] = slice(step, None), slice(None, -step)
            grown[tuple(ahead)] |= result[tuple(behind)]
            grown[tuple(behind)] |= result[tuple(ahead)]
        result = grown
    return result


def shell_radius(image: sitk.Image, millimetres: float) -> tuple[int, int, int]:
    """Voxels per numpy axis (k, j, i) covering about `millimetres`, at least one."""
    return tuple(max(1, int(round(millimetres / s))) for s in reversed(image.GetSpacing()))


def label_volumes_ml(phantom: Phantom) -> dict[int, float]:
    label = sitk.GetArrayFromImage(phantom.label)
    voxel_ml = float(np.prod(phantom.label.GetSpacing())) / 1000.0
    return {label_id: float((label == label_id).sum()) * voxel_ml for label_id in phantom.label_names}


def label_centroids_mm(phantom: Phantom) -> dict[int, np.ndarray]:
    label = sitk.GetArrayFromImage(phantom.label)
    centroids = {}
    for label_id in phantom.label_names:
        mean_index = np.argwhere(label == label_id).mean(axis=0)[::-1]  # (i, j, k)
        centroids[label_id] = np.array(phantom.label.TransformContinuousIndexToPhysicalPoint(mean_index.tolist()))
    return centroids


# ------------------------------------------------------------------------------------------ determinism


def test_the_same_seed_gives_the_same_phantom():
    first, second = make_phantom(7, max_voxels=SMALL), make_phantom(7, max_voxels=SMALL)
    assert geometry(first.image) == geometry(second.image)
    for a, b in zip(arrays(first), arrays(second)):
        np.testing.assert_array_equal(a, b)
    assert first.label_names == second.label_names
    assert first.lesion_hosts == second.lesion_hosts


def test_different_seeds_give_different_phantoms():
    first, second = make_phantom(1, max_voxels=SMALL), make_phantom(2, max_voxels=SMALL)
    assert geometry(first.image) != geometry(second.image)
    image_1, _ = arrays(first)
    image_2, _ = arrays(second)
    assert image_1.shape != image_2.shape or not np.array_equal(image_1, image_2)


# ------------------------------------------------------------------------------------------- content


@pytest.mark.parametrize("seed", [0, 4, 5])
def test_image_is_int16_hounsfield_with_air_outside_the_body(seed):
    phantom = make_phantom(seed, max_voxels=SMALL)
    assert phantom.image.GetPixelID() == sitk.sitkInt16
    assert phantom.label.GetPixelID() == sitk.sitkUInt8
    image, _ = arrays(phantom)
    assert image.min() >= -1024 and image.max() <= 3071
    # The body is an elliptical cylinder inside the field of view: the volume's corners are air.
    corners = np.concatenate(
        [
            image[k, j, i].ravel()
            for k in (slice(0, 4), slice(-4, None))
            for j in (slice(0, 4), slice(-4, None))
            for i in (slice(0, 4), slice(-4, None))
        ]
    )
    assert abs(np.median(corners) + 1000) <= 3
    assert corners.max() < -850
    assert ((image > -150) & (image < -60)).mean() > 0.005, "a fat layer"
    assert ((image > -40) & (image < 100)).mean() > 0.1, "soft tissue"
    assert (image > 300).mean() > 0.0005, "bone"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_are_organs_with_lesions_inside_and_contrast_with_their_surroundings(seed):
    phantom = make_phantom(seed, max_voxels=MEDIUM)
    image, label = arrays(phantom)
    assert set(np.unique(label).tolist()) == {0, *phantom.label_names}
    organs = [i for i, name in phantom.label_names.items() if name.startswith("organ_")]
    lesions = [i for i, name in phantom.label_names.items() if name.startswith("lesion_")]
    assert 3 <= len(organs) <= 6
    assert len(lesions) >= 1
    assert sorted(organs + lesions) == sorted(phantom.label_names)
    assert set(phantom.lesion_hosts) == set(lesions) and set(phantom.lesion_hosts.values()) <= set(organs)
    radius = shell_radius(phantom.label, 2.0)
    for label_id in phantom.label_names:
        # An organ's own lesions belong to it when finding its surroundings.
        own = [label_id, *[lesion for lesion, host in phantom.lesion_hosts.items() if host == label_id]]
        whole = np.isin(label, own)
        shell = dilate(whole, radius) & ~whole
        inside = label == label_id
        assert (image[inside] < -500).mean() < 0.01, f"label {label_id} lies inside the body"
        if inside.sum() >= 100:
            contrast = abs(image[inside].mean() - image[shell].mean())
            assert contrast >= 10.0, f"label {label_id} stands out from its surroundings ({contrast:.1f} HU)"
        if label_id in phantom.lesion_hosts:
            host_share = (label[shell] == phantom.lesion_hosts[label_id]).mean()
            assert host_share > 0.8, f"lesion {label_id} is surrounded by its organ"
        else:
            assert not np.isin(label[shell], organs).any(), f"organ {label_id} does not touch another organ"


@pytest.mark.parametrize("seed", range(12))
def test_labels_stay_off_the_volume_border_even_on_the_coarsest_grid(seed):
    _, label = arrays(make_phantom(seed, max_voxels=MIN_MAX_VOXELS))
    assert label.any()
    for axis in range(3):
        assert not np.take(label, [0, -1], axis=axis).any()


# ------------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("seed", range(10))
def test_geometry_is_a_plausible_scan_and_label_shares_the_image_grid(seed):
    phantom = make_phantom(seed, max_voxels=SMALL)
    assert geometry(phantom.label) == geometry(phantom.image)
    direction = direction_matrix(phantom.image)
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-9)
    assert abs(abs(np.linalg.det(direction)) - 1.0) < 1e-9
    spacing = np.array(phantom.image.GetSpacing())
    size = np.array(phantom.image.GetSize())
    assert np.prod(size) <= SMALL
    assert np.all(spacing >= 0.6) and np.all(spacing <= 6.0)
    # Field of view along each patient axis: 250-350 mm in-plane, 150-250 mm long (within a voxel).
    extent = size * spacing
    patient_axis = np.argmax(np.abs(direction), axis=0)
    for axis in range(3):
        low, high = (150.0, 250.0) if patient_axis[axis] == 2 else (250.0, 350.0)
        assert low - spacing[axis] <= extent[axis] <= high + spacing[axis]


def test_orientations_vary_like_real_scans():
    directions = [direction_matrix(make_phantom(seed, max_voxels=MIN_MAX_VOXELS).image) for seed in range(20)]
    permutations = {tuple(np.round(d).astype(int).ravel()) for d in directions}
    oblique = [d for d in directions if not np.allclose(np.abs(d).max(axis=0), 1.0)]
    assert len(permutations) >= 4
    assert 1 <= len(oblique) <= 10
    for d in oblique:
        angle = np.degrees(np.arccos(np.clip(np.abs(d).max(axis=0), -1, 1)))
        assert angle.max() < 15.0, "oblique scans are only slightly tilted"


def test_max_voxels_caps_the_grid():
    for max_voxels in (MIN_MAX_VOXELS, 1_000_000):
        assert np.prod(make_phantom(3, max_voxels=max_voxels).image.GetSize()) <= max_voxels


def test_the_same_seed_at_another_resolution_has_the_same_anatomy():
    fine, coarse = make_phantom(3), make_phantom(3, max_voxels=SMALL)
    assert np.prod(fine.image.GetSize()) > 4 * np.prod(coarse.image.GetSize())
    assert fine.label_names == coarse.label_names
    fine_volumes, coarse_volumes = label_volumes_ml(fine), label_volumes_ml(coarse)
    fine_centroids, coarse_centroids = label_centroids_mm(fine), label_centroids_mm(coarse)
    for label_id, volume in fine_volumes.items():
        if volume >= 5.0:
            assert coarse_volumes[label_id] == pytest.approx(volume, rel=0.1)
        assert np.linalg.norm(fine_centroids[label_id] - coarse_centroids[label_id]) < 3.0


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True])
def test_a_bad_seed_is_an_input_error(seed):
    with pytest.raises(InputError, match="seed"):
        make_phantom(seed)


def test_too_few_voxels_is_an_input_error():
    with pytest.raises(InputError, match="max_voxels"):
        make_phantom(0, max_voxels=MIN_MAX_VOXELS - 1)


# ----------------------------------------------------------------------------------------------- files


def test_written_files_read_back_identically(tmp_path):
    phantom = make_phantom(5, max_voxels=SMALL)
    out_dir = tmp_path / "new" / "folder"
    image_path, label_path = write_phantom(phantom, out_dir)
    assert (image_path, label_path) == (out_dir / "image.nii.gz", out_dir / "label.nii.gz")
    assert sorted(p.name for p in out_dir.iterdir()) == ["image.nii.gz", "label.nii.gz", "labels.json"]
    for written, path in ((phantom.image, image_path), (phantom.label, label_path)):
        read = sitk.ReadImage(str(path))
        assert read.GetPixelID() == written.GetPixelID()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(written))
        assert read.GetSize() == written.GetSize()
        np.testing.assert_allclose(read.GetSpacing(), written.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(read.GetOrigin(), written.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(read.GetDirection(), written.GetDirection(), atol=1e-5)
    description = json.loads((out_dir / "labels.json").read_text())
    assert description["seed"] == 5
    assert {int(k): v for k, v in description["labels"].items()} == phantom.label_names
    assert {int(k): v for k, v in description["lesion_hosts"].items()} == phantom.lesion_hosts


def test_writing_over_existing_files_replaces_them(tmp_path):
    write_phantom(make_phantom(1, max_voxels=MIN_MAX_VOXELS), tmp_path)
    second = make_phantom(2, max_voxels=MIN_MAX_VOXELS)
    _, label_path = write_phantom(second, tmp_path)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))), sitk.GetArrayFromImage(second.label)
    )
    assert json.loads((tmp_path / "labels.json").read_text())["seed"] == 2
    assert len(list(tmp_path.iterdir())) == 3


def test_a_failed_write_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    write_phantom(make_phantom(1, max_voxels=MIN_MAX_VOXELS), tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    def write_half_then_fail(image, path, use_compression):
        with open(path, "wb") as half:
            half.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(InputError, match="disk full"):
        write_phantom(make_phantom(2, max_voxels=MIN_MAX_VOXELS), tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_writing_where_a_file_stands_is_an_input_error(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="writable folder"):
        write_phantom(make_phantom(0, max_voxels=MIN_MAX_VOXELS), blocker)


# --------------------------------------------------------------------------------------------- command


def test_phantom_command_writes_the_files_and_lists_the_labels(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="sammed3d")
    phantom_command.register(parser.add_subparsers(dest="command", required=True))
    out_dir = tmp_path / "phantom"
    args = parser.parse_args(["phantom", "--seed", "4", "--out", str(out_dir), "--max-voxels", str(SMALL)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert str(out_dir / "image.nii.gz") in printed and str(out_dir / "label.nii.gz") in printed
    expected = make_phantom(4, max_voxels=SMALL)
    for label_id, name in expected.label_names.items():
        assert f"{label_id}: {name}" in printed
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / "label.nii.gz")))
    np.testing.assert_array_equal(written, sitk.GetArrayFromImage(expected.label))


def test_phantom_command_defaults_to_seed_zero_and_requires_an_output_folder():
    parser = argparse.ArgumentParser(prog="sammed3d")
    phantom_command.register(parser.add_subparsers(dest="command", required=True))
    assert parser.parse_args(["phantom", "--out", "somewhere"]).seed == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["phantom"])
