"""Trilinear upsampling of mask logits as three matrix products.

The official pipeline upsamples the decoder's 32^3 logits to the 128^3 region with
`F.interpolate(mode="trilinear", align_corners=False)`. Linear interpolation along each axis is a fixed
(n_out, n_in) matrix with two non-zero weights per row, and trilinear interpolation is their product
along the three axes, so three small matrix products give the same values up to float rounding,
about ten times faster on the CPU.
"""

from __future__ import annotations

from typing import Sequence

import torch


def upsample_trilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, d, h, w) -> (B, C, D, H, W), as `F.interpolate(x, size, mode="trilinear", align_corners=False)`.

    Runs in x's dtype with autocast off, so a float32 input keeps float32 logits for the loss.
    """
    b, c, d, h, w = x.shape
    out_d, out_h, out_w = size
    along_d, along_h, along_w = (linear_weights(n_in, n_out, x) for n_in, n_out in zip((d, h, w), size))
    with torch.autocast(x.device.type, enabled=False):
        y = x.reshape(b * c, d, h, w) @ along_w.T  # (B*C, d, h, W)
        y = along_h @ y.reshape(b * c * d, h, out_w)  # (B*C*d, H, W)
        y = along_d @ y.reshape(b * c, d, out_h * out_w)  # (B*C, D, H*W)
    return y.reshape(b, c, out_d, out_h, out_w)


def linear_weights(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation with align_corners=False, in `like`'s dtype and device.

    Output i samples the input at (i + 0.5) * n_in / n_out - 0.5, clamped at 0 (PyTorch's rule): the two
    nearest inputs, weighted by distance; past the last input, the last input alone.
    """
    source = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    high_weight = source - low
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights.index_put_((rows, low), 1 - high_weight, accumulate=True)
    weights.index_put_((rows, high), high_weight, accumulate=True)
    return weights.to(dtype=like.dtype, device=like.device)
