"""The official ground-truth-driven evaluation protocol (`validate_paired_img_gt`, spec 5.1-5.7) and Dice.

For every label value (ascending): binarise, resample and reorient the label like the image, take the
128^3 region centred on its bounding box, simulate clicks from the errors of the previous prediction
(one random stream per case, seeded 233), decode with the previous low-resolution logits, and map the
region prediction back onto the original grid; later labels overwrite earlier ones in the merged mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from . import geometry
from .clicks import simulate_click
from .errors import InputError
from .postprocess import paste_into, paste_region_mask
from .predictor import RegionPredictor
from .preprocess import PreparedVolume, Region, begin_for_label_bbox, prepare
from .volume import Volume

OFFICIAL_SEED = 233
# Atlases label a few hundred structures at most; thousands of values are a scan's intensities.
MAX_LABEL_VALUES = 1000


@dataclass(frozen=True)
class SimulatedClick:
    region_index: tuple[int, int, int]
    positive: bool
    ras: tuple[float, float, float]


@dataclass
class LabelResult:
    """One label value: its region, the clicks drawn, and Dice and mask size on the original grid after each click."""

    value: int
    region_begin: tuple[int, int, int]
    clicks: list[SimulatedClick] = field(default_factory=list)
    dice_per_click: list[float] = field(default_factory=list)
    voxels_per_click: list[int] = field(default_factory=list)
    iou_per_click: list[float] = field(default_factory=list)
    region_mask: Optional[np.ndarray] = None
    vanished: bool = False  # no voxel left at 1.5 mm: no click, Dice 0 (the official protocol scores it so)


@dataclass
class EvaluationResult:
    labels: list[LabelResult]
    mask: np.ndarray  # merged label map on the original grid, (K, J, I), uint8 unless a value needs more

    def dice(self) -> dict[int, list[float]]:
        """Dice per label value, one entry per click count (1, 2, ...)."""
        return {result.value: list(result.dice_per_click) for result in self.labels}


def _dice_of_patch(patch: np.ndarray, patch_count: int, box, truth: np.ndarray, truth_count: int) -> float:
    """Dice of a prediction that is zero outside `box` (`patch_count` voxels set) against a full-grid truth."""
    total = patch_count + truth_count
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(np.logical_and(patch, truth[box]))) / total


def label_values(
    label: Volume, source: str = "The label map", fix: str = "give the image first and its label map second"
) -> list[int]:
    """Foreground values of a label map, ascending (the official category list).

    `source` names the label map in the errors and `fix` says how to give a label map instead of an image.
    """
    values = np.unique(label.array_kji)
    if not np.all(values == np.round(values)):  # int() would truncate 0.5 to 0, the background
        raise InputError(
            f"{source} has non-integer values; give a label map of whole-number label values "
            "(resampled with nearest neighbour, not linear interpolation)."
        )
    if len(values) > MAX_LABEL_VALUES:
        raise InputError(
            f"{source} has {len(values)} different values: it looks like an image, not a label map (at most "
            f"{MAX_LABEL_VALUES} values); {fix}."
        )
    beyond = [v for v in (values[0], values[-1]) if not -(2**63) <= v < 2**63] if len(values) else []
    if beyond:
        raise InputError(
            f"{source} has the value {beyond[0]:g}, beyond any label value (64-bit integers); "
            "give a label map whose values number its structures."
        )
    return [int(v) for v in values if v != 0]


def chosen_values(values: Optional[Sequence[int]], present: Sequence[int]) -> list[int]:
    """The label values to evaluate, ascending and each once (a value given twice would be evaluated twice and
    weigh double in the mean): `values`, or every value `present` in the label map when none are given."""
    if not values:
        return list(present)
    missing = sorted(set(values) - set(present))
    if missing:
        raise InputError(f"Label values {missing} do not occur in the label map; it has {present}.")
    return sorted(set(values))


def evaluate_case(
    predictor: RegionPredictor,
    image: Volume,
    label: Volume,
    num_clicks: int = 1,
    seed: int = OFFICIAL_SEED,
    accumulate_clicks: bool = True,
    prepared: Optional[PreparedVolume] = None,
    recorded_clicks: Optional[Mapping[int, Sequence[tuple[Sequence[int], int]]]] = None,
    click_method: str = "random",
    values: Optional[Sequence[int]] = None,
) -> EvaluationResult:
    """Run the official protocol on one image and its label map.

    `accumulate_clicks=False` passes only the newest click each step (training / paper-era style).
    The random stream is NumPy's legacy generator seeded with `seed` once for the whole case.
    `recorded_clicks` maps a label value to (region index, 1 or 0) clicks used instead of simulated
    ones (no random draw), to replay a recorded run whose predictions may differ by float rounding.
    `click_method` is 'random' (official) or 'ritm' (the older distance-based rule).
    `values` restricts the run to those label values, as if every other value were background.
    """
    if num_clicks < 1:
        raise InputError(f"The number of clicks must be at least 1, got {num_clicks}.")
    image.check_same_grid(label)
    run = _ProtocolRun(
        predictor=predictor,
        prepared=prepared or prepare(image),
        label=label,
        num_clicks=num_clicks,
        random_state=np.random.RandomState(seed),
        click_method=click_method,
        accumulate_clicks=accumulate_clicks,
    )
    present = label_values(label)
    merged = np.zeros(image.shape_kji, dtype=_label_dtype(present))
    results = []
    for value in chosen_values(values, present):
        recorded = None if recorded_clicks is None else recorded_clicks.get(value)
        result, patch, box = run.label_value(value, recorded)
        paste_into(merged, patch, box, value)
        results.append(result)
    return EvaluationResult(labels=results, mask=merged)


def _label_dtype(values: Sequence[int]) -> np.dtype:
    """The smallest integer type that holds every label value (uint8 for the usual 1-255)."""
    return np.result_type(np.uint8, *(np.min_scalar_type(value) for value in values))


@dataclass
class _ProtocolRun:
    """The settings and the random stream shared by every label value of one case."""

    predictor: RegionPredictor
    prepared: PreparedVolume
    label: Volume
    num_clicks: int
    random_state: np.random.RandomState
    click_method: str
    accumulate_clicks: bool

    def label_value(self, value: int, recorded: Optional[Sequence[tuple[Sequence[int], int]]]):
        """Clicks, predictions and Dice for one label value; also its last mask on the original grid."""
        prepared = self.prepared
        canonical_label = prepared.prepare_label(self.label, value)
        region = prepared.region(begin_for_label_bbox(canonical_label))
        region_label = prepared.label_region(canonical_label, region)
        truth = self.label.array_kji == value
        truth_count = int(np.count_nonzero(truth))
        result = LabelResult(value=value, region_begin=region.begin)
        region_mask = np.zeros(region_label.shape, dtype=np.uint8)
        if not region_label.any():  # the official code returns an empty mask without drawing a click
            result.vanished = True
            patch, box = paste_region_mask(region_mask, region, prepared.volume)
            result.dice_per_click = [_dice_of_patch(patch, 0, box, truth, truth_count)] * self.num_clicks
            result.voxels_per_click = [0] * self.num_clicks
            result.region_mask = region_mask
            return result, patch, box
        if recorded is not None and len(recorded) < self.num_clicks:
            raise InputError(f"Label {value} has {len(recorded)} recorded clicks but {self.num_clicks} are needed.")
        embedding = self.predictor.embedding_for((prepared.cache_token, region.begin), region.network_input)
        points, labels, logits = [], [], None
        for step in range(self.num_clicks):
            if recorded is None:
                index, positive = simulate_click(
                    region_mask, region_label, random_state=self.random_state, method=self.click_method
                )
            else:
                index, positive = np.asarray(recorded[step][0], dtype=np.int64), int(recorded[step][1])
            result.clicks.append(_click(region, index, positive))
            if not self.accumulate_clicks:
                points, labels = [], []
            points.append(index)
            labels.append(positive)
            region_image = region.raw if logits is None else None  # chooses among first-click alternatives
            logits, iou = self.predictor.decode(embedding, np.array(points), np.array(labels), logits, region_image)
            region_mask = self.predictor.upsample_to_mask(logits)
            patch, box = paste_region_mask(region_mask, region, prepared.volume)
            patch_count = int(np.count_nonzero(patch))
            result.dice_per_click.append(_dice_of_patch(patch, patch_count, box, truth, truth_count))
            result.voxels_per_click.append(patch_count)
            result.iou_per_click.append(iou)
        result.region_mask = region_mask
        return result, patch, box


def _click(region: Region, index: np.ndarray, positive: int) -> SimulatedClick:
    canonical_voxel = np.asarray(region.begin) + index
    ras = geometry.apply_affine(region.canonical_affine, canonical_voxel)[0]
    return SimulatedClick(
        region_index=tuple(int(i) for i in index), positive=bool(positive), ras=tuple(float(c) for c in ras)
    )
