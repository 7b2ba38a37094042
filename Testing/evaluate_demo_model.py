"""Evaluate a model (default: the built-in demo model) on held-out phantoms with simulated clicks.

Not a test: a script that prints a table and writes JSON. For every phantom seed (default 0..49, never used
for training) and every organ and lesion label it measures Dice on the original grid after 1, 3 and 5 clicks,
and how large the mask is against the truth (a median ratio far above 1 for lesions means their masks take in
the host organ; below 1 for organs, that they stop short), with one of two protocols:

* official (default): the ground-truth-driven protocol (spec 5.6): the region centred on the label's bounding
  box, clicks drawn from the errors of the previous prediction with NumPy's RandomState seeded 233 once per
  case (separate runs for 1, 3 and 5 clicks, as the official script does);
* session: what a user of the Slicer module or `sammed3d segment` gets: an interactive session whose first
  click is the target's deepest voxel in mm (its region is centred on that click, extended when the mask reaches a
  face), later clicks drawn from the errors on the original grid with RandomState(233) per target.

    python Testing/evaluate_demo_model.py [--checkpoint FILE] [--seeds 0-49] [--protocol official|session]
                                          [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from SAMMed3DLib.checkpoint import load_model
from SAMMed3DLib.clicks import deepest_voxel_ijk, simulate_click
from SAMMed3DLib.evaluate import OFFICIAL_SEED, evaluate_case, label_values
from SAMMed3DLib.metrics import dice
from SAMMed3DLib.phantom import Phantom, make_phantom
from SAMMed3DLib.predictor import RegionPredictor
from SAMMed3DLib.preprocess import PreparedVolume
from SAMMed3DLib.published import DEMO_CHECKPOINT
from SAMMed3DLib.session import Click, InteractiveSession
from SAMMed3DLib.volume import Volume

CLICK_COUNTS = (1, 3, 5)
PROTOCOLS = {
    "official": "bbox-centred region, clicks from errors (RandomState 233 per case), Dice on the original grid",
    "session": "interactive session, first click at the deepest voxel in mm (click-centred region), later clicks from "
    "errors on the original grid (RandomState 233 per target), Dice on the original grid",
}


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    return seeds


def evaluate(checkpoint: Path, seeds: list[int], accumulate: bool, protocol: str = "official") -> list[dict]:
    predictor = RegionPredictor(load_model(checkpoint), cache_size=16)
    rows = []
    for seed in seeds:
        started = time.monotonic()
        phantom = make_phantom(seed)
        image, label = Volume(phantom.image), Volume(phantom.label, name="label")
        prepared = PreparedVolume(image)
        if protocol == "session":
            rows += session_rows(predictor, phantom, label, prepared, accumulate)
            print(f"seed {seed}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
            continue
        truth_voxels = np.bincount(label.array_kji.ravel())
        for clicks in CLICK_COUNTS:  # separate runs, each seeded per case, as the official script does
            result = evaluate_case(
                predictor, image, label, num_clicks=clicks, accumulate_clicks=accumulate, prepared=prepared
            )
            for entry in result.labels:
                dice_value, mask_voxels = entry.dice_per_click[-1], entry.voxels_per_click[-1]
                rows.append(
                    target_row(phantom, entry.value, clicks, dice_value, mask_voxels, int(truth_voxels[entry.value]))
                )
        print(f"seed {seed}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return rows


def target_row(
    phantom: Phantom, value: int, clicks: int, dice_value: float, mask_voxels: int, truth_voxels: int
) -> dict:
    """One result: a target of a phantom, whether it is a lesion or an organ, its Dice after `clicks`, and how
    large the mask is against the truth (mask voxels / truth voxels on the original grid)."""
    kind = "lesion" if value in phantom.lesion_hosts else "organ"
    return {
        "seed": phantom.seed,
        "label": value,
        "kind": kind,
        "clicks": clicks,
        "dice": dice_value,
        "volume_ratio": mask_voxels / truth_voxels,
    }


def session_rows(
    predictor: RegionPredictor, phantom: Phantom, label: Volume, prepared: PreparedVolume, accumulate: bool
) -> list[dict]:
    """The session protocol on one phantom: per target, Dice after each of CLICK_COUNTS clicks."""
    rows = []
    for value in label_values(label):
        truth = label.array_kji == value
        truth_voxels = int(np.count_nonzero(truth))
        session = InteractiveSession(predictor, prepared, prompt_mode="accumulate" if accumulate else "newest")
        random_state = np.random.RandomState(OFFICIAL_SEED)
        ijk, positive = deepest_voxel_ijk(truth, label.spacing), True
        for clicks in range(1, max(CLICK_COUNTS) + 1):
            result = session.add_click(Click(tuple(label.ijk_to_ras_points([ijk])[0]), positive=positive))
            if clicks in CLICK_COUNTS:
                mask_voxels = int(np.count_nonzero(result.mask))
                rows.append(target_row(phantom, value, clicks, dice(result.mask, truth), mask_voxels, truth_voxels))
            index_kji, positive = simulate_click(result.mask > 0, truth, random_state=random_state)
            ijk, positive = tuple(int(v) for v in index_kji[::-1]), bool(positive)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per click count and kind: mean Dice and the median volume ratio (above 1: masks too large)."""
    summary = {}
    for clicks in CLICK_COUNTS:
        entry = {}
        for kind in ("all", "organ", "lesion"):
            chosen = [r for r in rows if r["clicks"] == clicks and kind in ("all", r["kind"])]
            entry[kind] = {
                "mean": float(np.mean([r["dice"] for r in chosen])) if chosen else None,
                "median_volume_ratio": float(np.median([r["volume_ratio"] for r in chosen])) if chosen else None,
                "count": len(chosen),
            }
        summary[str(clicks)] = entry
    return summary


def print_table(summary: dict) -> None:
    print("mean Dice (median mask volume / true volume)")
    print(f"{'clicks':>6}  {'all':>22}  {'organs':>22}  {'lesions':>22}")
    for clicks, entry in summary.items():
        cells = [
            f"{entry[k]['mean']:.3f} ({entry[k]['median_volume_ratio']:.2f}) n={entry[k]['count']}"
            for k in ("all", "organ", "lesion")
        ]
        print(f"{clicks:>6}  " + "  ".join(f"{cell:>22}" for cell in cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT, help="model to evaluate (default: demo)")
    parser.add_argument("--seeds", default="0-49", help="phantom seeds, e.g. 0-49 or 0,3,7 (default 0-49)")
    parser.add_argument(
        "--prompt-mode",
        choices=("accumulate", "newest"),
        default="accumulate",
        help="pass all clicks so far (current official script) or only the newest (training style)",
    )
    parser.add_argument(
        "--protocol",
        choices=("official", "session"),
        default="official",
        help="bbox-centred official protocol, or interactive sessions starting at the deepest voxel",
    )
    parser.add_argument("--out", type=Path, default=Path("demo_model_evaluation.json"), help="JSON results file")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    started = time.monotonic()
    rows = evaluate(args.checkpoint, parse_seeds(args.seeds), args.prompt_mode == "accumulate", args.protocol)
    summary = summarise(rows)
    print_table(summary)
    result = {
        "checkpoint": str(args.checkpoint),
        "seeds": args.seeds,
        "prompt_mode": args.prompt_mode,
        "protocol": PROTOCOLS[args.protocol],
        "seconds": round(time.monotonic() - started, 1),
        "summary": summary,
        "targets": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
