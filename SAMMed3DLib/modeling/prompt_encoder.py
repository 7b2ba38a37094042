"""The SAM-Med3D prompt encoder: clicks and a low-resolution mask to embeddings."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .common import LayerNorm3d


class PromptEncoder3D(nn.Module):
    def __init__(
        self,
        embed_dim: int = 384,
        image_embedding_size: tuple[int, int, int] = (8, 8, 8),
        input_image_size: tuple[int, int, int] = (128, 128, 128),
        mask_in_chans: int = 16,
        num_point_embeddings: int = 2,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        # 0: negative click, 1: positive click (official weights have no trained box corners).
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * s for s in image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: (1, embed_dim, d, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def forward(
        self,
        points: Optional[tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        points: (coords (B, N, 3) voxel indices in input-tensor axis order, labels (B, N): 1 positive,
        0 negative, -1 padding) or None. boxes: must be None (not supported by the released weights).
        masks: low-resolution logits (B, 1, 32, 32, 32) or None.
        Returns sparse (B, N + 1, embed_dim) and dense (B, embed_dim, 8, 8, 8) embeddings.
        """
        if boxes is not None:
            raise ValueError(
                "box prompts are not supported: the released SAM-Med3D weights were not trained with boxes"
            )
        batch = self._batch_size(points, masks)
        device = self.not_a_point_embed.weight.device
        if points is not None:
            sparse = self._embed_points(points[0], points[1])
        else:
            sparse = torch.empty((batch, 0, self.embed_dim), device=device)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        return sparse, dense

    @staticmethod
    def _batch_size(points: Optional[tuple[torch.Tensor, torch.Tensor]], masks: Optional[torch.Tensor]) -> int:
        if points is not None:
            return points[0].shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        coords = coords + 0.5  # voxel centres
        # A padding point (label -1, no +0.5 shift) is appended, as the official encoder does without boxes.
        coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
        labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        embedding = self.pe_layer.encode_points(coords, self.input_image_size)
        embedding[labels == -1] = 0.0
        embedding[labels == -1] += self.not_a_point_embed.weight
        embedding[labels == 0] += self.point_embeddings[0].weight
        embedding[labels == 1] += self.point_embeddings[1].weight
        return embedding


class PositionEmbeddingRandom3D(nn.Module):
    """Random-Fourier positional encoding with a fixed Gaussian matrix (3, F) -> 3F features."""

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Coordinates in [0, 1], (..., 3) -> (..., 3F), in float32 under any autocast: float16 moved the encoding
        of mixed-precision training by up to 0.02 from what inference computes."""
        with torch.autocast(coords.device.type, enabled=False):
            coords = (2 * coords.float() - 1) @ self.positional_encoding_gaussian_matrix.float()
        coords = 2 * math.pi * coords
        # sin, cos, sin: a quirk of the 3D port that the released weights depend on.
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Encoding of a (d, h, w) grid of cell centres: (3F, d, h, w)."""
        d, h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        along_d = ((torch.arange(d, device=device, dtype=torch.float32) + 0.5) / d)[:, None, None].expand(d, h, w)
        along_h = ((torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h)[None, :, None].expand(d, h, w)
        along_w = ((torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w)[None, None, :].expand(d, h, w)
        # The first two axes are swapped relative to point coordinates (official behaviour).
        return self._encode(torch.stack([along_h, along_d, along_w], dim=-1)).permute(3, 0, 1, 2)

    def encode_points(self, coords: torch.Tensor, image_size: tuple[int, int, int]) -> torch.Tensor:
        """Voxel coordinates (B, N, 3) in an image of `image_size` -> (B, N, 3F)."""
        scale = torch.tensor(image_size, dtype=torch.float32, device=coords.device)
        return self._encode(coords.float() / scale)
