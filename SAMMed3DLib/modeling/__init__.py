"""The SAM-Med3D network: plain `nn.Module`s whose state-dict keys match the official checkpoints."""

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .sam3d import Sam3D
from .transformer import TwoWayTransformer3D

__all__ = ["ImageEncoderViT3D", "MaskDecoder3D", "PromptEncoder3D", "Sam3D", "TwoWayTransformer3D"]
