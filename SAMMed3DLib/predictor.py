"""Running the network on 128^3 regions: one image embedding per region, cheap decoder steps."""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator, Optional, Union

import numpy as np
import torch

from .errors import InputError
from .mask_choice import best_supported
from .modeling import Sam3D
from .modeling.upsampling import upsample_trilinear

log = logging.getLogger(__name__)

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RegionPredictor:
    """Owns the model on its device and a small cache of region embeddings.

    `precision` other than float32 runs the image encoder under autocast on the model's device (CUDA, or
    CPUs with native bfloat16); float32, the default, gives the official numbers.
    Running out of GPU memory moves the model to the CPU once, says so in the log, and retries.
    """

    def __init__(
        self,
        model: Sam3D,
        device: Union[str, torch.device] = "cpu",
        precision: str = "float32",
        cache_size: int = 8,
    ) -> None:
        _check_precision(precision)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.precision = precision
        self.fell_back_to_cpu = False
        self._cache: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._dense_pe: Optional[torch.Tensor] = None

    @property
    def input_size(self) -> int:
        return self.model.image_encoder.img_size

    def embedding_for(self, key: Hashable, region_input: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached embedding for `key`, computing it from `region_input()` on a miss."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        embedding = self.embed(region_input())
        self._cache[key] = embedding
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return embedding

    def embed(self, region_input: torch.Tensor) -> torch.Tensor:
        """(1, 1, S, S, S) normalised region -> image embedding (1, C, S/16, S/16, S/16)."""
        return self._with_cpu_fallback(lambda: self._embed(region_input))

    def _embed(self, region_input: torch.Tensor) -> torch.Tensor:
        dtype = PRECISIONS[self.precision]
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            embedding = self.model.image_encoder(region_input.to(self.device)).float()
        if self.device.type == "cuda":  # done here, so that stage timings give the encoder its own time
            torch.cuda.synchronize(self.device)
        return embedding

    def decode(
        self,
        embedding: torch.Tensor,
        points: np.ndarray,
        labels: np.ndarray,
        previous_logits: Optional[torch.Tensor] = None,
        region_image: Optional[np.ndarray] = None,
    ) -> tuple[torch.Tensor, float]:
        """One decoder step.

        points: (N, 3) region voxel indices in (a0, a1, a2) order (N may be 0: a mask-only step);
        labels: (N,) 1 positive / 0 negative; previous_logits: (1, 1, 32, 32, 32) or None, which
        means the all-zero mask the official pipeline starts with; region_image: the region's intensities
        (S, S, S), if given.
        Returns low-resolution logits (1, 1, 32, 32, 32) and the predicted IoU. For a lone positive first
        click of a model trained with alternative masks, those of the alternative the image supports best
        (`mask_choice`), or without `region_image` the one with the highest predicted IoU.
        """
        return self._with_cpu_fallback(lambda: self._decode(embedding, points, labels, previous_logits, region_image))

    def _decode(
        self,
        embedding: torch.Tensor,
        points: np.ndarray,
        labels: np.ndarray,
        previous_logits: Optional[torch.Tensor],
        region_image: Optional[np.ndarray],
    ) -> tuple[torch.Tensor, float]:
        prompt_encoder = self.model.prompt_encoder
        multimask = self._answers_with_alternatives(labels, previous_logits)
        with torch.inference_mode():
            if previous_logits is None:
                previous_logits = torch.zeros((1, 1, *prompt_encoder.mask_input_size), device=self.device)
            prompt_points = None
            if len(points):
                coords = torch.as_tensor(np.asarray(points, dtype=np.float32), device=self.device)[None]
                point_labels = torch.as_tensor(np.asarray(labels, dtype=np.float32), device=self.device)[None]
                prompt_points = (coords, point_labels)
            sparse, dense = prompt_encoder(points=prompt_points, boxes=None, masks=previous_logits.to(self.device))
            logits, iou = self.model.mask_decoder(
                image_embeddings=embedding.to(self.device),
                image_pe=self._image_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        if multimask and region_image is not None:
            alternatives = self._upsample(logits.permute(1, 0, 2, 3, 4))[:, 0] > 0
            picked = best_supported(alternatives.cpu(), region_image, points[0])
        else:
            picked = int(iou[0].argmax())
        return logits[:, picked : picked + 1], float(iou[0, picked])

    def _answers_with_alternatives(self, labels: np.ndarray, previous_logits: Optional[torch.Tensor]) -> bool:
        """Whether this step uses the three alternative masks: a lone positive first click, for models
        trained that way (`Sam3D.first_click_multimask`); the one with the highest predicted IoU is kept."""
        return self.model.first_click_multimask and previous_logits is None and len(labels) == 1 and int(labels[0]) == 1

    def _image_pe(self) -> torch.Tensor:
        if self._dense_pe is None or self._dense_pe.device.type != self.device.type:  # "cuda" is "cuda:0" there
            with torch.inference_mode():
                self._dense_pe = self.model.prompt_encoder.get_dense_pe()
        return self._dense_pe

    def upsample_to_mask(self, logits: torch.Tensor) -> np.ndarray:
        """Low-resolution logits -> uint8 region mask (S, S, S), as the official pipeline thresholds."""
        return (torch.sigmoid(self._upsample(logits)) > 0.5)[0, 0].to(torch.uint8).cpu().numpy()

    def _upsample(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, 1, 32, 32, 32) logits -> (B, 1, S, S, S) float32."""
        with torch.inference_mode():
            return upsample_trilinear(logits.float(), (self.input_size,) * 3)

    def _with_cpu_fallback(self, step: Callable):
        try:
            with _full_float32(self.device):
                return step()
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if self.device.type != "cuda" or not _is_gpu_out_of_memory(error):
                raise
            log.warning("Out of GPU memory: continuing on the CPU (slower).")
            self.device = torch.device("cpu")
            self.model.to(self.device)
            self._dense_pe = None
            self._cache.clear()
            torch.cuda.empty_cache()
            self.fell_back_to_cpu = True
            return step()


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"Precision '{precision}' is not one of {', '.join(PRECISIONS)}; pick one of those.")


def _is_gpu_out_of_memory(error: BaseException) -> bool:
    """PyTorch's own out-of-memory error, or cuBLAS / cuDNN failing to get their workspace (a RuntimeError)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "ALLOC_FAILED" in str(error)


@contextmanager
def _full_float32(device: torch.device) -> Iterator[None]:
    """On CUDA, float32 convolutions (cuDNN's default) and, where the session asked for it, matrix products run
    in TF32 (a 10-bit mantissa: embeddings moved by up to 2e-3 against the CPU on an H200). Float32 here means
    float32 on every device; the settings are put back afterwards, as the user's session may rely on them.
    PyTorch 2.9 has per-backend settings and refuses the older flags once they are used."""
    if device.type != "cuda":
        yield
        return
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        settings = [
            (torch.backends.cudnn.conv, "fp32_precision", "ieee"),
            (torch.backends.cuda.matmul, "fp32_precision", "ieee"),
        ]
    else:
        settings = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    kept = [getattr(owner, name) for owner, name, _ in settings]
    for owner, name, value in settings:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(settings, kept):
            setattr(owner, name, value)


def load_predictor(
    checkpoint: Optional[str] = None,
    device: str = "auto",
    precision: str = "float32",
    progress: Optional[Callable[[int, Optional[int]], Optional[bool]]] = None,
) -> RegionPredictor:
    """A predictor for a checkpoint path, a published name (downloaded once) or None (the demo model)."""
    from .checkpoint import load_model
    from .device import resolve_device
    from .published import resolve_checkpoint

    _check_precision(precision)  # before a checkpoint is downloaded or loaded
    target = resolve_device(device)
    path = resolve_checkpoint(checkpoint, progress=progress)
    return RegionPredictor(load_model(path, device="cpu"), device=target, precision=precision)
