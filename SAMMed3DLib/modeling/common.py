"""Building blocks shared by the encoder and the decoder."""

from __future__ import annotations

import torch
from torch import nn


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them: (..., dim) -> (..., dim)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm3d(nn.Module):
    """LayerNorm over the channels of a (B, C, D, H, W) tensor, with a per-channel affine."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> same shape; float32 whatever the input (float32 input: the official numbers)."""
        # Under autocast the input can be float16, whose squares overflow above 256 (65504 at most): the
        # variance is taken in float32. The operation order matches the official layer bit for bit.
        x = x.float()
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(variance + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]
