"""`sammed3d batch`: many volumes from a CSV or JSON manifest; failures are reported, not fatal."""

from __future__ import annotations

import argparse
import sys

from ..batch import CaseOutcome, read_manifest, segment_many
from ..session import PROMPT_MODES, REGION_MODES
from .common import add_model_options, predictor_from_args, report_fallback


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("batch", help="segment many volumes listed in a CSV or JSON manifest")
    parser.add_argument("manifest", help="CSV (image,positive,negative[,space,out]) or JSON list of cases")
    parser.add_argument("--out-dir", required=True, help="folder for the masks (<image name>_mask.nii.gz)")
    parser.add_argument("--prompt-mode", default="newest", choices=PROMPT_MODES)
    parser.add_argument("--regions", default="auto", choices=REGION_MODES)
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cases = read_manifest(args.manifest)
    predictor = predictor_from_args(args)
    outcomes = segment_many(predictor, cases, args.out_dir, args.prompt_mode, args.regions, progress=_print_progress)
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
    header = f"{'case':<28} {'status':<7} {'voxels':>9} {'IoU':>6} {'regions':>7} {'seconds':>8}  output / error"
    lines = [header, "-" * len(header)]
    for o in outcomes:
        status = "ok" if o.ok else "failed"
        detail = str(o.out) if o.ok else o.error
        lines.append(
            f"{o.case.name:<28} {status:<7} {o.voxels:>9} {o.iou:>6.3f} {o.regions:>7} {o.seconds:>8.2f}  {detail}"
        )
    done = sum(o.ok for o in outcomes)
    lines.append(f"{done} of {len(outcomes)} cases segmented, {len(outcomes) - done} failed")
    return "\n".join(lines)
