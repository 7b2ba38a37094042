"""Region predictor: embedding cache, decoder steps, and the CPU fallback when the GPU runs out of memory."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY

from SAMMed3DLib.config import build_model
from SAMMed3DLib.errors import InputError, SAMMed3DError
from SAMMed3DLib.predictor import RegionPredictor, load_predictor


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    return build_model(TINY)


def _volume_input(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 1, 128, 128, 128)).astype(np.float32))


def test_embedding_cache_computes_each_region_once_and_evicts_the_oldest(model):
    predictor = RegionPredictor(model, cache_size=2)
    calls = []

    def region(seed):
        return lambda: calls.append(seed) or _volume_input(seed)

    first = predictor.embedding_for("a", region(0))
    assert predictor.embedding_for("a", region(0)) is first
    predictor.embedding_for("b", region(1))
    predictor.embedding_for("c", region(2))  # evicts "a"
    predictor.embedding_for("a", region(0))
    assert calls == [0, 1, 2, 0]


def test_decode_without_points_is_a_mask_only_step(model):
    predictor = RegionPredictor(model)
    embedding = predictor.embed(_volume_input())
    logits, iou = predictor.decode(embedding, np.zeros((0, 3)), np.zeros(0))
    refined, _ = predictor.decode(embedding, np.array([[64, 64, 64]]), np.array([1]), logits)
    assert logits.shape == refined.shape == (1, 1, 32, 32, 32)
    assert not torch.equal(logits, refined) and np.isfinite(iou)
    mask = predictor.upsample_to_mask(refined)
    assert mask.shape == (128, 128, 128) and mask.dtype == np.uint8


def _first_click_alternatives(model, embedding: torch.Tensor, click: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The three alternative logits (1, 3, 32, 32, 32) and their predicted IoUs (1, 3) for a lone positive click."""
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(
            points=(torch.tensor(click[None], dtype=torch.float32), torch.tensor([[1.0]])),
            boxes=None,
            masks=torch.zeros(1, 1, 32, 32, 32),  # the all-zero mask a first step starts from
        )
        return model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, True)


def test_a_lone_first_click_takes_the_alternative_with_the_highest_iou_when_the_model_was_trained_so(model):
    multimask_model = copy.deepcopy(model)
    multimask_model.first_click_multimask = True
    predictor, single = RegionPredictor(multimask_model), RegionPredictor(model)
    embedding = predictor.embed(_volume_input())
    click = np.array([[64, 64, 64]])
    alternatives, ious = _first_click_alternatives(model, embedding, click)
    best = int(ious[0].argmax())

    logits, iou = predictor.decode(embedding, click, np.array([1]))
    torch.testing.assert_close(logits, alternatives[:, best : best + 1])
    assert iou == pytest.approx(float(ious[0, best]))
    single_logits, _ = single.decode(embedding, click, np.array([1]))
    assert not torch.equal(logits, single_logits)

    for points, labels, previous in ((click, np.array([0]), None), (click, np.array([1]), logits)):
        # a negative first click, or any later step, uses the single-mask output as always
        torch.testing.assert_close(
            predictor.decode(embedding, points, labels, previous)[0],
            single.decode(embedding, points, labels, previous)[0],
        )


def test_given_the_region_image_a_lone_first_click_takes_the_alternative_the_image_supports(model, monkeypatch):
    multimask_model = copy.deepcopy(model)
    multimask_model.first_click_multimask = True
    predictor = RegionPredictor(multimask_model)
    embedding = predictor.embed(_volume_input())
    click, image = np.array([[64, 64, 64]]), np.random.default_rng(1).standard_normal((128, 128, 128))
    alternatives, ious = _first_click_alternatives(model, embedding, click)
    for chosen in range(3):
        seen = []

        def choose(masks, region_image, point, chosen=chosen, seen=seen):
            seen.append((masks.shape, masks.dtype, region_image is image, tuple(point)))
            return chosen

        monkeypatch.setattr("SAMMed3DLib.predictor.best_supported", choose)
        logits, iou = predictor.decode(embedding, click, np.array([1]), region_image=image)
        assert seen == [((3, 128, 128, 128), torch.bool, True, (64, 64, 64))]
        torch.testing.assert_close(logits, alternatives[:, chosen : chosen + 1])
        assert iou == pytest.approx(float(ious[0, chosen]))


class _RunsOutOfGpuMemoryOnce(RegionPredictor):
    """Pretends to sit on a GPU whose memory runs out at the first encoder run."""

    def __init__(self, model, error: Exception):
        super().__init__(model)
        self.device = torch.device("cuda")
        self.error = error

    def _embed(self, region_input):
        if self.device.type == "cuda" and self.error is not None:
            error, self.error = self.error, None
            raise error
        return super()._embed(region_input)


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),  # cuBLAS's own
    ],
)
def test_out_of_gpu_memory_retries_on_the_cpu_and_says_so(model, caplog, error):
    predictor = _RunsOutOfGpuMemoryOnce(model, error)
    with caplog.at_level(logging.WARNING):
        embedding = predictor.embed(_volume_input())
    assert predictor.fell_back_to_cpu and predictor.device.type == "cpu"
    assert embedding.device.type == "cpu"
    assert "Out of GPU memory" in caplog.text
    other = _RunsOutOfGpuMemoryOnce(model, RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):  # not hidden by a move to the CPU
        other.embed(_volume_input())


def test_unknown_precision_is_refused_before_any_checkpoint_is_read(model, tmp_path):
    with pytest.raises(InputError, match="Precision 'float8' is not one of float32, bfloat16, float16"):
        RegionPredictor(model, precision="float8")
    with pytest.raises(InputError, match="Precision 'fp16'"):  # not "file does not exist"
        load_predictor(str(tmp_path / "absent.pth"), device="cpu", precision="fp16")


def test_cuda_requested_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SAMMed3DError, match="--device cpu"):
        load_predictor(None, device="cuda")


def test_on_cuda_tf32_is_off_inside_and_the_session_s_settings_are_put_back():
    """Run in a fresh process: PyTorch refuses its older TF32 flags in a process that has used the newer ones."""
    script = """
import torch
from SAMMed3DLib.predictor import _full_float32
new_api = hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision")
owners = [torch.backends.cudnn.conv if new_api else torch.backends.cudnn, torch.backends.cuda.matmul]
name, tf32, full = ("fp32_precision", "tf32", "ieee") if new_api else ("allow_tf32", True, False)
for owner in owners:
    setattr(owner, name, tf32)
with _full_float32(torch.device("cpu")):
    assert [getattr(owner, name) for owner in owners] == [tf32, tf32]
with _full_float32(torch.device("cuda")):
    assert [getattr(owner, name) for owner in owners] == [full, full]
assert [getattr(owner, name) for owner in owners] == [tf32, tf32]
print("ok")
"""
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert finished.stdout.strip() == "ok", finished.stderr


def test_a_session_that_set_tf32_the_newer_way_can_still_segment_on_the_cpu(checkpoint):
    """The older flag read under PyTorch 2.9's newer settings raises: every embedding failed."""
    script = f"""
import numpy as np, torch
from SAMMed3DLib.predictor import load_predictor
if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
    torch.backends.cudnn.conv.fp32_precision = "ieee"
predictor = load_predictor({str(checkpoint)!r}, device="cpu")
embedding = predictor.embed(torch.randn(1, 1, 128, 128, 128))
logits, iou = predictor.decode(embedding, np.array([[64, 64, 64]]), np.array([1]))
print(tuple(logits.shape))
"""
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert finished.stdout.strip() == "(1, 1, 32, 32, 32)", finished.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_path_matches_cpu(model):
    cpu = RegionPredictor(model)
    gpu = RegionPredictor(copy.deepcopy(model), device="cuda")
    volume = _volume_input()
    np.testing.assert_allclose(gpu.embed(volume).cpu().numpy(), cpu.embed(volume).numpy(), atol=1e-3)
    point, label = np.array([[64, 64, 64]]), np.array([1])
    gpu_logits, _ = gpu.decode(gpu.embed(volume), point, label)
    cpu_logits, _ = cpu.decode(cpu.embed(volume), point, label)
    np.testing.assert_allclose(gpu_logits.cpu().numpy(), cpu_logits.numpy(), atol=1e-3)


def test_reduced_precision_runs_the_encoder_under_autocast_on_the_cpu(model):
    region = _volume_input(3)
    exact = RegionPredictor(model).embed(region)
    reduced = RegionPredictor(model, precision="bfloat16").embed(region)
    assert reduced.dtype == torch.float32 and reduced.shape == exact.shape
    difference = (reduced - exact).abs().max().item()
    assert 0 < difference < 0.05 * exact.abs().max().item()
