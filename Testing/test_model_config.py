"""The default architecture has exactly the official keys and shapes; configurations read back."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path

from SAMMed3DLib.config import ModelConfig, build_model, config_from_state_dict
from SAMMed3DLib.errors import CheckpointError, InputError
from SAMMed3DLib.modeling.common import LayerNorm3d
from SAMMed3DLib.modeling.image_encoder import PatchEmbed3D, add_relative_position_terms
from SAMMed3DLib.modeling.mask_decoder import DoublingConvTranspose3d

SMALL = ModelConfig(
    encoder_embed_dim=96,
    encoder_depth=3,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(2,),
    prompt_embed_dim=48,
    decoder_mlp_dim=128,
)


def test_default_state_dict_keys_and_shapes_equal_official_list():
    official = json.loads(shared_path("fixtures/sammed3d_vitb_state_dict_shapes.json").read_text())
    ours = {key: list(value.shape) for key, value in build_model().state_dict().items()}
    assert list(ours) == list(official)
    assert ours == official


def test_default_parameter_count_matches_paper():
    assert sum(p.numel() for p in build_model().parameters()) == 100_509_232


@pytest.mark.parametrize("config", [ModelConfig(), SMALL])
def test_config_is_read_back_from_weights(config):
    assert config_from_state_dict(build_model(config).state_dict()) == config


def test_config_dict_round_trip():
    assert ModelConfig.from_dict(SMALL.to_dict()) == SMALL
    data = {"encoder_depth": 3, "encoder_global_attn_indexes": [2], "mlp_ratio": 2}
    assert ModelConfig.from_dict(data) == ModelConfig(encoder_depth=3, encoder_global_attn_indexes=(2,), mlp_ratio=2.0)


def test_a_config_with_an_unknown_key_is_refused_with_the_known_keys():
    with pytest.raises(InputError, match=r"tiny.json has unknown keys encoder_dept;.* encoder_depth, "):
        ModelConfig.from_dict({**SMALL.to_dict(), "encoder_dept": 2}, source="tiny.json")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"encoder_depth": "4"}, "encoder_depth = '4'; give a value like the default 12"),
        ({"encoder_depth": True}, "encoder_depth = True"),
        ({"encoder_global_attn_indexes": 3}, "encoder_global_attn_indexes = 3"),
        ({"qkv_bias": 1}, "qkv_bias = 1"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_a_config_value_of_the_wrong_kind_is_refused(data, message):
    with pytest.raises(InputError, match=re.escape(message)):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"encoder_embed_dim": 101}, "encoder_embed_dim 101 is not a multiple of encoder_num_heads 2"),
        ({"encoder_depth": 0}, "encoder_depth is 0, it must be 1 or more"),
        ({"window_size": -1}, "window_size is -1, it must be 0 (global attention) or more"),
        ({"patch_size": 0}, "patch_size is 0"),
        ({"patch_size": 24}, "patch_size 24 does not divide img_size 128"),
        ({"img_size": 96, "patch_size": 16}, "img_size is 96; the engine's regions are 128 voxels a side"),
        ({"prompt_embed_dim": 72}, "prompt_embed_dim 72 is not a multiple of 48"),
        ({"mask_in_chans": 2}, "mask_in_chans is 2; the mask encoder needs 4 or more"),
        ({"encoder_global_attn_indexes": [1, 4]}, "encoder_global_attn_indexes [4] are not blocks of a 3-block"),
        ({"mlp_ratio": 0}, "cannot build a network: mlp_ratio is 0, it must be above 0."),
    ],
)
def test_a_config_that_cannot_build_a_network_is_refused_saying_why(change, message):
    with pytest.raises(InputError, match=re.escape(message)):
        ModelConfig.from_dict({**SMALL.to_dict(), **change}, source="my.json")


def test_every_size_the_checks_accept_builds_a_network_that_runs():
    smallest = {"encoder_embed_dim": 3, "encoder_num_heads": 3, "prompt_embed_dim": 48, "mask_in_chans": 4}
    layers = {"encoder_depth": 1, "encoder_global_attn_indexes": [0], "decoder_depth": 1, "iou_head_depth": 1}
    model = build_model(ModelConfig.from_dict({**SMALL.to_dict(), **smallest, **layers}))
    with torch.inference_mode():
        embedding = model.image_encoder(torch.zeros(1, 1, 128, 128, 128))
        sparse, dense = model.prompt_encoder(points=None, boxes=None, masks=torch.zeros(1, 1, 32, 32, 32))
        logits, iou = model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, False)
    assert embedding.shape == (1, 48, 8, 8, 8) and logits.shape == (1, 1, 32, 32, 32) and iou.shape == (1, 1)


def test_two_dimensional_sam_is_recognised():
    state = {"image_encoder.pos_embed": torch.zeros(1, 64, 64, 768)}
    with pytest.raises(CheckpointError, match="2D SAM"):
        config_from_state_dict(state)


def test_relative_position_terms_follow_the_official_broadcast():
    """Spot-check the documented formula term by term on a small random grid."""
    torch.manual_seed(0)
    size, channels = 3, 4
    q = torch.randn(1, size**3, channels)
    tables = [torch.randn(2 * size - 1, channels) for _ in range(3)]
    out = add_relative_position_terms(torch.zeros(1, size**3, size**3), q, *tables, (size,) * 3)
    grid = q.reshape(size, size, size, channels)
    table_d, table_h, table_w = tables
    for qd, qh, qw, kd, kh, kw in [(0, 1, 2, 2, 0, 1), (2, 2, 0, 1, 1, 2), (1, 0, 1, 0, 2, 0)]:
        expected = (
            grid[qd, qh, qw] @ table_d[qd - kw + size - 1]
            + grid[qd, qh, kd] @ table_h[qh - kw + size - 1]
            + grid[qd, qh, kh] @ table_w[kh - kw + size - 1]
        )
        query = (qd * size + qh) * size + qw
        key = (kd * size + kh) * size + kw
        assert out[0, query, key].item() == pytest.approx(expected.item(), abs=1e-5)


def test_patch_embedding_equals_the_official_strided_convolution():
    torch.manual_seed(0)
    embed = PatchEmbed3D(patch_size=4, in_chans=2, embed_dim=8)
    x = torch.randn(2, 2, 8, 12, 16)  # every axis a different number of patches
    with torch.no_grad():
        tokens = embed(x)
        official = embed.proj(x).permute(0, 2, 3, 4, 1)
    assert tokens.shape == (2, 2, 3, 4, 8) and tokens.is_contiguous()
    torch.testing.assert_close(tokens, official, atol=1e-5, rtol=1e-5)


def test_doubling_transposed_convolution_equals_the_official_one_with_its_gradients():
    torch.manual_seed(0)
    conv = DoublingConvTranspose3d(6, 5)
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)  # every axis a different size
    ours = conv(x)
    official = F.conv_transpose3d(x, conv.weight, conv.bias, stride=2)
    assert ours.shape == (2, 5, 6, 8, 10)
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (x, conv.weight, conv.bias), upstream)
    official_grads = torch.autograd.grad(official, (x, conv.weight, conv.bias), upstream)
    for mine, theirs in zip(ours_grads, official_grads):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_layer_norm_3d_takes_float16_activations_beyond_256_in_float32():
    torch.manual_seed(0)
    norm = LayerNorm3d(16)
    x = torch.randn(1, 16, 2, 3, 4) * 300  # squares beyond float16's 65504
    expected = norm(x)
    half = norm(x.half())
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, expected, atol=2e-3, rtol=2e-3)


def test_patch_embedding_refuses_partial_patches():
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        PatchEmbed3D(patch_size=4, in_chans=1, embed_dim=8)(torch.zeros(1, 1, 8, 8, 10))
