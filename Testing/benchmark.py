"""Speed and memory of every inference stage, on the default architecture with random weights.

    python Testing/benchmark.py [--device cpu|cuda] [--runs N] [--pairs N] [--large] [--threads N]
                                [--precision float32|bfloat16|float16]

Prints, per stage, the median wall time of N runs (after one warm-up run) and the fastest run (the
better figure on a machine shared with other work), the peak resident memory of the process so far
and, on CUDA, the median GPU time (CUDA events) and the stage's peak GPU memory.
The yardstick is a plain 12-layer ViT-B (768-d, 12 heads, MLP 3072, pre-norm, no relative-position
terms) over the same 512 tokens, built from plain torch ops in the same run: the encoder/yardstick
ratio says how far the encoder is from the cost of an ordinary transformer of its size. The paired
ratio (the figure to quote) times the two back to back, --pairs times, and takes the median.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from SAMMed3DLib import postprocess
from SAMMed3DLib.config import build_model
from SAMMed3DLib.device import resolve_device
from SAMMed3DLib.predictor import PRECISIONS, RegionPredictor
from SAMMed3DLib.preprocess import PreparedVolume, Region
from SAMMed3DLib.session import Click, InteractiveSession, SessionResult
from SAMMed3DLib.volume import Volume

CT_SHAPE_KJI = (61, 512, 512)
LARGE_CT_SHAPE_KJI = (1000, 512, 512)
CT_SPACING_IJK = (0.7, 0.7, 5.0)


@dataclass
class Timing:
    wall_s: float
    fastest_s: float
    gpu_s: Optional[float]
    peak_gpu_mb: Optional[float]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per stage (median reported)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="float32", help="encoder autocast")
    parser.add_argument(
        "--pairs", type=int, default=15, help="back-to-back encoder/yardstick pairs for the paired ratio"
    )
    parser.add_argument("--large", action="store_true", help="also prepare a 512x512x1000 CT (peak memory)")
    parser.add_argument("--threads", type=int, default=machine_cores(), help="torch threads (default: every core)")
    arguments = parser.parse_args()
    if arguments.pairs < 2:
        parser.error("--pairs must be at least 2 (its quartiles need two ratios)")
    return arguments


def machine_cores() -> int:
    """Cores this process may run on (the affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def measure(step: Callable[[], object], runs: int, device: torch.device) -> Timing:
    """Median over `runs` calls after one warm-up call; on CUDA also GPU time and peak GPU memory."""
    cuda = device.type == "cuda"
    step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    walls, gpus = [], []
    for _ in range(runs):
        if cuda:
            start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_event.record()
        start = time.perf_counter()
        step()
        if cuda:
            end_event.record()
            torch.cuda.synchronize(device)
            gpus.append(start_event.elapsed_time(end_event) / 1000)
        walls.append(time.perf_counter() - start)
    return Timing(
        wall_s=statistics.median(walls),
        fastest_s=min(walls),
        gpu_s=statistics.median(gpus) if cuda else None,
        peak_gpu_mb=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
    )


def report(name: str, timing: Timing) -> None:
    line = f"{name:<34} {timing.wall_s:9.3f} s (fastest {timing.fastest_s:8.3f} s)   peak RSS {peak_rss_mb():6.0f} MB"
    if timing.gpu_s is not None:
        line += f"   GPU {timing.gpu_s:8.4f} s   peak GPU {timing.peak_gpu_mb:8.0f} MB"
    print(line, flush=True)


def ct_like_array(shape_kji: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An int16 CT-like array (K, J, I) and its IJK-to-RAS matrix: air around an elliptic body of soft
    tissue with noise, and a bright spine."""
    rng = np.random.default_rng(seed)
    slices, rows, columns = shape_kji
    j, i = np.mgrid[0:rows, 0:columns]
    body = ((i - columns / 2) / (0.42 * columns)) ** 2 + ((j - rows / 2) / (0.32 * rows)) ** 2 < 1
    spine = (i - columns / 2) ** 2 + (j - 0.7 * rows) ** 2 < (0.04 * columns) ** 2
    plane = np.where(body, 40, -1000).astype(np.int16)
    plane[spine] = 700
    array = np.empty(shape_kji, dtype=np.int16)
    for k in range(slices):
        array[k] = plane + rng.normal(0, 20, size=plane.shape).astype(np.int16)
    ijk_to_ras = np.diag([-CT_SPACING_IJK[0], -CT_SPACING_IJK[1], CT_SPACING_IJK[2], 1.0])
    ijk_to_ras[:3, 3] = (180.0, 180.0, -0.5 * slices * CT_SPACING_IJK[2])
    return array, ijk_to_ras


def volume_centre_ras(volume: Volume) -> np.ndarray:
    centre_ijk = (np.array(volume.size_ijk) - 1) / 2.0
    return volume.ijk_to_ras_points(centre_ijk).reshape(3)


def large_volume_stage() -> tuple[float, float, float]:
    """Time to prepare a 512x512x1000 CT, peak RSS holding only the volume, and peak RSS after preparing it."""
    large = Volume.from_array(*ct_like_array(LARGE_CT_SHAPE_KJI))
    before = peak_rss_mb()
    start = time.perf_counter()
    PreparedVolume(large)
    return time.perf_counter() - start, before, peak_rss_mb()


def large_volume_stage_report() -> None:
    """`large_volume_stage` in a new interpreter, started first: a child inherits its parent's peak RSS."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        seconds, before_mb, peak_mb = pool.submit(large_volume_stage).result()
    print(
        f"{'prepare 512x512x1000 CT':<34} {seconds:9.3f} s   (own process: peak RSS {peak_mb:.0f} MB, "
        f"{before_mb:.0f} MB of it before preparing: interpreter, array and volume)",
        flush=True,
    )


class PlainBlock(nn.Module):
    """Pre-norm transformer block with ordinary multi-head self-attention."""

    def __init__(self, dim: int = 768, heads: int = 12, mlp_dim: int = 3072) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        weights = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + self.proj((weights @ v).transpose(1, 2).reshape(b, n, dim))
        return x + self.mlp(self.norm2(x))


def yardstick_vit_b(device: torch.device) -> nn.Module:
    return nn.Sequential(*(PlainBlock() for _ in range(12))).to(device).eval()


def main() -> None:
    arguments = parse_arguments()
    device = resolve_device(arguments.device)
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(0)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}{gpu}, "
        f"encoder {arguments.precision}, "
        f"median of {arguments.runs} runs after one warm-up"
    )
    if arguments.large:
        large_volume_stage_report()
    volume, region = preprocessing_stages(arguments.runs)
    predictor = RegionPredictor(build_model(), device=device, precision=arguments.precision)
    region_input = region.network_input()  # the encoder alone: region preparation is timed above
    encoder_times = encoder_stages(predictor, region_input, arguments.runs)
    yardstick = yardstick_step(device, arguments.precision)
    yardstick_time = measure(yardstick, arguments.runs, device)
    report("yardstick: plain ViT-B, 512 tokens", yardstick_time)
    click_stages(predictor, region_input, region, volume, arguments.runs)
    session_stages(predictor, volume, arguments.runs)
    print_ratios(encoder_times, yardstick_time)
    print_paired_ratio(lambda: predictor.embed(region_input), yardstick, arguments.pairs, device)
    print(f"peak RSS {peak_rss_mb():.0f} MB")


def preprocessing_stages(runs: int) -> tuple[Volume, Region]:
    """Reading, whole-volume preparation and region extraction on a generated 512x512x61 CT."""
    cpu = torch.device("cpu")
    array, ijk_to_ras = ct_like_array(CT_SHAPE_KJI)
    report("read (array + matrix -> Volume)", measure(lambda: Volume.from_array(array, ijk_to_ras), runs, cpu))
    volume = Volume.from_array(array, ijk_to_ras)
    report("prepare (resample + reorient)", measure(lambda: PreparedVolume(volume), runs, cpu))
    prepared = PreparedVolume(volume)
    centre = volume_centre_ras(volume)
    report("region + normalisation", measure(lambda: prepared.region_centred_on(centre).network_input(), runs, cpu))
    return volume, prepared.region_centred_on(centre)


def encoder_stages(predictor: RegionPredictor, region_input: torch.Tensor, runs: int) -> dict[str, Timing]:
    """The image encoder in each attention path; leaves the default ("fast") selected."""
    encoder = predictor.model.image_encoder
    times = {}
    for path in ("fast", "fused", "reference"):
        encoder.set_attention_path(path)
        times[path] = measure(lambda: predictor.embed(region_input), runs, predictor.device)
        report(f"image encoder ({path})", times[path])
    encoder.set_attention_path("fast")
    return times


def yardstick_step(device: torch.device, precision: str) -> Callable[[], torch.Tensor]:
    """One forward pass of the yardstick over 512 random tokens, under the encoder's autocast."""
    tokens = torch.randn(1, 512, 768, device=device)
    yardstick = yardstick_vit_b(device)
    dtype = PRECISIONS[precision]

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return yardstick(tokens)

    return run


def click_stages(
    predictor: RegionPredictor, region_input: torch.Tensor, region: Region, volume: Volume, runs: int
) -> None:
    """One refinement click at the region centre, and its mask mapped back onto the original grid."""
    embedding = predictor.embed(region_input)
    points, labels = np.array([[64, 64, 64]]), np.array([1])

    def click() -> np.ndarray:
        logits, _ = predictor.decode(embedding, points, labels, None)
        return predictor.upsample_to_mask(logits)

    report("one click (decode + upsample)", measure(click, runs, predictor.device))
    mask = click()
    paste = measure(lambda: postprocess.paste_region_mask(mask, region, volume), runs, torch.device("cpu"))
    report("map back, new region (footprint + paste)", paste)
    footprint = postprocess.region_footprint(region, volume)
    report("map back, same region (paste)", measure(lambda: footprint.paste(mask), runs, torch.device("cpu")))


def session_stages(predictor: RegionPredictor, volume: Volume, runs: int) -> None:
    """What a user waits for: click to mask on the original grid, through an interactive session
    (the volume was prepared when it was chosen). First click: a new region, so the encoder runs."""
    prepared = PreparedVolume(volume)
    centre = volume_centre_ras(volume)

    def first_click() -> SessionResult:
        fresh = RegionPredictor(predictor.model, device=predictor.device, precision=predictor.precision)
        return InteractiveSession(fresh, prepared, regions="1").add_click(Click(tuple(centre)))

    report("session: first click (click to mask)", measure(first_click, runs, predictor.device))
    first = Click(tuple(centre))
    session = InteractiveSession(predictor, prepared, regions="1")
    session.add_click(first)
    offsets = iter(range(1, 10**6))

    def refinement_click() -> SessionResult:
        # A new second click each time (the first click's state is reused, as after a real first click).
        second = Click(tuple(centre + np.array([3.0, -2.0, 1.0]) * next(offsets) % 20), positive=False)
        return session.set_clicks([first, second])

    report("session: refinement click", measure(refinement_click, runs, predictor.device))


def print_ratios(encoder_times: dict[str, Timing], yardstick_time: Timing) -> None:
    """Ratios of median GPU times on CUDA; of median and of fastest wall times on the CPU."""

    def ratio(numerator: Timing, denominator: Timing) -> str:
        if denominator.gpu_s is not None:
            return f"{numerator.gpu_s / denominator.gpu_s:.2f} (GPU time)"
        median = numerator.wall_s / denominator.wall_s
        return f"{median:.2f} (fastest runs: {numerator.fastest_s / denominator.fastest_s:.2f})"

    for path, timing in encoder_times.items():
        print(f"encoder ({path}) / yardstick: {ratio(timing, yardstick_time)}")
    print(f"reference / fast encoder: {ratio(encoder_times['reference'], encoder_times['fast'])}")


def print_paired_ratio(
    encoder: Callable[[], object], yardstick: Callable[[], object], pairs: int, device: torch.device
) -> None:
    """Median of encoder/yardstick wall-time ratios over back-to-back pairs (one warm-up pair).

    Each pair runs within a second or two, so a shared machine's slow drifts in speed, which move the
    separately measured medians above, largely cancel."""
    ratios = []
    for pair in range(pairs + 1):
        encoder_s = wall_time(encoder, device)
        yardstick_s = wall_time(yardstick, device)
        if pair:
            ratios.append(encoder_s / yardstick_s)
    quartiles = statistics.quantiles(ratios, n=4)
    print(
        f"encoder (fast) / yardstick, {pairs} back-to-back pairs: median {statistics.median(ratios):.3f} "
        f"(quartiles {quartiles[0]:.3f} to {quartiles[2]:.3f})"
    )


def wall_time(step: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
