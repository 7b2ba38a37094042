"""`sammed3d demo`: the main job on a built-in default. A phantom (or your image), one click, a mask,
a PNG to look at, and the Dice against the truth."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..atomic import check_output_folder
from ..batch import mask_image, segment_volume, write_mask
from ..clicks import deepest_voxel_ijk
from ..errors import InputError
from ..evaluate import label_values
from ..metrics import dice
from ..phantom import IMAGE_FILE, INCOMPLETE_KEY, LABEL_FILE, LABELS_JSON, make_phantom, write_phantom
from ..preprocess import prepare
from ..preview import save_preview
from ..volume import Volume
from .common import add_model_options, predictor_from_args, report_fallback

MASK_FILE, PREVIEW_FILE = "mask.nii.gz", "preview.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="segment a generated phantom (or your labelled image) from one click and show the result"
    )
    parser.add_argument(
        "--seed", type=int, help="phantom seed (default: the phantom already in --out, else 0; not with --image)"
    )
    parser.add_argument("--image", help="your own image instead of a phantom (needs --label)")
    parser.add_argument("--label", help="label map of --image, on the same grid")
    parser.add_argument("--target", type=int, help="label value to segment (default: the largest structure)")
    parser.add_argument("--out", default="sammed3d-demo", help="output folder (default ./sammed3d-demo)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace a {MASK_FILE} or {PREVIEW_FILE} already in --out (in a phantom folder of an earlier demo they "
        "are replaced anyway)",
    )
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.target == 0:
        raise InputError("--target 0 is the background; give the label value of a structure.")
    out = Path(args.out)
    image, label = _inputs(args, out)
    label_volume = Volume.from_sitk(label, name="label")
    label_values(label_volume)  # integer values, and a label map rather than a scan
    labels = label_volume.array_kji
    target = args.target if args.target is not None else _largest_label(labels)
    truth = labels == target
    if not truth.any():
        raise InputError(f"Label value {target} does not occur in the label map; pick one with --target.")
    click_ijk = deepest_voxel_ijk(truth, label_volume.spacing)
    volume = Volume.from_sitk(image, name="image")
    predictor = predictor_from_args(args)
    prepare(volume)  # resampled before the click, as the Slicer module does when the volume is selected
    started = time.perf_counter()
    result = segment_volume(predictor, volume, [(click_ijk, True)], space="ijk")
    seconds = time.perf_counter() - started
    mask_path = write_mask(result.mask, volume, out / MASK_FILE)
    truth_image = mask_image(truth.astype(np.uint8), volume)
    save_preview(image, mask_image(result.mask, volume), click_ijk, out / PREVIEW_FILE, truth=truth_image)
    report_fallback(predictor)
    # To 0.01 mm: a voxel centre rounded to 0.1 mm may fall on a face, and typed back it lands on the neighbour.
    ras = ", ".join(f"{v:.2f}" for v in volume.ijk_to_ras_points([click_ijk])[0])
    print(f"Target label {target}: one positive click at voxel IJK {click_ijk} = RAS ({ras}) mm")
    print(
        f"Dice against the truth: {dice(result.mask, truth):.3f}; predicted IoU {result.iou:.3f}; "
        f"{len(result.regions)} region(s); {seconds:.2f} s from click to mask "
        "(model loaded and image resampled beforehand)"
    )
    print(f"Wrote {mask_path} and {out / PREVIEW_FILE} (red: mask, green: truth, blue: both, yellow: click)")
    return 0


def _inputs(args: argparse.Namespace, out: Path) -> tuple[sitk.Image, sitk.Image]:
    if args.image:
        if args.seed is not None:
            raise InputError("--seed picks a phantom, which --image replaces; leave one of them out.")
        if not args.label:
            raise InputError("--image needs --label (the truth to click in and compare with).")
        _check_inputs_are_not_outputs(out, args.image, args.label)
        _check_result_files(out, may_replace=args.overwrite)
        pair = _image_and_label(args.image, args.label)
        check_output_folder(out)
        return pair
    if args.label:
        raise InputError("--label needs --image (the scan it labels); leave both out to use a phantom.")
    description = _phantom_description(out / LABELS_JSON)
    _check_phantom_folder(out, description)
    _check_result_files(out, may_replace=args.overwrite or description is not None)
    if _reusable(out, description, args.seed):
        # A phantom written earlier (by `sammed3d phantom`, perhaps with its own size) is segmented as it is.
        print(f"Using the phantom of seed {description['seed']} already in {out}: {IMAGE_FILE}, {LABEL_FILE}")
        return _image_and_label(out / IMAGE_FILE, out / LABEL_FILE)
    phantom = make_phantom(0 if args.seed is None else args.seed)
    image_path, label_path = write_phantom(phantom, out)
    print(f"Generated phantom seed {phantom.seed}: {image_path}, {label_path}")
    return phantom.image, phantom.label


def _image_and_label(image_path: str | Path, label_path: str | Path) -> tuple[sitk.Image, sitk.Image]:
    """An image and its label map, read and checked to share one voxel grid."""
    image, label = Volume.from_file(image_path), Volume.from_file(label_path)
    image.check_same_grid(label)
    return image.image, label.image


def _check_inputs_are_not_outputs(out: Path, *inputs: str) -> None:
    """The mask and the preview go into `out`: never over the image or label map they come from."""
    for name in (MASK_FILE, PREVIEW_FILE):
        written = (out / name).resolve()
        for given in inputs:
            if Path(given).resolve() == written:
                raise InputError(f"{given} is where the demo writes its {name}; choose another --out folder.")


def _check_result_files(out: Path, may_replace: bool) -> None:
    """A mask or preview already in `out` is someone's file unless the demo may replace it."""
    for name in (MASK_FILE, PREVIEW_FILE):
        if (out / name).exists() and not may_replace:
            raise InputError(f"{out / name} already exists; choose another --out folder or pass --overwrite.")


def _check_phantom_folder(out: Path, description: Optional[dict]) -> None:
    """A phantom replaces image.nii.gz and label.nii.gz in `out` only where they are a phantom's (`description`,
    its labels.json beside them), so a folder holding someone's scan is left alone."""
    existing = [out / name for name in (IMAGE_FILE, LABEL_FILE) if (out / name).exists()]
    if existing and description is None:
        raise InputError(
            f"{existing[0]} is not a phantom written by sammed3d; choose another --out folder "
            "(or pass --image and --label to segment that scan)."
        )


def _phantom_description(path: Path) -> Optional[dict]:
    """The labels.json of a phantom written by sammed3d, or None when `path` is none."""
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(description, dict) and "seed" in description and "labels" in description:
        return description
    return None


def _reusable(out: Path, description: Optional[dict], seed: Optional[int]) -> bool:
    """Whether `out` holds a whole phantom of `seed` (any seed when None) to segment as it is."""
    whole = description is not None and not description.get(INCOMPLETE_KEY)
    present = (out / IMAGE_FILE).exists() and (out / LABEL_FILE).exists()
    return whole and present and seed in (None, description["seed"])


def _largest_label(labels: np.ndarray) -> int:
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    if not len(values):
        if np.any(labels < 0):
            raise InputError(
                "The label map holds only negative values besides 0, and the largest structure is looked for among "
                f"values above 0: name one with --target (e.g. --target {int(labels.min())})."
            )
        raise InputError("The label map is empty; give a label map with at least one structure.")
    return int(values[np.argmax(counts)])
