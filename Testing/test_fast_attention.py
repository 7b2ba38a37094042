"""The fast attention paths of the image encoder give the reference (official) numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_path

from SAMMed3DLib.checkpoint import load_model
from SAMMed3DLib.modeling import ImageEncoderViT3D, windowed_attention
from SAMMed3DLib.modeling.image_encoder import Block

FAST_PATHS = ("fast", "fused")


def random_block(
    dim: int, heads: int, window_size: int, grid: int, seed: int = 0, table_std: float = 0.5, qkv_bias: bool = True
) -> Block:
    """A block whose relative-position tables and biases are far from their trivial initial values."""
    block = Block(dim, heads, mlp_ratio=4.0, qkv_bias=qkv_bias, window_size=window_size, input_size=grid).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            if "rel_pos" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * table_std)
            elif name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return block


def block_outputs(block: Block, x: torch.Tensor, paths: tuple[str, ...]) -> dict[str, torch.Tensor]:
    outputs = {}
    for path in paths:
        block.attention_path = path
        with torch.inference_mode():
            outputs[path] = block(x)
    return outputs


def test_full_size_windowed_block_matches_reference():
    block = random_block(dim=768, heads=12, window_size=14, grid=8)
    x = torch.randn(1, 8, 8, 8, 768, generator=torch.Generator().manual_seed(1))
    outputs = block_outputs(block, x, ("reference",) + FAST_PATHS)
    assert outputs["reference"].abs().max() > 1
    for path in FAST_PATHS:
        np.testing.assert_allclose(outputs[path].numpy(), outputs["reference"].numpy(), atol=1e-5, rtol=0, err_msg=path)


@pytest.mark.parametrize(
    "window_size, grid",
    [
        (14, 8),  # the released layout: one window, 2,232 padding positions
        (14, 4),  # far more padding than real tokens
        (14, 14),  # exactly one window, no padding
        (4, 10),  # several windows, the last ones partial along every axis
        (6, 8),  # full windows beside partial windows of extent 2
        (5, 7),  # odd window size
        (0, 8),  # global attention
        (0, 3),
    ],
)
def test_odd_configurations_match_reference(window_size, grid):
    block = random_block(dim=32, heads=2, window_size=window_size, grid=grid, seed=grid + window_size)
    x = torch.randn(2, grid, grid, grid, 32, generator=torch.Generator().manual_seed(2))
    outputs = block_outputs(block, x, ("reference",) + FAST_PATHS)
    for path in FAST_PATHS:
        np.testing.assert_allclose(outputs[path].numpy(), outputs["reference"].numpy(), atol=1e-5, rtol=0, err_msg=path)


def test_heads_in_uneven_steps_match_reference():
    """CPU inference attends a few heads at a time: 2 x 5 = 10 heads is not a multiple of the step."""
    assert (2 * 5) % windowed_attention.CPU_HEADS_PER_STEP != 0
    block = random_block(dim=40, heads=5, window_size=14, grid=8, seed=7)
    x = torch.randn(2, 8, 8, 8, 40, generator=torch.Generator().manual_seed(8))
    outputs = block_outputs(block, x, ("reference", "fast"))
    np.testing.assert_allclose(outputs["fast"].numpy(), outputs["reference"].numpy(), atol=1e-5, rtol=0)


def test_without_qkv_bias_padding_tokens_project_to_zero():
    block = random_block(dim=32, heads=2, window_size=14, grid=8, seed=3, qkv_bias=False)
    assert block.attn.qkv.bias is None
    x = torch.randn(1, 8, 8, 8, 32, generator=torch.Generator().manual_seed(4))
    outputs = block_outputs(block, x, ("reference",) + FAST_PATHS)
    for path in FAST_PATHS:
        np.testing.assert_allclose(outputs[path].numpy(), outputs["reference"].numpy(), atol=1e-5, rtol=0, err_msg=path)


def test_large_logits_stay_finite_and_exact():
    """Relative-position terms in the hundreds would overflow exp() without a per-query maximum."""
    block = random_block(dim=32, heads=2, window_size=14, grid=8, table_std=30.0)
    x = torch.randn(1, 8, 8, 8, 32, generator=torch.Generator().manual_seed(3))
    outputs = block_outputs(block, x, ("reference", "fast"))
    assert torch.isfinite(outputs["fast"]).all()
    torch.testing.assert_close(outputs["fast"], outputs["reference"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("window_size, table_std", [(14, 0.5), (0, 0.5), (14, 30.0)])
def test_gradients_match_reference(window_size, table_std):
    """Training uses the fast path too; terms in the hundreds make some padding masses vanish (floored)."""
    block = random_block(dim=32, heads=2, window_size=window_size, grid=8, table_std=table_std)
    x = torch.randn(1, 8, 8, 8, 32, generator=torch.Generator().manual_seed(4))
    gradients = {}
    for path in ("reference", "fast"):
        block.zero_grad()
        block.attention_path = path
        leaf = x.clone().requires_grad_()
        block(leaf).square().sum().backward()
        gradients[path] = [leaf.grad, block.attn.rel_pos_h.grad, block.attn.qkv.weight.grad, block.attn.qkv.bias.grad]
    for fast, reference in zip(gradients["fast"], gradients["reference"]):
        assert torch.isfinite(fast).all()
        torch.testing.assert_close(fast, reference, atol=1e-4 * max(1.0, reference.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_bfloat16_autocast_runs_and_agrees(path):
    """Mixed dtypes under autocast (the predictor's reduced precision) and a bfloat16 model."""
    block = random_block(dim=32, heads=2, window_size=14, grid=8)
    x = torch.randn(1, 8, 8, 8, 32, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = block_outputs(block, x, ("reference", path))
    scale = outputs["reference"].float().abs().max()
    assert (outputs[path].float() - outputs["reference"].float()).abs().max() < 0.05 * scale
    block = block.to(torch.bfloat16)
    outputs = block_outputs(block, x.to(torch.bfloat16), ("reference", path))
    assert outputs[path].dtype == torch.bfloat16
    assert (outputs[path].float() - outputs["reference"].float()).abs().max() < 0.05 * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_cuda_fast_path_matches_reference(dtype):
    block = random_block(dim=768, heads=12, window_size=14, grid=8).cuda()
    x = torch.randn(1, 8, 8, 8, 768, generator=torch.Generator().manual_seed(6)).cuda()
    with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
        outputs = block_outputs(block, x, ("reference",) + FAST_PATHS)
    tolerance = 1e-3 if dtype is None else 0.05 * outputs["reference"].float().abs().max().item()
    for path in FAST_PATHS:
        assert outputs[path].device == x.device
        assert (outputs[path].float() - outputs["reference"].float()).abs().max() < tolerance


def test_switch_selects_every_block_and_keeps_the_state_dict_keys():
    encoder = ImageEncoderViT3D(embed_dim=32, depth=2, num_heads=2, out_chans=48, global_attn_indexes=(1,))
    assert encoder.attention_path == "fast"
    reference = ImageEncoderViT3D(
        embed_dim=32, depth=2, num_heads=2, out_chans=48, global_attn_indexes=(1,), attention="reference"
    )
    assert [block.attention_path for block in reference.blocks] == ["reference", "reference"]
    encoder.set_attention_path("fused")
    assert [block.attention_path for block in encoder.blocks] == ["fused", "fused"]
    assert list(encoder.state_dict()) == list(reference.state_dict())
    with pytest.raises(ValueError, match="attention path"):
        encoder.set_attention_path("approximate")


@pytest.fixture(scope="module")
def parity_model():
    return load_model(shared_path("fixtures/parity/model_small/state_dict.pt"))


@pytest.fixture(scope="module")
def parity_io() -> dict[str, np.ndarray]:
    return dict(np.load(shared_path("fixtures/parity/model_small/io.npz")))


@pytest.fixture(scope="module")
def parity_embeddings(parity_model, parity_io) -> dict[str, np.ndarray]:
    embeddings = {}
    for path in ("reference",) + FAST_PATHS:
        parity_model.image_encoder.set_attention_path(path)
        with torch.inference_mode():
            embeddings[path] = parity_model.image_encoder(torch.from_numpy(parity_io["input_volume"])).numpy()
    parity_model.image_encoder.set_attention_path("fast")
    return embeddings


@pytest.mark.parametrize("path", ("reference",) + FAST_PATHS)
def test_parity_fixture_embedding_in_every_path(parity_embeddings, parity_io, path):
    np.testing.assert_allclose(parity_embeddings[path], parity_io["image_embedding"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_parity_fixture_fast_paths_agree_with_reference(parity_embeddings, path):
    np.testing.assert_allclose(parity_embeddings[path], parity_embeddings["reference"], atol=2e-5, rtol=0)
