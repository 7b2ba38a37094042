"""`sammed3d batch`: many volumes from a CSV or JSON manifest; failures are reported, not fatal."""

from __future__ import annotations

import argparse
import sys

from ..batch import CaseOutcome, plan_outputs, read_manifest, segment_many
from ..session import PROMPT_MODES, REGION_MODES
from .common import add_model_options, add_overwrite_option, predictor_from_args, report_fallback


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("batch", help="segment many volumes listed in a CSV or JSON manifest")
    parser.add_argument("manifest", help="CSV (image,positive[,negative,space,out]) or JSON list of cases")
    parser.add_argument(
        "--out-dir",
        required=True,
        help="folder for the masks of cases without an 'out': <image name>_mask.nii.gz, or "
        "<image's folder>_<image name>_mask.nii.gz where image names repeat (e.g. case1/image.nii.gz, "
        "case2/image.nii.gz); two cases writing one file is an error",
    )
    parser.add_argument("--prompt-mode", default="newest", choices=PROMPT_MODES)
    parser.add_argument("--regions", default="auto", choices=REGION_MODES)
    add_overwrite_option(parser)
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is, so a bad manifest or folder fails before a download.
    cases = plan_outputs(read_manifest(args.manifest), args.out_dir, args.overwrite)
    predictor = predictor_from_args(args)
    outcomes = segment_many(
        predictor,
        cases,
        args.out_dir,
        args.prompt_mode,
        args.regions,
        progress=_print_progress,
        overwrite=args.overwrite,
    )
    report_fallback(predictor)
    print(summary_table(outcomes))
    failed = sum(not outcome.ok for outcome in outcomes)
    return 1 if failed else 0


def _print_progress(done: int, total: int, outcome: CaseOutcome) -> None:
    width = 30
    filled = round(width * done / total)
    state = "ok" if outcome.ok else "FAILED"
    sys.stderr.write(f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} {outcome.case.name}: {state}\n")
    if not outcome.ok:
        sys.stderr.write(f"    {outcome.error}\n")


def summary_table(outcomes: list[CaseOutcome]) -> str:
    header = (
        f"{'#':>4} {'case':<28} {'status':<7} {'voxels':>9} {'IoU':>6} {'regions':>7} {'seconds':>8}  output / error"
    )
    lines = [header, "-" * len(header)]
    for number, o in enumerate(outcomes, start=1):
        status = "ok" if o.ok else "failed"
        detail = str(o.out) if o.ok else o.error
        lines.append(
            f"{number:>4} {o.case.name:<28} {status:<7} {o.voxels:>9} {o.iou:>6.3f} {o.regions:>7} {o.seconds:>8.2f}"
            f"  {detail}"
        )
    done = sum(o.ok for o in outcomes)
    lines.append(f"{done} of {len(outcomes)} cases segmented, {len(outcomes) - done} failed")
    return "\n".join(lines)
