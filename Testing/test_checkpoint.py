"""Checkpoint loading: official layouts load, unsafe or broken files are refused with one clear sentence."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from conftest import TINY, shared_path

from SAMMed3DLib.checkpoint import load_model, read_state_dict, save_checkpoint
from SAMMed3DLib.config import build_model
from SAMMed3DLib.errors import CheckpointError


@pytest.fixture(scope="module")
def reference_state():
    return torch.load(shared_path("fixtures/parity/model_small/state_dict.pt"), weights_only=True)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(build_model(TINY).state_dict(), path)
    return path


def _assert_weights_equal(model, state):
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("name", ["official_format_small.pth", "official_format_small_module_prefix.pth"])
def test_official_training_checkpoints_load(name, reference_state):
    path = shared_path(f"fixtures/checkpoints/{name}")
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)  # what a naive loader runs into
    model = load_model(path)
    assert not model.training
    _assert_weights_equal(model, reference_state)


def test_bare_state_dict_loads(reference_state):
    model = load_model(shared_path("fixtures/parity/model_small/state_dict.pt"))
    _assert_weights_equal(model, reference_state)


def test_round_trip_through_official_layout(tmp_path, tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    path = tmp_path / "saved.pth"
    save_checkpoint(path, model, epoch=3, args=argparse.Namespace(lr=1e-4))
    content = torch.load(path, weights_only=False)
    assert set(content) == {"model_state_dict", "epoch", "args"}
    _assert_weights_equal(load_model(path), model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.pth", "tiny.pth"]  # no temporary left behind


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_first_click_multimask_flag_survives_saving_and_official_files_lack_it(tmp_path, tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    assert not model.first_click_multimask
    save_checkpoint(tmp_path / "single.pth", model)
    assert "first_click_multimask" not in torch.load(tmp_path / "single.pth", weights_only=True)
    model.first_click_multimask = True
    save_checkpoint(tmp_path / "multi.pth", model)
    assert load_model(tmp_path / "multi.pth").first_click_multimask
    assert not load_model(shared_path("fixtures/checkpoints/official_format_small.pth")).first_click_multimask


def test_malicious_pickle_is_refused_and_never_executed(tmp_path, tiny_checkpoint):
    marker = tmp_path / "pwned"
    state = torch.load(tiny_checkpoint, weights_only=True)
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": state, "payload": _RunsACommand(marker)}, path)
    with pytest.raises(CheckpointError, match="refused.*system"):
        load_model(path)
    assert not marker.exists()


def test_an_older_pickle_format_checkpoint_loads_with_its_args_and_is_refused_with_a_payload(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    legacy = tmp_path / "legacy.pth"
    content = {"model_state_dict": state, "args": argparse.Namespace(lr=1e-4)}
    torch.save(content, legacy, _use_new_zipfile_serialization=False)
    assert load_model(legacy) is not None
    marker = tmp_path / "pwned"
    evil = tmp_path / "legacy_evil.pth"
    torch.save(
        {"model_state_dict": state, "payload": _RunsACommand(marker)}, evil, _use_new_zipfile_serialization=False
    )
    with pytest.raises(CheckpointError, match="refused.*system"):
        load_model(evil)
    assert not marker.exists()


def test_a_made_up_numpy_dtype_class_is_refused_not_looked_up(tmp_path, tiny_checkpoint):
    import numpy.dtypes

    path = tmp_path / "forged.pth"
    torch.save({"model_state_dict": torch.load(tiny_checkpoint), "x": numpy.dtypes.Float64DType}, path)
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            archive.writestr(info, data.replace(b"Float64DType", b"Forged64DType"))
    with pytest.raises(CheckpointError, match="refused.*numpy.dtypes.Forged64DType"):
        load_model(path)


def test_numpy_scalars_beside_weights_are_accepted(tmp_path, tiny_checkpoint):
    import numpy as np

    path = tmp_path / "with_numpy.pth"
    torch.save({"model_state_dict": torch.load(tiny_checkpoint), "best_dice": np.float64(0.9)}, path)
    assert load_model(path) is not None


def test_truncated_file(tmp_path):
    source = shared_path("fixtures/checkpoints/official_format_small.pth")
    path = tmp_path / "truncated.pth"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_flipped_bit_in_the_weights_is_refused(tmp_path, tiny_checkpoint):
    data = bytearray(Path(tiny_checkpoint).read_bytes())
    with zipfile.ZipFile(tiny_checkpoint) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)  # a weight tensor's bytes
        name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    data[record.header_offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x01
    path = tmp_path / "flipped.pth"
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True) is not None  # torch.load alone takes it as it is
    with pytest.raises(CheckpointError, match=f"damaged: its record {record.filename} fails its checksum"):
        load_model(path)


def _zip_of_one_record(path, name, mutate=None):
    """A deflated zip holding one record; `mutate(bytes, offset of its local header)` edits the written archive."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, bytes(range(256)) * 400)
    data = bytearray(path.read_bytes())
    if mutate is not None:
        mutate(data, data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02"))
    path.write_bytes(bytes(data))
    return path


def _encrypted(data, local, central):
    data[local + 6] |= 1  # general-purpose flag bit 0, in the local and the central header
    data[central + 8] |= 1


def _deflate64(data, local, central):
    data[local + 8 : local + 10] = struct.pack("<H", 9)  # compression method 9, which zipfile cannot unpack
    data[central + 10 : central + 12] = struct.pack("<H", 9)


def _broken_deflate_stream(data, local, central):
    name_length = struct.unpack("<H", data[local + 26 : local + 28])[0]
    start = local + 30 + name_length
    data[start : start + 8] = b"\xff" * 8


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_encrypted, r"is a password-protected zip archive, not a PyTorch checkpoint: extract the \.pth file from it"),
        (_deflate64, r"is a zip archive packed in a way PyTorch never writes .*extract the \.pth file from it"),
        (_broken_deflate_stream, r"is damaged: a compressed record in it cannot be unpacked .*download or copy it"),
    ],
    ids=["encrypted", "deflate64", "broken-deflate"],
)
def test_zips_that_zipfile_cannot_check_are_named_not_a_traceback(tmp_path, mutate, message):
    path = _zip_of_one_record(tmp_path / "model.pth", "archive/data.pkl", mutate)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_a_zip_holding_a_checkpoint_is_named_as_the_archive_it_is(tmp_path):
    path = _zip_of_one_record(tmp_path / "model.zip", "sam_med3d_turbo.pth")
    with pytest.raises(CheckpointError, match=r"is a zip archive, not a PyTorch checkpoint: extract the \.pth file"):
        load_model(path)


def test_a_git_lfs_pointer_is_named_with_the_fix(tmp_path):
    path = tmp_path / "sam_med3d_turbo.pth"
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 452000000\n")
    with pytest.raises(CheckpointError, match="is a Git LFS pointer, not the checkpoint itself.*run git lfs pull"):
        load_model(path)


@pytest.mark.parametrize(
    "start", [b"<!DOCTYPE html>\n<html>", b"  \r\n<!doctype html><html class=''>", b"\n<HTML><head>"]
)
def test_a_saved_web_page_is_named_with_the_fix(tmp_path, start):
    path = tmp_path / "sam_med3d_turbo.pth"
    path.write_bytes(start + b"<title>sam_med3d_turbo.pth</title>" + b" " * 2000)
    with pytest.raises(CheckpointError, match="is a saved web page, not a checkpoint: download the file itself from"):
        load_model(path)


def test_numpy_arrays_beside_the_weights_are_refused_with_how_to_save_the_weights_alone(tmp_path, tiny_checkpoint):
    import numpy as np

    path = tmp_path / "with_arrays.pth"
    torch.save({"model_state_dict": torch.load(tiny_checkpoint), "dices": [np.array([0.81, 0.77])]}, path)
    with pytest.raises(CheckpointError, match="refused: it holds NumPy arrays beside the weights") as caught:
        load_model(path)
    message = str(caught.value)
    assert "in a Python you trust" in message
    assert f"torch.load({str(path)!r}, weights_only=False)" in message
    assert "torch.save({'model_state_dict': ckpt['model_state_dict']}, 'clean.pth')" in message


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(path)


def test_an_image_given_as_checkpoint_is_named_without_pytorchs_advice_to_load_unsafely(tmp_path):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkInt16), str(path))
    with pytest.raises(CheckpointError, match="not a file torch.save wrote") as error:
        load_model(path)
    assert "weights_only" not in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "absent.pth")


def test_dict_without_weights(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, path)
    with pytest.raises(CheckpointError, match="holds no model weights"):
        load_model(path)


def test_two_dimensional_sam_checkpoint(tmp_path):
    path = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 64, 64, 768)}, path)
    with pytest.raises(CheckpointError, match="2D SAM"):
        load_model(path)


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint)
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra_head.weight"] = torch.zeros(1)
    path = tmp_path / "incomplete.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert "missing keys: mask_decoder.iou_token.weight" in str(error.value)
    assert "unexpected keys: mask_decoder.extra_head.weight" in str(error.value)


def test_cvpr_box_embeddings_are_tolerated_and_logged(tmp_path, tiny_checkpoint, caplog):
    state = torch.load(tiny_checkpoint)
    state["prompt_encoder.point_embeddings.2.weight"] = torch.zeros(1, 48)
    state["prompt_encoder.point_embeddings.3.weight"] = torch.zeros(1, 48)
    path = tmp_path / "cvpr.pth"
    torch.save({"model_state_dict": state}, path)
    with caplog.at_level(logging.INFO):
        model = load_model(path)
    assert "point_embeddings.2.weight" in caplog.text
    assert len(model.prompt_encoder.point_embeddings) == 2


def test_partial_module_prefix_is_not_stripped(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint)
    key = next(iter(state))
    state[f"module.{key}"] = state.pop(key)
    path = tmp_path / "mixed.pth"
    torch.save(state, path)
    assert f"module.{key}" in read_state_dict(path)
    with pytest.raises(CheckpointError, match="not a SAM-Med3D model"):
        load_model(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_load_onto_cuda(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cuda")
    assert all(p.is_cuda for p in model.parameters())


def test_load_onto_cpu(tiny_checkpoint):
    assert all(p.device.type == "cpu" for p in load_model(tiny_checkpoint, device="cpu").parameters())


def test_checkpoint_copy_is_byte_identical_after_load(tmp_path):
    """Loading never modifies the user's file."""
    source = shared_path("fixtures/checkpoints/official_format_small.pth")
    path = tmp_path / "copy.pth"
    shutil.copy(source, path)
    load_model(path)
    assert path.read_bytes() == source.read_bytes()
