"""The network reproduces the official SAM-Med3D outputs (fixture parity/model_small, spec 10.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path

from SAMMed3DLib.checkpoint import load_model
from SAMMed3DLib.predictor import RegionPredictor

ATOL = 1e-4
CASES = ("A_click1_nomask", "B_click1_zeromask", "C_click2_prevlogits", "D_click2_newonly_prevlogits")


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(shared_path("fixtures/parity/model_small/io.npz")))


@pytest.fixture(scope="module")
def model():
    return load_model(shared_path("fixtures/parity/model_small/state_dict.pt"))


@pytest.fixture(scope="module")
def encoder_trace(model, reference) -> dict[str, np.ndarray]:
    """Every intermediate of the image encoder on the fixture volume."""
    encoder = model.image_encoder
    trace = {}
    with torch.inference_mode():
        x = encoder.patch_embed(torch.from_numpy(reference["input_volume"]))
        trace["enc_patch_embed"] = x.numpy()
        x = x + encoder.pos_embed
        trace["enc_after_pos_embed"] = x.numpy()
        for i, block in enumerate(encoder.blocks):
            x = block(x)
            trace[f"enc_block{i}_out"] = x.numpy()
        trace["image_embedding"] = encoder.neck(x.permute(0, 4, 1, 2, 3)).numpy()
    return trace


def test_encoder_intermediates_match(encoder_trace, reference):
    for name, value in encoder_trace.items():
        np.testing.assert_allclose(value, reference[name], atol=ATOL, rtol=0, err_msg=name)


def test_full_encoder_forward_matches_trace(model, reference):
    with torch.inference_mode():
        embedding = model.image_encoder(torch.from_numpy(reference["input_volume"]))
    np.testing.assert_allclose(embedding.numpy(), reference["image_embedding"], atol=ATOL, rtol=0)


def test_dense_positional_encoding_matches(model, reference):
    with torch.inference_mode():
        dense_pe = model.prompt_encoder.get_dense_pe()
    np.testing.assert_allclose(dense_pe.numpy(), reference["dense_pe"], atol=1e-6, rtol=0)


def test_positional_encoding_stays_float32_under_mixed_precision(model, reference):
    """Mixed-precision training runs the prompt encoder under autocast: the encoding must be inference's."""
    points = torch.tensor([[[3.0, 64.0, 127.0], [100.5, 7.25, 64.0]]])
    with torch.inference_mode():
        plain = model.prompt_encoder.pe_layer.encode_points(points, (128, 128, 128))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.prompt_encoder.pe_layer.encode_points(points, (128, 128, 128))
            dense_pe = model.prompt_encoder.get_dense_pe()
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
    np.testing.assert_allclose(dense_pe.float().numpy(), reference["dense_pe"], atol=1e-6, rtol=0)


def _prompt(reference, case):
    coords = torch.from_numpy(reference[f"{case}_point_coords"])
    labels = torch.from_numpy(reference[f"{case}_point_labels"])
    mask = reference.get(f"{case}_mask_input")
    return (coords, labels), None if mask is None else torch.from_numpy(mask)


def _assert_masks_agree(mask: np.ndarray, reference_mask: np.ndarray, reference_logits: np.ndarray) -> None:
    """Binary masks must agree wherever the reference logit is not within 1e-3 of the threshold."""
    upsampled = F.interpolate(torch.from_numpy(reference_logits), size=(128,) * 3, mode="trilinear")
    decided = upsampled.abs().numpy()[0, 0] > 1e-3
    assert decided.mean() > 0.99
    assert np.array_equal(mask[decided], reference_mask[decided])


@pytest.mark.parametrize("case", CASES)
def test_prompt_cases_match(model, reference, case):
    points, mask_input = _prompt(reference, case)
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=mask_input)
        all_masks, all_iou = model.mask_decoder.predict_masks(
            torch.from_numpy(reference["image_embedding"]), model.prompt_encoder.get_dense_pe(), sparse, dense
        )
        logits, iou = model.mask_decoder(
            image_embeddings=torch.from_numpy(reference["image_embedding"]),
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
    np.testing.assert_allclose(sparse.numpy(), reference[f"{case}_sparse_embeddings"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(dense.detach().numpy(), reference[f"{case}_dense_embeddings"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(all_masks.numpy(), reference[f"{case}_low_res_masks_all4"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(all_iou.numpy(), reference[f"{case}_iou_pred_all4"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits.numpy(), reference[f"{case}_low_res_logits"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(iou.numpy(), reference[f"{case}_iou_pred"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES[1:])
def test_predictor_end_to_end_matches(model, reference, case):
    """Region predictor: embedding, a decoder step, upsampling and thresholding, from the input volume."""
    predictor = RegionPredictor(model)
    embedding = predictor.embed(torch.from_numpy(reference["input_volume"]))
    points = reference[f"{case}_point_coords"][0]
    labels = reference[f"{case}_point_labels"][0]
    mask_input = torch.from_numpy(reference[f"{case}_mask_input"])
    previous = None if not mask_input.any() else mask_input
    logits, iou = predictor.decode(embedding, points, labels, previous)
    np.testing.assert_allclose(logits.numpy(), reference[f"{case}_low_res_logits"], atol=ATOL, rtol=0)
    assert iou == pytest.approx(float(reference[f"{case}_iou_pred"][0, 0]), abs=ATOL)
    mask = predictor.upsample_to_mask(logits)
    assert mask.dtype == np.uint8 and mask.shape == (128, 128, 128)
    _assert_masks_agree(mask, reference[f"{case}_mask128_uint8"][0, 0], reference[f"{case}_low_res_logits"])


def test_no_mask_path_differs_from_zero_mask(reference):
    """Quirk 4: the official first click feeds a zero mask through the conv stack, not no_mask_embed."""
    assert not np.allclose(
        reference["A_click1_nomask_dense_embeddings"], reference["B_click1_zeromask_dense_embeddings"]
    )
