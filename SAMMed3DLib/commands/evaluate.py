"""`sammed3d evaluate`: the official ground-truth-driven protocol on one image and its label map."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from .. import __version__
from ..atomic import check_output_path, write_text_atomic
from ..batch import write_mask
from ..errors import InputError
from ..evaluate import OFFICIAL_SEED, EvaluationResult, chosen_values, evaluate_case, label_values
from ..imageio import check_image_output
from ..predictor import RegionPredictor
from ..volume import Volume
from .common import add_model_options, add_overwrite_option, predictor_from_args, report_fallback, seed_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="the official evaluation protocol: clicks simulated from a label map, Dice per click"
    )
    parser.add_argument("image", help="image file (NIfTI, NRRD, MHA, ...) or DICOM folder")
    parser.add_argument("label", help="label map on the image's grid (each value is one target)")
    parser.add_argument("--clicks", type=int, default=1, help="clicks per target (official default 1)")
    parser.add_argument(
        "--seed", type=seed_argument, default=OFFICIAL_SEED, help=f"seed of the click simulation ({OFFICIAL_SEED})"
    )
    parser.add_argument("--labels", help="comma-separated label values to evaluate (others count as background)")
    parser.add_argument(
        "--newest-only", action="store_true", help="pass only the newest click each step (training style)"
    )
    parser.add_argument("--out", required=True, help="merged predicted label map, e.g. pred.nii.gz")
    parser.add_argument("--report", help="JSON report with Dice per label per click count and the clicks used")
    add_overwrite_option(parser)
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.clicks < 1:
        raise InputError(f"--clicks is {args.clicks}; give 1 or more clicks per target.")
    inputs = [args.image, args.label]
    check_image_output(args.out, inputs, args.overwrite)
    if args.report:
        if Path(args.report).resolve() == Path(args.out).resolve():
            raise InputError(f"--report and --out both name {args.out}; give the report its own file (report.json).")
        check_output_path(args.report, inputs, args.overwrite)
    image, label = Volume.from_file(args.image), Volume.from_file(args.label)
    present = label_values(label)
    if not present:
        raise InputError(f"{args.label} is empty (all zero); give a label map with at least one structure.")
    # Before the model loads (a published one may first be downloaded): a label map it cannot use fails at once.
    image.check_same_grid(label)
    values = chosen_values(_parse_values(args.labels), present)
    predictor = predictor_from_args(args)
    result = evaluate_case(
        predictor, image, label, args.clicks, args.seed, accumulate_clicks=not args.newest_only, values=values
    )
    write_mask(result.mask, image, args.out, args.overwrite)
    report_fallback(predictor)
    print(dice_table(result))
    written = [str(args.out)]
    if args.report:
        contents = report(result, run_settings(args, predictor))
        written.append(str(write_text_atomic(args.report, json.dumps(contents, indent=2))))
    print(f"Wrote {' and '.join(written)}")
    return 0


def _parse_values(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--labels '{text}' must be comma-separated whole numbers, like 1,5,7.") from None


def run_settings(args: argparse.Namespace, predictor: RegionPredictor) -> dict:
    """What a report needs to be reproduced or compared: the inputs, the model and the protocol's settings."""
    return {
        "image": os.path.abspath(args.image),
        "label": os.path.abspath(args.label),
        "checkpoint": args.checkpoint or "demo (built-in)",
        "clicks": args.clicks,
        "seed": args.seed,
        "prompts": "newest click only" if args.newest_only else "every click",
        "device": str(predictor.device),
        "precision": predictor.precision,
        "sammed3d": __version__,
    }


def report(result: EvaluationResult, settings: dict | None = None) -> dict:
    """Dice per label and click count, the mean over labels, the clicks used and, when given, the run's
    `settings`."""
    per_label = {
        str(r.value): {
            "dice": r.dice_per_click,
            "iou_pred": r.iou_per_click if not r.vanished else [None] * len(r.dice_per_click),
            "vanished_at_1.5mm": r.vanished,
            "region_begin": list(r.region_begin),
            "clicks": [
                {"region_index": list(c.region_index), "positive": c.positive, "ras": list(c.ras)} for c in r.clicks
            ],
        }
        for r in result.labels
    }
    dice = np.array([r.dice_per_click for r in result.labels])
    contents = {"labels": per_label, "mean_dice": dice.mean(axis=0).tolist() if len(dice) else []}
    return contents if settings is None else {"run": settings, **contents}


def dice_table(result: EvaluationResult) -> str:
    clicks = max((len(r.dice_per_click) for r in result.labels), default=0)
    header = f"{'label':>6} " + " ".join(f"{f'{n} click' + ('s' if n > 1 else ''):>9}" for n in range(1, clicks + 1))
    rows = [header]
    for r in result.labels:
        rows.append(f"{r.value:>6} " + " ".join(f"{d:>9.4f}" for d in r.dice_per_click))
    mean = report(result)["mean_dice"]
    rows.append(f"{'mean':>6} " + " ".join(f"{d:>9.4f}" for d in mean))
    vanished = [str(r.value) for r in result.labels if r.vanished]
    if vanished:
        rows.append(
            f"Label(s) {', '.join(vanished)}: no voxel left at 1.5 mm, the model's grid (smaller than its voxels): "
            "scored 0 without a click, as the official protocol does, and counted in the mean."
        )
    return "\n".join(rows)
