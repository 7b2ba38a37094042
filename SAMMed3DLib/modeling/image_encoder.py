"""The 3D ViT image encoder (ViTDet style) of SAM-Med3D.

Input (B, 1, S, S, S) with S = 128; output image embedding (B, out_chans, S/16, S/16, S/16).
Spatial axes are called (d, h, w) here; they are the axes (a0, a1, a2) of the input tensor.

Two attention paths give the same numbers up to float rounding: "reference" follows the official
computation step by step (windowed blocks attend over a zero-padded 14^3 window); "fast" computes only
the real tokens and folds the padding in exactly (see `windowed_attention`); "fused" is "fast" with
`F.scaled_dot_product_attention` for the last step (slower than "fast" on the CPU; on CUDA, PyTorch runs a
fused kernel where its constraints on dtype and channel widths allow, which was not measured on a GPU).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm3d, MLPBlock
from .windowed_attention import block_attention

ATTENTION_PATHS = ("fast", "fused", "reference")


class ImageEncoderViT3D(nn.Module):
    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        qkv_bias: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        attention: str = "fast",
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=grid,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )
        self.set_attention_path(attention)

    def set_attention_path(self, name: str) -> None:
        """Choose how every block computes attention: "fast" (default), "fused" or "reference"."""
        if name not in ATTENTION_PATHS:
            raise ValueError(f"attention path must be one of {', '.join(ATTENTION_PATHS)}, not {name!r}")
        self.attention_path = name
        for block in self.blocks:
            block.attention_path = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) -> (B, out_chans, S/16, S/16, S/16)."""
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        # Channels-first memory for the neck: the 3x3x3 convolution is about twice as slow channels-last.
        return self.neck(x.permute(0, 4, 1, 2, 3).contiguous())


class PatchEmbed3D(nn.Module):
    """Non-overlapping cubic patches to tokens: (B, C_in, S, S, S) -> (B, S/p, S/p, S/p, dim).

    The official strided convolution, computed as one matrix product over the flattened patches: the
    same numbers up to float rounding, faster on the CPU (much faster under bfloat16 autocast, where
    the 16^3-kernel convolution is slow) and tokens come out contiguous for every later token-wise op.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        p = self.proj.kernel_size[0]
        if d % p or h % p or w % p:
            raise ValueError(f"input sides {(d, h, w)} must be multiples of the patch size {p}")
        # (B, C, D/p, p, H/p, p, W/p, p) -> (B, D/p, H/p, W/p, C, p, p, p): the weight's (C, p, p, p) order.
        patches = x.view(b, c, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(b, d // p, h // p, w // p, c * p**3)
        return F.linear(patches, self.proj.weight.view(self.proj.out_channels, -1), self.proj.bias)


class Block(nn.Module):
    """Pre-norm transformer block; windowed (window_size > 0) or global attention."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, window_size: int, input_size: int
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attended = window_size if window_size > 0 else input_size
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attended_size=attended)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio))
        self.window_size = window_size
        self.attention_path = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, dim) -> same shape."""
        shortcut = x
        x = self.norm1(x)
        if self.attention_path != "reference":
            x = block_attention(self.attn, x, self.window_size, fused=self.attention_path == "fused")
        elif self.window_size > 0:
            x = self._windowed_attention(x)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        # The official encoder pads the 8^3 grid with zeros up to whole 14^3 windows, attends over
        # every position of the window (padding included, as keys and values), then crops back.
        # On the 8^3 grid this is a single window, and the released weights depend on it.
        d, h, w = x.shape[1:4]
        ws = self.window_size
        x = F.pad(x, (0, 0, 0, -w % ws, 0, -h % ws, 0, -d % ws))
        windows, padded = partition_windows(x, ws)
        windows = self.attn(windows)
        x = merge_windows(windows, ws, padded, x.shape[0])
        return x[:, :d, :h, :w, :].contiguous()


def partition_windows(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, D, H, W, C) with sizes divisible by the window -> (B * n_windows, ws, ws, ws, C)."""
    b, d, h, w, c = x.shape
    ws = window_size
    x = x.view(b, d // ws, ws, h // ws, ws, w // ws, ws, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws, ws, ws, c)
    return windows, (d, h, w)


def merge_windows(windows: torch.Tensor, window_size: int, padded: tuple[int, int, int], batch: int) -> torch.Tensor:
    """Inverse of `partition_windows`: -> (B, D, H, W, C)."""
    d, h, w = padded
    ws = window_size
    x = windows.view(batch, d // ws, h // ws, w // ws, ws, ws, ws, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, d, h, w, -1)


class Attention(nn.Module):
    """Multi-head self-attention over an L^3 grid with decomposed relative-position terms."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attended_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        table_rows = 2 * attended_size - 1
        self.rel_pos_d = nn.Parameter(torch.zeros(table_rows, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(table_rows, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(table_rows, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, L, L, dim) -> (B, L, L, L, dim)."""
        b, d, h, w, _ = x.shape
        n = d * h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, n, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = add_relative_position_terms(attn, q, self.rel_pos_d, self.rel_pos_h, self.rel_pos_w, (d, h, w))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(b, self.num_heads, d, h, w, -1).permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, -1)
        return self.proj(x)


def relative_position_table(size: int, table: torch.Tensor) -> torch.Tensor:
    """(2L-1, C) table -> (L, L, C) with entry [q, k] = table[q - k + L - 1]."""
    coords = torch.arange(size, device=table.device)
    offsets = coords[:, None] - coords[None, :] + (size - 1)
    return table[offsets]


def add_relative_position_terms(
    attn: torch.Tensor,
    q: torch.Tensor,
    table_d: torch.Tensor,
    table_h: torch.Tensor,
    table_w: torch.Tensor,
    size: tuple[int, int, int],
) -> torch.Tensor:
    """Add SAM-Med3D's decomposed relative-position terms to attention logits.

    attn: (B, N, N) logits over an L^3 grid (N = L^3); q: (B, N, C) unscaled queries.
    The official 3D port broadcasts its per-axis terms onto the wrong key axes (valid only because
    all three sizes are equal). The released weights were trained that way, so for query (qd, qh, qw)
    and key (kd, kh, kw) the added term is exactly
        q(qd,qh,qw).Td[qd-kw] + q(qd,qh,kd).Th[qh-kw] + q(qd,qh,kh).Tw[kh-kw].
    """
    d, h, w = size
    b, _, c = q.shape
    rd = relative_position_table(d, table_d)
    rh = relative_position_table(h, table_h)
    rw = relative_position_table(w, table_w)
    grid_q = q.reshape(b, d, h, w, c)
    term_d = torch.einsum("bdhwc,dkc->bdhwk", grid_q, rd)  # [b, qd, qh, qw, kw]
    term_h = torch.einsum("bdhwc,hkc->bdhwk", grid_q, rh)  # [b, qd, qh, kd, kw]
    term_w = torch.einsum("bdhwc,wkc->bdhwk", grid_q, rw)  # [b, qd, qh, kh, kw]
    attn = attn.view(b, d, h, w, d, h, w)
    attn = (
        attn + term_d[:, :, :, :, None, None, :] + term_h[:, :, :, None, :, None, :] + term_w[:, :, :, None, None, :, :]
    )
    return attn.view(b, d * h * w, d * h * w)
