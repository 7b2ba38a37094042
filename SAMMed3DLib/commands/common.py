"""Options shared by several sub-commands."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

from ..device import DEVICE_CHOICES
from ..download import TerminalProgress
from ..predictor import PRECISIONS, RegionPredictor, load_predictor
from ..published import PUBLISHED_CHECKPOINTS


def add_model_options(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(PUBLISHED_CHECKPOINTS)
    parser.add_argument(
        "--checkpoint",
        help=f"checkpoint file, or a published name ({names}) downloaded once; default: the built-in demo model",
    )
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="where the network runs")
    parser.add_argument(
        "--precision",
        default="float32",
        choices=tuple(PRECISIONS),
        help="image-encoder precision (autocast); float32 gives the official numbers",
    )


MAX_SEED = 2**32 - 1  # what NumPy's RandomState (the official click simulation) takes; training keeps the same range


def seed_argument(text: str) -> int:
    """An argparse type: a random seed NumPy accepts, or a message that says which."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number; give a seed like 233.") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed {seed} is out of range; give a whole number from 0 to {MAX_SEED}.")
    return seed


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace output files that already exist")


@contextmanager
def download_progress(checkpoint: Optional[str]) -> Iterator[TerminalProgress]:
    """The progress bar a published checkpoint's download draws (nothing shows unless one is downloaded)."""
    progress = TerminalProgress(f"Downloading {checkpoint}")
    try:
        yield progress
    finally:
        progress.finish()


def predictor_from_args(args: argparse.Namespace) -> RegionPredictor:
    with download_progress(args.checkpoint) as progress:
        predictor = load_predictor(args.checkpoint, args.device, args.precision, progress=progress)
    if predictor.device.type == "cpu":
        print("Running on the CPU (no CUDA GPU in use): the first click of a region is the slow one.")
    return predictor


def report_fallback(predictor: RegionPredictor, stream: Optional[object] = None) -> None:
    if predictor.fell_back_to_cpu:
        print("Note: the GPU ran out of memory; the work finished on the CPU.", file=stream or sys.stderr)
