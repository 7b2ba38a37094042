"""The SAM-Med3D mask decoder: image embedding + prompt embeddings -> low-resolution mask logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm3d
from .transformer import TwoWayTransformer3D


class MaskDecoder3D(nn.Module):
    def __init__(
        self,
        transformer_dim: int = 384,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        transformer_depth: int = 2,
        transformer_mlp_dim: int = 2048,
        transformer_num_heads: int = 8,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer3D(
            depth=transformer_depth,
            embedding_dim=transformer_dim,
            num_heads=transformer_num_heads,
            mlp_dim=transformer_mlp_dim,
        )
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            DoublingConvTranspose3d(transformer_dim, transformer_dim // 4),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            DoublingConvTranspose3d(transformer_dim // 4, transformer_dim // 8),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks.

        image_embeddings (1 or B, C, 8, 8, 8); image_pe (1, C, 8, 8, 8); sparse (B, T, C);
        dense (B, C, 8, 8, 8). Returns low-resolution logits (B, 1, 32, 32, 32) and IoU (B, 1),
        or the three alternative masks (B, 3, ...) and IoUs (B, 3) with multimask_output.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou_pred[:, chosen]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens: logits (B, 4, 32, 32, 32) and IoU (B, 4)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        if image_embeddings.shape[0] != batch:
            image_embeddings = torch.repeat_interleave(image_embeddings, batch, dim=0)
        src = image_embeddings + dense_prompt_embeddings
        if image_pe.shape[0] != batch:
            image_pe = torch.repeat_interleave(image_pe, batch, dim=0)
        b, c, d, h, w = src.shape

        tokens_out, src = self.transformer(src, image_pe, tokens)
        iou_token_out = tokens_out[:, 0, :]
        mask_tokens_out = tokens_out[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, d, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, d, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, d * h * w)).reshape(b, -1, d, h, w)
        return masks, self.iou_prediction_head(iou_token_out)


class DoublingConvTranspose3d(nn.ConvTranspose3d):
    """The official 2x2x2, stride-2 transposed convolution: (B, C_in, D, H, W) -> (B, C_out, 2D, 2H, 2W).

    Its kernels do not overlap, so it is one matrix product per input voxel followed by a reshuffle of
    each voxel's 2x2x2 outputs: the same numbers up to float rounding, about twice as fast on the CPU.
    Same parameters and state-dict keys as `nn.ConvTranspose3d`.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        out = self.out_channels
        voxels = x.permute(0, 2, 3, 4, 1).reshape(-1, c)
        # Weight (C_in, C_out, 2, 2, 2): every output channel's 8 kernel taps share its bias.
        y = torch.addmm(self.bias.repeat_interleave(8), voxels, self.weight.reshape(c, out * 8))
        y = y.view(b, d, h, w, out, 2, 2, 2).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return y.reshape(b, out, 2 * d, 2 * h, 2 * w)


class MLP(nn.Module):
    """Plain MLP with ReLU between layers: (..., input_dim) -> (..., output_dim)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
