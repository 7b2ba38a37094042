"""`sammed3d segment`: one volume, clicks in command-line order, the mask written with its geometry."""

from __future__ import annotations

import argparse

import numpy as np

from ..batch import segment_volume, write_mask
from ..errors import InputError
from ..imageio import check_image_output
from ..session import PROMPT_MODES, REGION_MODES
from ..volume import POINT_SPACES, Volume, parse_point
from .common import add_model_options, add_overwrite_option, predictor_from_args, report_fallback


class OrderedClick(argparse.Action):
    """Collects --pos and --neg into one list that keeps their command-line order."""

    def __call__(self, parser, namespace, value, option_string=None):
        clicks = list(getattr(namespace, "clicks", None) or [])
        clicks.append((parse_point(value), option_string == "--pos"))
        namespace.clicks = clicks


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment one target in an image from clicks",
        description="Segment one target in an image from positive (--pos) and negative (--neg) clicks, applied "
        "in command-line order, and write the mask on the image's grid.",
    )
    parser.add_argument("image", help="image file (NIfTI, NRRD, MHA, ...) or DICOM folder")
    parser.add_argument("--out", required=True, help="output mask file, e.g. mask.nii.gz")
    parser.add_argument("--pos", action=OrderedClick, metavar="X,Y,Z", help="positive click (repeatable)")
    parser.add_argument("--neg", action=OrderedClick, metavar="X,Y,Z", help="negative click (repeatable)")
    parser.add_argument(
        "--space", default="ras", choices=POINT_SPACES, help="coordinates of the clicks (default ras: RAS mm)"
    )
    parser.add_argument(
        "--prompt-mode",
        default="newest",
        choices=PROMPT_MODES,
        help="newest (default): each step gets its newest click and the previous mask; accumulate: every click",
    )
    parser.add_argument(
        "--regions", default="auto", choices=REGION_MODES, help="'1' = the official click-centred result only"
    )
    add_overwrite_option(parser)
    add_model_options(parser)
    parser.set_defaults(func=run, clicks=[])


def run(args: argparse.Namespace) -> int:
    if not any(positive for _, positive in args.clicks):
        raise InputError("No positive click was given: add one with --pos X,Y,Z.")
    check_image_output(args.out, inputs=[args.image], overwrite=args.overwrite)
    volume = Volume.from_file(args.image)
    volume.points_to_ras([point for point, _ in args.clicks], args.space)  # a bad point fails before a download
    predictor = predictor_from_args(args)
    result = segment_volume(predictor, volume, args.clicks, args.space, args.prompt_mode, args.regions)
    path = write_mask(result.mask, volume, args.out, args.overwrite)
    report_fallback(predictor)
    voxels = int(result.mask.sum())
    millilitres = voxels * float(np.prod(volume.spacing)) / 1000.0
    stages = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result.timings.items())
    print(
        f"Wrote {path}: {voxels} voxels ({millilitres:.1f} ml), predicted IoU {result.iou:.3f}, "
        f"{len(result.regions)} region(s); {stages}"
    )
    return 0
