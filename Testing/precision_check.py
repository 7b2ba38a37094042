"""How far reduced precision (autocast of the image encoder) moves the results from float32.

    python Testing/precision_check.py [--device auto|cpu|cuda] [--precision bfloat16|float16]
                                      [--seeds 0-9] [--checkpoint FILE] [--out precision.json]

Not a test: a script that prints figures. On held-out phantoms (seeds never used for training) it runs the
official ground-truth protocol with 5 clicks twice, in float32 and in the reduced precision, giving the
second run the clicks drawn in the first so that both see the same prompts. Per click it prints the
largest and the mean change of the low-resolution logits, how much the region mask changes (1 - IoU of
the two masks) and the mean Dice against the truth in both precisions. It also prints the relative change
of the image embedding of the full-size architecture (random weights: the cost and the numerics of the
official model, not its masks) on the same regions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from evaluate_demo_model import parse_seeds

from SAMMed3DLib.checkpoint import load_model
from SAMMed3DLib.config import build_model
from SAMMed3DLib.device import resolve_device
from SAMMed3DLib.evaluate import evaluate_case
from SAMMed3DLib.phantom import make_phantom
from SAMMed3DLib.predictor import PRECISIONS, RegionPredictor
from SAMMed3DLib.preprocess import PreparedVolume
from SAMMed3DLib.published import DEMO_CHECKPOINT
from SAMMed3DLib.volume import Volume

CLICKS = 5


class RecordingPredictor(RegionPredictor):
    """A predictor that keeps every decoder step's low-resolution logits (on the CPU, float32)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: list[torch.Tensor] = []

    def decode(self, embedding, points, labels, previous_logits=None, region_image=None):
        logits, iou = super().decode(embedding, points, labels, previous_logits, region_image)
        self.logits.append(logits.float().cpu())
        return logits, iou


def mask_change(exact: np.ndarray, reduced: np.ndarray) -> float:
    """1 - IoU of two binary masks (0 when both are empty)."""
    union = np.count_nonzero(exact | reduced)
    return 0.0 if union == 0 else 1.0 - np.count_nonzero(exact & reduced) / union


def compare_case(
    exact: RecordingPredictor,
    reduced: RecordingPredictor,
    seed: int,
    image: Volume,
    label: Volume,
    prepared: PreparedVolume,
) -> list[dict]:
    """One phantom: per label and click, the logit change, the mask change and both Dice values."""
    exact.logits.clear()
    reduced.logits.clear()
    first = evaluate_case(exact, image, label, num_clicks=CLICKS, prepared=prepared)
    recorded = {
        entry.value: [(click.region_index, int(click.positive)) for click in entry.clicks] for entry in first.labels
    }
    second = evaluate_case(reduced, image, label, num_clicks=CLICKS, prepared=prepared, recorded_clicks=recorded)
    steps = iter(zip(exact.logits, reduced.logits))
    rows = []
    for entry_exact, entry_reduced in zip(first.labels, second.labels):
        for click in range(len(entry_exact.clicks)):
            logits_exact, logits_reduced = next(steps)
            change = (logits_reduced - logits_exact).abs()
            rows.append(
                {
                    "seed": seed,
                    "label": entry_exact.value,
                    "clicks": click + 1,
                    "max_logit_change": change.max().item(),
                    "mean_logit_change": change.mean().item(),
                    "mask_change": mask_change(
                        exact.upsample_to_mask(logits_exact).astype(bool),
                        exact.upsample_to_mask(logits_reduced).astype(bool),
                    ),
                    "dice_float32": entry_exact.dice_per_click[click],
                    "dice_reduced": entry_reduced.dice_per_click[click],
                }
            )
    return rows


def central_region_input(prepared: PreparedVolume, size: int) -> torch.Tensor:
    """The network input of the region at the centre of the prepared volume."""
    begin = np.array(prepared.canonical_shape) // 2 - size // 2
    return prepared.region(tuple(int(b) for b in begin)).network_input()


def embedding_change(device: torch.device, precision: str, region_inputs: list[torch.Tensor]) -> list[float]:
    """Relative change (max |diff| / max |value|) of the full-size encoder's embedding, one per region."""
    torch.manual_seed(0)
    model = build_model()
    exact = RegionPredictor(model, device=device)
    reduced = RegionPredictor(model, device=device, precision=precision)
    changes = []
    for region_input in region_inputs:
        reference = exact.embed(region_input)
        changes.append(((reduced.embed(region_input) - reference).abs().max() / reference.abs().max()).item())
    return changes


def print_table(rows: list[dict]) -> None:
    print(
        f"{'clicks':>6}  {'max |dlogit|':>12}  {'mean |dlogit|':>13}  {'mask change':>11}  {'Dice fp32':>9}  "
        f"{'Dice reduced':>12}  {'max |dDice|':>11}"
    )
    for clicks in range(1, CLICKS + 1):
        chosen = [row for row in rows if row["clicks"] == clicks]
        if not chosen:
            continue
        dice_changes = [abs(row["dice_reduced"] - row["dice_float32"]) for row in chosen]
        print(
            f"{clicks:>6}  {max(row['max_logit_change'] for row in chosen):>12.4f}  "
            f"{np.mean([row['mean_logit_change'] for row in chosen]):>13.5f}  "
            f"{np.mean([row['mask_change'] for row in chosen]):>11.4f}  "
            f"{np.mean([row['dice_float32'] for row in chosen]):>9.4f}  "
            f"{np.mean([row['dice_reduced'] for row in chosen]):>12.4f}  {max(dice_changes):>11.4f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--precision", choices=[name for name in PRECISIONS if name != "float32"], default="bfloat16")
    parser.add_argument("--seeds", default="0-9", help="phantom seeds (default 0-9, never used for training)")
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT, help="model (default: the demo model)")
    parser.add_argument("--out", type=Path, help="also write every row as JSON")
    args = parser.parse_args()
    device = resolve_device(args.device)
    seeds = parse_seeds(args.seeds)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {device} ({name}), {args.precision} against float32, {args.checkpoint.name}")
    model = load_model(args.checkpoint)
    exact = RecordingPredictor(model, device=device, cache_size=16)
    reduced = RecordingPredictor(model, device=device, precision=args.precision, cache_size=16)
    rows, region_inputs = [], []
    for seed in seeds:  # each phantom is generated and prepared once, for both measurements
        phantom = make_phantom(seed)
        image, label = Volume(phantom.image), Volume(phantom.label, name="label")
        prepared = PreparedVolume(image)
        rows += compare_case(exact, reduced, seed, image, label, prepared)
        region_inputs.append(central_region_input(prepared, exact.input_size))
    print_table(rows)
    changes = embedding_change(device, args.precision, region_inputs)
    print(
        f"full-size encoder (random weights), embedding max |diff| / max |value|: "
        f"median {np.median(changes):.4f}, largest {max(changes):.4f} over {len(changes)} regions"
    )
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "embedding_changes": changes}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
