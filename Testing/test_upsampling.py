"""Trilinear upsampling by matrix products against PyTorch's F.interpolate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from SAMMed3DLib.modeling.upsampling import linear_weights, upsample_trilinear


@pytest.mark.parametrize(
    "shape, size",
    [
        ((1, 1, 32, 32, 32), (128, 128, 128)),  # the decoder's logits to the region
        ((2, 3, 4, 5, 6), (7, 10, 13)),  # non-integer factors, batch and channels
        ((1, 1, 8, 8, 8), (3, 5, 4)),  # shrinking
        ((1, 2, 5, 6, 7), (5, 6, 7)),  # same size
    ],
)
def test_equals_interpolate_trilinear(shape, size):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 10
    expected = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    torch.testing.assert_close(upsample_trilinear(x, size), expected, atol=2e-5, rtol=1e-5)


def test_gradient_equals_interpolate_trilinear():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 6, 7, 8, requires_grad=True)
    upstream = torch.randn(1, 1, 24, 28, 32)
    (ours,) = torch.autograd.grad(upsample_trilinear(x, (24, 28, 32)), x, upstream)
    (official,) = torch.autograd.grad(F.interpolate(x, size=(24, 28, 32), mode="trilinear"), x, upstream)
    torch.testing.assert_close(ours, official, atol=1e-4, rtol=1e-5)


def test_linear_weights_rows_sum_to_one_with_at_most_two_inputs():
    weights = linear_weights(32, 128, torch.zeros(()))
    assert weights.shape == (128, 32)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(128))
    assert int((weights > 0).sum(dim=1).max()) <= 2


def test_stays_float32_under_autocast():
    x = torch.randn(1, 1, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert upsample_trilinear(x, (8, 8, 8)).dtype == torch.float32
