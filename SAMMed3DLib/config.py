"""Model configuration, read from the shapes of a state dict so any SAM-Med3D variant loads."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Mapping

import torch

from .errors import CheckpointError, InputError
from .modeling import ImageEncoderViT3D, MaskDecoder3D, PromptEncoder3D, Sam3D
from .preprocess import ROI_SIZE

# Fixed by the official builder; not recoverable from weights.
DECODER_NUM_HEADS = 8
# The prompt embedding is 3 axes of Fourier features, and the decoder's token-image attention splits half of
# it among its heads.
CROSS_ATTENTION_DOWNSAMPLE = 2
PROMPT_DIM_MULTIPLE = 3 * CROSS_ATTENTION_DOWNSAMPLE * DECODER_NUM_HEADS


@dataclass(frozen=True)
class ModelConfig:
    """Every size that defines a SAM-Med3D network. Defaults = the released SAM-Med3D(-turbo)."""

    img_size: int = 128
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048

    def to_dict(self) -> dict:
        data = asdict(self)
        data["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return data

    @classmethod
    def from_dict(cls, data: object, source: str = "the configuration") -> ModelConfig:
        """The configuration of `to_dict()` output or a user's JSON; missing fields keep their defaults.

        Unknown keys and wrongly typed values are refused: dropping a misspelt key would silently build the
        full-size default network instead of the one asked for.
        """
        known = list(cls.__dataclass_fields__)
        if not isinstance(data, Mapping):
            raise InputError(
                f'{source} is not a JSON object; write it as {{"field": value, ...}} with these fields: '
                f"{', '.join(known)}."
            )
        unknown = [key for key in data if key not in known]
        if unknown:
            raise InputError(
                f"{source} has unknown keys {', '.join(map(str, unknown))}; use only these keys: {', '.join(known)}."
            )
        defaults = cls()
        for name, value in data.items():
            if not _has_type_of(value, getattr(defaults, name)):
                raise InputError(
                    f"{source} gives {name} = {value!r}; give a value like the default {getattr(defaults, name)!r}."
                )
        values = dict(data)
        if "encoder_global_attn_indexes" in values:
            values["encoder_global_attn_indexes"] = tuple(values["encoder_global_attn_indexes"])
        config = cls(**values)
        problems = config.problems()
        if problems:
            raise InputError(f"{source} cannot build a network: {'; '.join(problems)}.")
        return config

    def problems(self) -> list[str]:
        """What stops this configuration from building a network the engine can run (empty when nothing)."""
        found = []
        sizes = [name for name, value in asdict(ModelConfig()).items() if _is_size(value) and name != "window_size"]
        positive = [name for name in sizes if getattr(self, name) < 1]
        found += [f"{name} is {getattr(self, name)}, it must be 1 or more" for name in positive]
        if self.window_size < 0:
            found.append(f"window_size is {self.window_size}, it must be 0 (global attention) or more")
        if self.mlp_ratio <= 0:
            found.append(f"mlp_ratio is {self.mlp_ratio}, it must be above 0")
        if positive or found:
            return found
        if self.img_size != ROI_SIZE:
            found.append(f"img_size is {self.img_size}; the engine's regions are {ROI_SIZE} voxels a side")
        if self.img_size % self.patch_size:
            found.append(f"patch_size {self.patch_size} does not divide img_size {self.img_size}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            found.append(
                f"encoder_embed_dim {self.encoder_embed_dim} is not a multiple of encoder_num_heads "
                f"{self.encoder_num_heads}"
            )
        if self.prompt_embed_dim % PROMPT_DIM_MULTIPLE:
            found.append(
                f"prompt_embed_dim {self.prompt_embed_dim} is not a multiple of {PROMPT_DIM_MULTIPLE} (3 axes "
                f"of positional encoding, half of it split among {DECODER_NUM_HEADS} decoder heads)"
            )
        if self.mask_in_chans < 4:
            found.append(f"mask_in_chans is {self.mask_in_chans}; the mask encoder needs 4 or more")
        outside = [index for index in self.encoder_global_attn_indexes if not 0 <= index < self.encoder_depth]
        if outside:
            found.append(
                f"encoder_global_attn_indexes {outside} are not blocks of a {self.encoder_depth}-block encoder"
            )
        return found


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_type_of(value: object, default: object) -> bool:
    """Whether `value` (read from JSON) can stand for `default`: same kind, a list for a tuple, an int for a float."""

    def is_int(item: object) -> bool:
        return isinstance(item, int) and not isinstance(item, bool)  # JSON true is no size

    if isinstance(default, tuple):
        return isinstance(value, (list, tuple)) and all(is_int(item) for item in value)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return is_int(value)
    return is_int(value) or isinstance(value, float)


def build_model(config: ModelConfig = ModelConfig()) -> Sam3D:
    """A randomly initialised network of the given configuration (eval mode)."""
    grid = config.img_size // config.patch_size
    model = Sam3D(
        image_encoder=ImageEncoderViT3D(
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            mlp_ratio=config.mlp_ratio,
            out_chans=config.prompt_embed_dim,
            qkv_bias=config.qkv_bias,
            window_size=config.window_size,
            global_attn_indexes=config.encoder_global_attn_indexes,
        ),
        prompt_encoder=PromptEncoder3D(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid, grid),
            input_image_size=(config.img_size,) * 3,
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder3D(
            transformer_dim=config.prompt_embed_dim,
            num_multimask_outputs=config.num_multimask_outputs,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
            transformer_depth=config.decoder_depth,
            transformer_mlp_dim=config.decoder_mlp_dim,
            transformer_num_heads=DECODER_NUM_HEADS,
        ),
    )
    return model.eval()


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(
            f"The checkpoint has no '{key}': it is not a SAM-Med3D model "
            "(use an official SAM-Med3D / SAM-Med3D-turbo file or a fine-tune of one)."
        )
    return tuple(state[key].shape)


def _count_indexed(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indexes = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(indexes) + 1 if indexes else 0


def config_from_state_dict(state: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Read the architecture from a state dict's keys and shapes."""
    pos_embed = _shape(state, "image_encoder.pos_embed")
    if len(pos_embed) != 5:
        raise CheckpointError(
            f"image_encoder.pos_embed has shape {list(pos_embed)}, not (1, g, g, g, dim): this looks like a 2D SAM "
            "checkpoint, not SAM-Med3D; use a SAM-Med3D (3D) checkpoint."
        )
    grid, embed_dim = pos_embed[1], pos_embed[4]
    patch_size = _shape(state, "image_encoder.patch_embed.proj.weight")[-1]
    depth = _count_indexed(state, "image_encoder.blocks.")
    head_dim = _shape(state, "image_encoder.blocks.0.attn.rel_pos_d")[1]
    global_blocks, window_sizes = [], set()
    for i in range(depth):
        rows = _shape(state, f"image_encoder.blocks.{i}.attn.rel_pos_d")[0]
        if rows == 2 * grid - 1:
            global_blocks.append(i)
        else:
            window_sizes.add((rows + 1) // 2)
    if len(window_sizes) > 1:
        raise CheckpointError(f"The checkpoint mixes window sizes {sorted(window_sizes)}: not a SAM-Med3D layout.")
    prompt_dim = _shape(state, "image_encoder.neck.0.weight")[0]
    return ModelConfig(
        img_size=grid * patch_size,
        patch_size=patch_size,
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=embed_dim // head_dim,
        encoder_global_attn_indexes=tuple(global_blocks),
        window_size=window_sizes.pop() if window_sizes else 14,
        mlp_ratio=_shape(state, "image_encoder.blocks.0.mlp.lin1.weight")[0] / embed_dim,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state,
        prompt_embed_dim=prompt_dim,
        mask_in_chans=_shape(state, "prompt_encoder.mask_downscaling.3.weight")[0],
        num_multimask_outputs=_shape(state, "mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=_count_indexed(state, "mask_decoder.iou_prediction_head.layers."),
        iou_head_hidden_dim=_shape(state, "mask_decoder.iou_prediction_head.layers.0.weight")[0],
        decoder_depth=_count_indexed(state, "mask_decoder.transformer.layers."),
        decoder_mlp_dim=_shape(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
    )
