"""The SAM-Med3D model: image encoder, prompt encoder and mask decoder held together."""

from __future__ import annotations

from torch import nn

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D


class Sam3D(nn.Module):
    """Holds the three parts; callers use them directly, as every official 3D code path does.

    first_click_multimask: the weights were trained to answer a lone first click with the decoder's three
    alternative masks, to be picked by predicted IoU (SAM's answer to ambiguous clicks). Official SAM-Med3D
    checkpoints are not; their single-mask output is always used.
    """

    mask_threshold: float = 0.0

    def __init__(
        self, image_encoder: ImageEncoderViT3D, prompt_encoder: PromptEncoder3D, mask_decoder: MaskDecoder3D
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.first_click_multimask = False
