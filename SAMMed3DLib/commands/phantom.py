"""`sammed3d phantom`: write a procedural CT-like phantom (image, label map, label names)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import check_output_path
from ..phantom import DEFAULT_MAX_VOXELS, IMAGE_FILE, LABEL_FILE, LABELS_JSON, make_phantom, write_phantom
from .common import add_overwrite_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "phantom",
        help="write a synthetic CT-like volume with organ and lesion labels",
        description="Write image.nii.gz, label.nii.gz and labels.json of a procedural CT-like phantom. "
        "The same seed always gives the same phantom.",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed, a non-negative integer (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the files into")
    parser.add_argument(
        "--max-voxels",
        type=int,
        default=DEFAULT_MAX_VOXELS,
        help=f"largest voxel count; fewer gives a coarser grid with the same anatomy (default {DEFAULT_MAX_VOXELS})",
    )
    add_overwrite_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in (IMAGE_FILE, LABEL_FILE, LABELS_JSON):  # the folder may hold a case of the user's
        check_output_path(args.out / name, overwrite=args.overwrite)
    phantom = make_phantom(args.seed, max_voxels=args.max_voxels)
    image_path, label_path = write_phantom(phantom, args.out)
    size = "x".join(str(n) for n in phantom.image.GetSize())
    spacing = " x ".join(f"{s:.2f}" for s in phantom.image.GetSpacing())
    print(f"image: {image_path} ({size} voxels, {spacing} mm)")
    print(f"label: {label_path}")
    for label_id, name in sorted(phantom.label_names.items()):
        host = phantom.lesion_hosts.get(label_id)
        inside = f" (inside {phantom.label_names[host]})" if host in phantom.label_names else ""
        print(f"  {label_id}: {name}{inside}")
    return 0
