"""`sammed3d batch`: many volumes from a CSV or JSON manifest; failures are reported, not fatal."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from ..batch import (
    EXISTING_KEPT,
    Case,
    CaseOutcome,
    case_labels,
    keeps_existing_output,
    not_run,
    plan_outputs,
    read_manifest,
    segment_many,
)
from ..errors import InputError
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
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="keep the masks already written and segment only the other cases (a batch that was stopped goes on)",
    )
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.overwrite and args.skip_existing:
        raise InputError("--overwrite replaces existing masks and --skip-existing keeps them; give one of the two.")
    # Everything that can be checked without the model is, so a bad manifest or folder fails before a download.
    cases = plan_outputs(read_manifest(args.manifest), args.out_dir, args.overwrite, args.skip_existing)
    if not any(_will_run(case, args.skip_existing) for case in cases):  # no model to load, or download
        outcomes = [not_run(case, EXISTING_KEPT) for case in cases]
        print(summary_table(outcomes))
        return 0 if all(outcome.ok for outcome in outcomes) else 1
    predictor = predictor_from_args(args)
    outcomes: list[CaseOutcome] = []
    labels = case_labels(cases)
    try:
        segment_many(
            predictor,
            cases,
            args.out_dir,
            args.prompt_mode,
            args.regions,
            progress=lambda done, total, outcome: _record(outcomes, done, total, outcome, labels[done - 1]),
            overwrite=args.overwrite,
            skip_existing=args.skip_existing,
        )
    except KeyboardInterrupt:  # the table of what was done, then the usual interrupted line and status
        stopped = [not_run(case, "not run: interrupted") for case in cases[len(outcomes) :]]
        print(summary_table(outcomes + stopped))
        print("Run the same command with --skip-existing (and without --overwrite) to segment the cases not done yet.")
        raise
    report_fallback(predictor)
    print(summary_table(outcomes))
    failed = sum(not outcome.ok for outcome in outcomes)
    return 1 if failed else 0


def _will_run(case: Case, skip_existing: bool) -> bool:
    return case.problem is None and not keeps_existing_output(case, skip_existing)


def _record(outcomes: list[CaseOutcome], done: int, total: int, outcome: CaseOutcome, label: str) -> None:
    outcomes.append(outcome)
    _print_progress(done, total, outcome, label)


def _print_progress(done: int, total: int, outcome: CaseOutcome, label: str) -> None:
    width = 30
    filled = round(width * done / total)
    state = "FAILED" if outcome.error is not None else outcome.status
    sys.stderr.write(f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} {label}: {state}\n")
    if not outcome.ok:
        sys.stderr.write(f"    {outcome.error}\n")


def summary_table(outcomes: list[CaseOutcome]) -> str:
    labels = case_labels([outcome.case for outcome in outcomes])
    case_width = max([28, *map(len, labels)])
    header = (
        f"{'#':>4} {'case':<{case_width}} {'status':<7} {'voxels':>9} {'IoU':>6} {'regions':>7} {'seconds':>8}"
        "  output / error"
    )
    lines = [header, "-" * len(header)]
    for number, (o, label) in enumerate(zip(outcomes, labels), start=1):
        detail = o.error if o.error is not None else f"{o.skipped}: {o.out}" if o.skipped else str(o.out)
        lines.append(
            f"{number:>4} {label:<{case_width}} {o.status:<7} {o.voxels:>9} {o.iou:>6.3f} {o.regions:>7}"
            f" {o.seconds:>8.2f}  {detail}"
        )
    counts = Counter(o.status for o in outcomes)
    tally = f"{counts['ok']} of {len(outcomes)} cases segmented, {counts['failed']} failed"
    lines.append(tally + (f", {counts['skipped']} skipped" if counts["skipped"] else ""))
    return "\n".join(lines)
