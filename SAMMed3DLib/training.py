"""Training and fine-tuning SAM-Med3D with the official recipe (spec 6), preprocessed exactly like inference.

Data are cases (an image and a label map); every label value with enough voxels is one target. Each case is
prepared once like the inference path (PreparedVolume: 1.5 mm, canonical) and cached on disk; a training
sample is a 128^3 region around one target (centred on its bounding box with random jitter, or on a random
foreground voxel), flipped at random, z-normalised with the inference function. Optionally (not in the
official recipe) some regions are centred on the first click, as an interactive session centres them;
without those a model can learn that a click at the region's centre means a small target.
Per sample the image is embedded once and the decoder runs several interaction steps: the first click from
the foreground, later ones from the errors of the previous prediction, the newest click only plus the
previous low-resolution logits, and mask-only steps at a random step and at the last one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import zipfile
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TextIO, Union

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_destination
from .checkpoint import (
    FIRST_CLICK_MULTIMASK_KEY,
    load_model,
    model_from_checkpoint,
    read_checkpoint_file,
    save_checkpoint,
)
from .clicks import simulate_click
from .config import ModelConfig, build_model
from .errors import CheckpointError, InputError, SAMMed3DError
from .evaluate import label_values
from .manifest import manifest_path, manifest_rows
from .metrics import dice
from .modeling import MaskDecoder3D, Sam3D
from .modeling.upsampling import upsample_trilinear
from .preprocess import ROI_SIZE, PreparedVolume, begin_for_label_bbox, crop_with_zero_padding, normalise_intensities
from .volume import Volume

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
IMAGE_FILE = "image.nii.gz"
LABEL_FILE = "label.nii.gz"
CACHE_VERSION = 1
# MONAI DiceLoss defaults (smooth_nr, smooth_dr).
DICE_SMOOTHING = 1e-5
# Regions drawn before giving up when none can be normalised.
MAX_DRAWS = 100
# Tries of one step whose gradients overflowed (the loss scale halves each time) before giving up.
MAX_OVERFLOWED_TRIES = 30


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class CaseFiles:
    image: Path
    label: Path


def find_cases(data: PathLike) -> list[CaseFiles]:
    """Cases of a folder (`*/image.nii.gz` with `*/label.nii.gz`) or of a CSV/JSON manifest of image,label pairs."""
    data = Path(data)
    if data.is_dir():
        cases = []
        for folder in sorted(p for p in data.iterdir() if p.is_dir()):
            image, label = folder / IMAGE_FILE, folder / LABEL_FILE
            if image.is_file() and label.is_file():
                cases.append(CaseFiles(image, label))
            elif image.is_file() or label.is_file():  # a case left out silently would shrink the data unnoticed
                present, absent = (image, label) if image.is_file() else (label, image)
                raise InputError(
                    f"{folder} has {present.name} but no {absent.name}; add it, or move the folder out of {data}."
                )
            else:  # image.nii or image.nrrd: a case in another format would be left out silently as well
                others = sorted(p.name for p in folder.iterdir() if p.name.split(".")[0] in ("image", "label"))
                if others:
                    raise InputError(
                        f"{folder} has {', '.join(others)}, but a case folder holds {IMAGE_FILE} and {LABEL_FILE}: "
                        f"save them under those names, list the cases in a manifest, or move the folder out of {data}."
                    )
    elif data.is_file():
        if data.suffix.lower() not in (".csv", ".json"):
            raise InputError(
                f"Training data {data} is a file but not a .csv or .json manifest: give a folder of cases "
                f"(sub-folders with {IMAGE_FILE} and {LABEL_FILE}) or a manifest listing image,label pairs."
            )
        cases = _read_manifest(data)
    else:
        raise InputError(f"Training data {data} does not exist: give a folder of cases or a CSV/JSON manifest.")
    if not cases:
        raise InputError(
            f"No cases found in {data}: it needs sub-folders with {IMAGE_FILE} and {LABEL_FILE}, "
            "or a manifest listing image,label pairs."
        )
    return cases


def _read_manifest(path: Path) -> list[CaseFiles]:
    rows = manifest_rows(path, columns=("image", "label"))
    rows_of_cases: dict[CaseFiles, str] = {}  # a case and where the manifest first lists it
    for where, row in rows:
        if not isinstance(row, dict) or not all(
            isinstance(row.get(key), str) and row[key] for key in ("image", "label")
        ):
            raise InputError(f"{where.capitalize()} of {path} lacks an 'image' or 'label' path; give both, as text.")
        image, label = (manifest_path(path.parent, row[key]).resolve() for key in ("image", "label"))
        for file in (image, label):
            if file.is_dir():  # training caches a case by its file's size and time, which a folder does not give
                raise InputError(
                    f"{file} ({where} of {path}) is a folder (a DICOM series?); training reads image and label "
                    "files: convert it to .nii.gz first."
                )
            if not file.is_file():
                raise InputError(f"{file} ({where} of {path}) does not exist; fix the manifest.")
        case = CaseFiles(image, label)
        if case in rows_of_cases:  # a pasted row twice would silently double the weight of its targets
            raise InputError(f"{where.capitalize()} of {path} repeats {rows_of_cases[case]}; list each case once.")
        rows_of_cases[case] = where
    return list(rows_of_cases)


@dataclass
class PreparedCase:
    """A case on the canonical 1.5 mm grid: raw intensities and a map of target numbers (0 = none)."""

    raw: np.ndarray
    targets: np.ndarray  # target number t (1-based) where the label had value `values[t - 1]`
    values: list[int]
    voxel_counts: list[int]


def prepare_case(files: CaseFiles) -> PreparedCase:
    """Resample and reorient image and label exactly as inference does (one binary label per value)."""
    prepared = PreparedVolume(Volume.from_file(files.image))
    label = Volume.from_file(files.label)
    prepared.volume.check_same_grid(label)  # its message names both files: which of many cases
    values = label_values(label, str(files.label), "give the case's label map as its label")
    targets = np.zeros(prepared.canonical_shape, dtype=np.uint16)  # label_values allows 1000 values at most
    kept_values, counts = [], []
    for value in values:
        binary = prepared.prepare_label(label, value).astype(bool)
        if binary.any():
            kept_values.append(value)
            counts.append(int(binary.sum()))
            targets[binary] = len(kept_values)
    return PreparedCase(_compact(prepared.canonical), targets, kept_values, counts)


def _compact(raw: np.ndarray) -> np.ndarray:
    if np.issubdtype(raw.dtype, np.integer) and raw.min() >= -32768 and raw.max() <= 32767:
        return raw.astype(np.int16)
    return raw.astype(np.float32)


class CaseCache:
    """Prepared cases stored as compressed .npz files (prepared once), a few kept in memory.

    A folder it creates is readable by its owner alone: the cases are copies of the user's scans."""

    def __init__(self, folder: PathLike, keep_in_memory: int = 4):
        self.folder = Path(folder)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._memory: OrderedDict[Path, PreparedCase] = OrderedDict()
        self._keep = keep_in_memory

    def path_for(self, files: CaseFiles) -> Path:
        identity = [CACHE_VERSION]
        for file in (files.image, files.label):
            stat = file.stat()
            identity += [str(file.resolve()), stat.st_size, stat.st_mtime_ns]
        return self.folder / (hashlib.sha1(json.dumps(identity).encode()).hexdigest()[:20] + ".npz")

    def summary(self, files: CaseFiles) -> PreparedCase:
        """The case (values and counts are what matter here); prepares and stores it when not cached."""
        path = self.path_for(files)
        if not path.is_file():
            case = prepare_case(files)
            # A temporary name of its own (another run sharing the cache may be writing the same case), removed if
            # the write fails or is interrupted.
            with atomic_destination(path, ".npz") as temporary:
                np.savez_compressed(
                    temporary, raw=case.raw, targets=case.targets, values=case.values, voxel_counts=case.voxel_counts
                )
            self._remember(path, case)
            return case
        return self.load(files)

    def load(self, files: CaseFiles) -> PreparedCase:
        path = self.path_for(files)
        case = self._memory.get(path)
        if case is None:
            case = _read_prepared(path)
            if case is None:
                log.warning("The cached %s of %s is damaged: preparing the case again.", path.name, files.image)
                path.unlink(missing_ok=True)
                return self.summary(files)
            self._remember(path, case)
        self._memory.move_to_end(path)
        return case

    def _remember(self, path: Path, case: PreparedCase) -> None:
        self._memory[path] = case
        while len(self._memory) > self._keep:
            self._memory.popitem(last=False)


def _read_prepared(path: Path) -> Optional[PreparedCase]:
    """A cached case, or None when the file cannot be read whole (cut off, overwritten, a member missing, a
    scrambled compressed stream)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return PreparedCase(
                stored["raw"], stored["targets"], stored["values"].tolist(), stored["voxel_counts"].tolist()
            )
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
        return None


@dataclass(frozen=True)
class Target:
    case: int
    number: int  # target number in the prepared case
    value: int  # label value in the original label map
    voxels: int


class TrainingData:
    """All targets of the cases with at least `min_voxels` voxels on the 1.5 mm grid."""

    def __init__(self, cases: Sequence[CaseFiles], cache: CaseCache, min_voxels: int = 1001):
        self.cases = list(cases)
        self.cache = cache
        self.targets: list[Target] = []
        for index, files in enumerate(self.cases):
            case = cache.summary(files)
            for number, (value, count) in enumerate(zip(case.values, case.voxel_counts), start=1):
                if count >= min_voxels:
                    self.targets.append(Target(index, number, value, count))
        if not self.targets:
            raise InputError(
                f"No label in the {len(self.cases)} case(s) has {min_voxels} voxels or more at 1.5 mm; "
                "lower --min-voxels or add data."
            )

    def case(self, target: Target) -> PreparedCase:
        return self.cache.load(self.cases[target.case])


@dataclass(frozen=True)
class Sample:
    """One training region: z-normalised image (1, 1, S, S, S) and binary label (S, S, S) bool.

    first_click: region index of the first (positive) click when the region is centred on it, else None.
    """

    image: torch.Tensor
    label: np.ndarray
    begin: tuple[int, int, int]
    flips: tuple[int, ...]
    first_click: Optional[tuple[int, int, int]] = None


def region_begin(
    binary: np.ndarray, rng: np.random.Generator, jitter: int, foreground_centre_probability: float
) -> np.ndarray:
    """Official bbox-centred begin with +-jitter voxels, or (sometimes) centred on a random foreground voxel."""
    if rng.random() < foreground_centre_probability:
        return begin_on_random_voxel(binary, rng)
    return begin_for_label_bbox(binary) + rng.integers(-jitter, jitter + 1, size=3)


def begin_on_random_voxel(binary: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Begin of the region centred on a voxel of `binary` drawn uniformly at random."""
    voxels = np.argwhere(binary)
    return voxels[rng.integers(len(voxels))] - ROI_SIZE // 2


def flip_region(raw: np.ndarray, label: np.ndarray, axes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The same flips applied to image and label (clicks are drawn afterwards, from the flipped label)."""
    if not axes:
        return raw, label
    return np.ascontiguousarray(np.flip(raw, tuple(axes))), np.ascontiguousarray(np.flip(label, tuple(axes)))


def make_sample(
    case: PreparedCase,
    target: Target,
    rng: np.random.Generator,
    jitter: int = 16,
    foreground_centre_probability: float = 0.3,
    flip: bool = True,
    click_centre_probability: float = 0.0,
) -> Sample:
    binary = case.targets == target.number
    first_click = None
    if click_centre_probability > 0 and rng.random() < click_centre_probability:
        begin = begin_on_random_voxel(binary, rng)
        first_click = np.full(3, ROI_SIZE // 2)
    else:
        begin = region_begin(binary, rng, jitter, foreground_centre_probability)
    raw = crop_with_zero_padding(case.raw, begin)
    label = crop_with_zero_padding(binary, begin)
    if not label.any():  # only a jitter of more than half a region can move a small target out
        begin = begin_for_label_bbox(binary)
        raw, label = crop_with_zero_padding(case.raw, begin), crop_with_zero_padding(binary, begin)
    axes = tuple(axis for axis in range(3) if flip and rng.random() < 0.5)
    raw, label = flip_region(raw, label, axes)
    if first_click is not None:
        first_click[list(axes)] = ROI_SIZE - 1 - first_click[list(axes)]
        first_click = tuple(int(i) for i in first_click)
    return Sample(normalise_intensities(raw), label, tuple(int(b) for b in begin), axes, first_click)


# ------------------------------------------------------------------------------------------------ loss


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MONAI DiceLoss(sigmoid=True, squared_pred=True): squared-prediction soft Dice, per item, mean."""
    probabilities = torch.sigmoid(logits)
    dims = tuple(range(2, logits.dim()))
    intersection = (probabilities * target).sum(dims)
    denominator = (probabilities * probabilities).sum(dims) + (target * target).sum(dims)
    return (1.0 - (2.0 * intersection + DICE_SMOOTHING) / (denominator + DICE_SMOOTHING)).mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MONAI (1.3 or later) DiceCELoss(sigmoid=True, squared_pred=True): `dice_loss` plus BCE over all voxels.

    The official training script computes this loss; with MONAI 1.2.0, which its requirements pinned in 2023, the
    cross-entropy term of a single channel is zero (softmax cross-entropy), so models trained then saw
    `dice_loss` alone."""
    return dice_loss(logits, target) + F.binary_cross_entropy_with_logits(logits, target)


# --loss: the training loss of each mask.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"dicece": dice_ce_loss, "dice": dice_loss}


def ambiguity_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    predicted_iou: torch.Tensor,
    iou_weight: float = 1.0,
    mask_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = dice_ce_loss,
) -> torch.Tensor:
    """SAM's loss for alternative masks: `mask_loss` of the best of logits (1, M, S, S, S) against target
    (1, 1, S, S, S), plus iou_weight (SAM: 1) times the squared error of predicted_iou (1, M) against each mask's
    measured IoU.
    """
    losses = torch.stack([mask_loss(logits[:, i : i + 1], target) for i in range(logits.shape[1])])
    with torch.no_grad():
        masks, truth = logits[0] > 0, target[0] > 0.5
        intersection = (masks & truth).flatten(1).sum(1).float()
        union = (masks | truth).flatten(1).sum(1).float()
        measured = intersection / union.clamp(min=1.0)
    return losses.min() + iou_weight * F.mse_loss(predicted_iou[0].float(), measured)


def seed_multimask_outputs(decoder: MaskDecoder3D, generator: torch.Generator, noise: float = 0.05) -> None:
    """Start the three alternative outputs as perturbed copies of the single-mask output (token 0).

    Models trained with single masks only (all official ones) leave the alternatives untrained; copies start
    them from a working mask, and the noise lets the best-of-three loss pull them apart.
    """

    def perturbation(like: torch.Tensor) -> torch.Tensor:
        return noise * like.std() * torch.randn(like.shape, generator=generator).to(like.device)

    with torch.no_grad():
        source_token = decoder.mask_tokens.weight[0]
        source_mlp = decoder.output_hypernetworks_mlps[0].state_dict()
        for index in range(1, decoder.num_mask_tokens):
            decoder.mask_tokens.weight[index] = source_token + perturbation(source_token)
            mlp = decoder.output_hypernetworks_mlps[index]
            mlp.load_state_dict(source_mlp)
            for parameter in mlp.parameters():
                parameter.add_(perturbation(parameter))


# ------------------------------------------------------------------------------------------ interaction


def mask_only_steps(steps: int, rng: np.random.Generator) -> set[int]:
    """The last step and, from 5 steps on, one random step in [2, steps - 2] (official: [2, 8] of 11) get no
    point (with 4 steps a second mask-only step would leave only 2 clicks)."""
    chosen = {steps - 1}
    if steps >= 5:
        chosen.add(int(rng.integers(2, min(8, steps - 2) + 1)))
    return chosen


def interact(
    model: Sam3D,
    embedding: torch.Tensor,
    label: np.ndarray,
    steps: int,
    rng: np.random.Generator,
    first_click: Optional[tuple[int, int, int]] = None,
    first_click_multimask: bool = False,
    iou_loss_weight: float = 1.0,
    loss: str = "dicece",
) -> tuple[torch.Tensor, float]:
    """Simulated interaction on one region; returns the loss (`LOSSES[loss]` of each step's mask) summed over
    steps and the last step's Dice.

    Clicks are drawn from the errors of the mask the user would see (logits above 0); the official script
    thresholds the logits at 0.5 instead, a difference of a thin shell of voxels.

    first_click: the first (positive) click's region index, when the region was centred on it.
    first_click_multimask: the first click's step trains the three alternative masks (best-of-three loss
    plus IoU prediction, weighted by iou_loss_weight) and passes on the one with the highest predicted IoU, as
    inference picks it.
    """
    device = embedding.device
    target = torch.from_numpy(label.astype(np.float32))[None, None].to(device)
    size = label.shape
    previous_logits = torch.zeros((1, 1, *model.prompt_encoder.mask_input_size), device=device)
    previous_mask = np.zeros(size, dtype=bool)
    image_pe = model.prompt_encoder.get_dense_pe()
    clicks = np.random.RandomState(int(rng.integers(2**32)))
    no_point = mask_only_steps(steps, rng)
    mask_loss = LOSSES[loss]
    total = torch.zeros((), device=device)
    for step in range(steps):
        if step == 0 and first_click is not None:
            point, point_label = first_click, 1
        else:
            point, point_label = simulate_click(previous_mask, label, random_state=clicks)
        points = None
        if step not in no_point:
            coords = torch.tensor(point, dtype=torch.float32, device=device).view(1, 1, 3)
            points = (coords, torch.tensor([[float(point_label)]], device=device))
        multimask = first_click_multimask and step == 0 and points is not None
        sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=previous_logits)
        low_res, predicted_iou = model.mask_decoder(
            image_embeddings=embedding,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        upsampled = upsample_trilinear(low_res.float(), size)
        if multimask:
            step_loss = ambiguity_loss(upsampled, target, predicted_iou, iou_loss_weight, mask_loss)
            picked = int(predicted_iou[0].argmax())
            low_res, upsampled = low_res[:, picked : picked + 1], upsampled[:, picked : picked + 1]
        else:
            step_loss = mask_loss(upsampled, target)
        total = total + step_loss
        previous_logits = low_res
        previous_mask = (upsampled > 0)[0, 0].detach().cpu().numpy()
    return total, dice(previous_mask, label)


# ------------------------------------------------------------------------------------------- training


# (option, lowest, highest or None) for the options a slip of the keyboard could make meaningless; checked when
# options are made, so a bad value fails at once, not after the cases are prepared.
OPTION_RANGES = (
    ("steps", 1, None),
    ("lr_encoder", 0, None),
    ("lr_decoder", 0, None),
    ("weight_decay", 0, None),
    ("batch_size", 1, None),
    ("accumulation", 1, None),
    ("clicks_per_sample", 2, None),  # the last step gets no click: one step alone would train without any
    ("jitter", 0, None),
    ("click_centre_probability", 0, 1),
    ("iou_loss_weight", 0, None),
    ("warmup_steps", 0, None),
    ("checkpoint_every", 1, None),
)


@dataclass
class TrainingOptions:
    steps: int = 1000
    lr_encoder: float = 4e-4
    lr_decoder: float = 4e-4
    weight_decay: float = 0.1
    batch_size: int = 1
    accumulation: int = 1
    clicks_per_sample: int = 6
    min_voxels: int = 1001
    jitter: int = 16
    foreground_centre_probability: float = 0.3
    click_centre_probability: float = 0.0  # not official: regions centred on the first click, as sessions do
    first_click_multimask: bool = False  # not official: SAM's three alternative masks for a lone first click
    iou_loss_weight: float = 1.0  # weight of the alternatives' IoU-prediction error (SAM: 1)
    loss: str = "dicece"  # a key of LOSSES
    flip: bool = True
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    schedule: str = "cosine"  # or "multistep" (x0.1 at 60 % and 90 %)
    seed: int = 0
    checkpoint_every: int = 100
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, low, high in OPTION_RANGES:
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                wanted = f"from {low} to {high}" if high is not None else f"of {low} or more"
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{name} ({flag}) is {value}; give a value {wanted}.")
        if self.loss not in LOSSES:
            raise InputError(f"loss (--loss) is '{self.loss}'; give one of {', '.join(LOSSES)}.")

    @property
    def samples_per_step(self) -> int:
        """Regions per optimiser step: batch size times accumulation."""
        return self.batch_size * self.accumulation

    def to_dict(self) -> dict:
        return asdict(self)


def parameter_groups(model: Sam3D, lr_encoder: float, lr_decoder: float) -> list[dict]:
    """The official train.py's groups, in its order: image encoder (lr_encoder), prompt encoder and mask decoder
    (lr_decoder each), so that either tool can resume the other's optimiser state."""
    return [
        {"params": list(model.image_encoder.parameters()), "lr": lr_encoder},
        {"params": list(model.prompt_encoder.parameters()), "lr": lr_decoder},
        {"params": list(model.mask_decoder.parameters()), "lr": lr_decoder},
    ]


def with_official_groups(optimizer_state: dict, model: Sam3D) -> dict:
    """An optimiser state of the earlier two groups (image encoder; prompt encoder + mask decoder) split into the
    official three. Exact: the parameters keep their order and numbers, only the grouping changes."""
    if len(optimizer_state["param_groups"]) != 2:
        return optimizer_state
    encoder, decoder = optimizer_state["param_groups"]
    prompt_count = len(list(model.prompt_encoder.parameters()))
    if len(decoder["params"]) != prompt_count + len(list(model.mask_decoder.parameters())):
        raise CheckpointError(
            "The checkpoint's optimiser state does not match its model's parameters; fine-tune from it as a new "
            "run instead of resuming."
        )
    prompt = {**decoder, "params": decoder["params"][:prompt_count]}
    mask = {**decoder, "params": decoder["params"][prompt_count:]}
    return {**optimizer_state, "param_groups": [encoder, prompt, mask]}


def learning_rate_factor(options: TrainingOptions) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 0 or the official step decay (x0.1 twice)."""

    def factor(step: int) -> float:
        if step < options.warmup_steps:
            return (step + 1) / options.warmup_steps
        progress = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
        if options.schedule == "multistep":
            return 0.1 ** sum(progress >= milestone for milestone in (0.6, 0.9))
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def steps_for_epochs(epochs: float, target_count: int, options: TrainingOptions) -> int:
    """Optimiser steps that show every target `epochs` times (at least one step)."""
    return max(1, math.ceil(epochs * target_count / options.samples_per_step))


# Options that leave what a run computes unchanged; a resumed run takes them (and its total `steps`) as given.
RUN_ONLY_OPTIONS = ("steps", "checkpoint_every", "device")


def resumed_options(given: TrainingOptions, stored: dict) -> TrainingOptions:
    """`given` with every option a checkpoint records put back, except RUN_ONLY_OPTIONS and a batch split
    otherwise (`same_regions_per_step`): a resumed run goes on with the recipe it started with."""
    free = RUN_ONLY_OPTIONS + (BATCH_SPLIT if same_regions_per_step(given, stored) else ())
    kept = {
        option.name: stored[option.name]
        for option in fields(TrainingOptions)
        if option.name in stored and option.name not in free
    }
    return replace(given, **kept)


# How a step's regions are split into forward passes: a resumed run may split them otherwise (say after running
# out of memory) as long as a step takes as many regions.
BATCH_SPLIT = ("batch_size", "accumulation")


def same_regions_per_step(given: TrainingOptions, stored: dict) -> bool:
    stored_regions = int(stored.get("batch_size", 1)) * int(stored.get("accumulation", 1))
    return given.samples_per_step == stored_regions


def check_resumed_total(path: PathLike, done: int, planned: int, total: int, epochs: Optional[float] = None) -> None:
    """Refuse a total of steps (from --steps, or from `epochs`) that a resumed run has reached already."""
    if total > done:
        return
    name = Path(path).name
    if epochs is None:
        raise InputError(
            f"--steps is the run's total; {name} has done {done} of its {planned} steps; give more than {done}, "
            "or leave --steps out to finish it."
        )
    raise InputError(
        f"--epochs {epochs:g} makes {total} steps in all; {name} has done {done} of its {planned} steps; give more "
        "epochs, or leave --epochs out to finish it."
    )


class ProgressLine:
    """One status line on stderr: rewritten in place on a terminal, a new line every `every` steps otherwise."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, every: int = 10):
        self.total = total
        self.stream = stream or sys.stderr
        self.every = every
        self.started = time.monotonic()
        self.first_step: Optional[int] = None
        self.width = 0  # of the line on the terminal

    def __call__(self, step: int, loss: float, running_dice: float, lr: float) -> None:
        if self.first_step is None:
            self.first_step = step - 1
        elapsed = time.monotonic() - self.started
        per_step = elapsed / max(1, step - self.first_step)
        text = (
            f"step {step}/{self.total}  loss {loss:.4f}  dice {running_dice:.3f}  lr {lr:.2e}  "
            f"{per_step:.2f} s/step  {elapsed / 60:.1f} min"
        )
        if self.stream.isatty():
            # Padded to the previous line's length: a shorter line would leave that line's tail on the screen.
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        elif step % self.every == 0 or step == self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.stream.isatty() and self.first_step is not None:  # no line shown (nothing trained): no blank line
            self.stream.write("\n")
            self.stream.flush()


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl+C (SIGINT), or another signal that stops as it does (the command line's SIGTERM and SIGHUP),
    that arrives inside the block, and act on it when the block ends.

    Only for signals with Python's interrupt handler or one marked `raises_keyboard_interrupt`, in the main thread
    (signal handlers can only change there); elsewhere the block runs as it is."""
    held = {}
    if threading.current_thread() is threading.main_thread():
        for number in signal.valid_signals():
            handler = signal.getsignal(number)
            if handler is signal.default_int_handler or getattr(handler, "raises_keyboard_interrupt", False):
                held[number] = handler
    received = []
    for number in held:
        signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in held.items():
            signal.signal(number, handler)
    if received:
        held[received[0]](received[0], None)


def is_out_of_memory(error: BaseException) -> bool:
    """A GPU's torch.OutOfMemoryError, or memory the CPU allocator (PyTorch's or NumPy's) could not get."""
    text = str(error)
    return (
        isinstance(error, (torch.OutOfMemoryError, MemoryError))
        or "can't allocate memory" in text
        or "DefaultCPUAllocator" in text
    )


def smoothed(running: Optional[float], value: float) -> float:
    """The running (exponentially smoothed) loss or Dice after one more step's `value`."""
    return value if running is None else 0.95 * running + 0.05 * value


# Checkpoint key of the mixed-precision loss scaler's state (CUDA runs); other SAM-Med3D tools ignore it.
GRAD_SCALER_KEY = "grad_scaler_state_dict"


@dataclass
class TrainingState:
    step: int = 0
    losses: list = field(default_factory=list)
    dices: list = field(default_factory=list)
    best_loss: float = float("inf")
    best_dice: float = 0.0


class Trainer:
    """Owns model, optimiser, scheduler and data; `run()` trains to `options.steps` with checkpoints."""

    def __init__(self, model: Sam3D, data: TrainingData, options: TrainingOptions, out: PathLike):
        if model.first_click_multimask and not options.first_click_multimask:
            log.info("The starting weights answer a first click with alternative masks: training those too.")
            options = replace(options, first_click_multimask=True)
        self.options = options
        self.device = torch.device(options.device)
        self.model = model.to(self.device).train()
        self.data = data
        self.out = Path(out)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, options.lr_encoder, options.lr_decoder), weight_decay=options.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, learning_rate_factor(options))
        self.use_amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.state = TrainingState()
        self.saved_step: Optional[int] = None  # the step this run last wrote to `out`
        if options.first_click_multimask and not model.first_click_multimask:
            seed_multimask_outputs(model.mask_decoder, torch.Generator().manual_seed(options.seed))
            model.first_click_multimask = True

    # -- one optimiser step
    def train_step(self) -> tuple[float, float]:
        """One optimiser step over batch_size x accumulation samples; returns mean loss and Dice. On CUDA, a step
        whose float16 gradients overflowed with a finite loss (the loss scaler then skips the update and lowers its
        scale) is done again over the same samples, so that every counted step, the warm-up's too, changed the
        weights; one whose loss itself is not finite is counted as the scaler skipped it (trying the same samples
        again would give the same loss)."""
        for _ in range(MAX_OVERFLOWED_TRIES):
            losses, dices = self._accumulate_gradients()
            with interrupts_deferred():  # the update is applied and counted whole, so a Ctrl+C saves a true step
                if self._update_weights() or not np.all(np.isfinite(losses)):
                    self.scheduler.step()
                    self.state.step += 1
                    self.state.losses.append(float(np.mean(losses)))
                    self.state.dices.append(float(np.mean(dices)))
                    return self.state.losses[-1], self.state.dices[-1]
        raise SAMMed3DError(
            f"Step {self.state.step + 1}: the gradients overflowed {MAX_OVERFLOWED_TRIES} times in a row although the "
            "loss was finite: lower the learning rates, or train in float32 with --device cpu."
        )

    def _accumulate_gradients(self) -> tuple[list[float], list[float]]:
        options = self.options
        rng = np.random.default_rng([options.seed, self.state.step])
        self.optimizer.zero_grad(set_to_none=True)
        losses, dices = [], []
        for _ in range(options.accumulation):
            samples = [self._draw_sample(rng) for _ in range(options.batch_size)]
            images = torch.cat([sample.image for sample in samples]).to(self.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                embeddings = self.model.image_encoder(images)
            loss = torch.zeros((), device=self.device)
            for index, sample in enumerate(samples):
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                    sample_loss, sample_dice = interact(
                        self.model,
                        embeddings[index : index + 1],
                        sample.label,
                        options.clicks_per_sample,
                        rng,
                        first_click=sample.first_click,
                        first_click_multimask=options.first_click_multimask,
                        iou_loss_weight=options.iou_loss_weight,
                        loss=options.loss,
                    )
                loss = loss + sample_loss
                losses.append(sample_loss.item() / options.clicks_per_sample)
                dices.append(sample_dice)
            self.scaler.scale(loss / options.samples_per_step).backward()
        return losses, dices

    def _update_weights(self) -> bool:
        """Apply the gradients; False where the loss scaler skipped the update (it lowers its scale then)."""
        if self.options.max_grad_norm > 0:  # not in the official recipe; keeps small-batch training from scratch stable
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.max_grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale

    def _draw_sample(self, rng: np.random.Generator) -> Sample:
        targets = self.data.targets
        for _ in range(MAX_DRAWS):
            target = targets[int(rng.integers(len(targets)))]
            try:
                return make_sample(
                    self.data.case(target),
                    target,
                    rng,
                    jitter=self.options.jitter,
                    foreground_centre_probability=self.options.foreground_centre_probability,
                    flip=self.options.flip,
                    click_centre_probability=self.options.click_centre_probability,
                )
            except InputError:  # e.g. a region with nothing above 0 cannot be normalised: draw again
                continue
        raise InputError(
            f"{MAX_DRAWS} regions in a row could not be normalised (no intensities above 0); "
            "check that the images are CT/MR intensities, not masks."
        )

    # -- the loop
    def run(self, progress: Optional[Callable[[int, float, float, float], None]] = None) -> TrainingState:
        """Train to `options.steps`; interrupted (Ctrl+C), the last finished step is saved before leaving; out of
        memory, a SAMMed3DError says what to change."""
        try:
            return self._run(progress)
        except KeyboardInterrupt:
            if self.saved_step != self.state.step:  # else the Ctrl+C came during the save of this very step
                self.save(self.out)
            raise
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            raise SAMMed3DError(self._out_of_memory_message()) from error

    def _out_of_memory_message(self) -> str:
        if self.saved_step is None:
            saved = f"{self.out} was not written in this run"
        else:
            saved = f"{self.out} holds step {self.saved_step}"
        return (
            f"Out of memory in step {self.state.step + 1} on {self.device} ({saved}): give a lower --batch-size with "
            "a higher --accumulation (the same regions per step), or fewer --clicks-per-sample."
        )

    def _run(self, progress: Optional[Callable[[int, float, float, float], None]]) -> TrainingState:
        # Smoothed over the steps recorded so far: restarted on --resume, they would give the progress line and
        # best_loss / best_dice other values than the same run uninterrupted.
        running_loss = running_dice = None
        for loss, step_dice in zip(self.state.losses, self.state.dices):
            running_loss, running_dice = smoothed(running_loss, loss), smoothed(running_dice, step_dice)
        first_step = self.state.step
        while self.state.step < self.options.steps:
            lr = self.optimizer.param_groups[0]["lr"]  # shown with the step it trains (the scheduler then moves on)
            loss, step_dice = self.train_step()
            running_loss, running_dice = smoothed(running_loss, loss), smoothed(running_dice, step_dice)
            if progress:
                progress(self.state.step, running_loss, running_dice, lr)
            if self.state.step % self.options.checkpoint_every == 0 or self.state.step == self.options.steps:
                self.state.best_loss = min(self.state.best_loss, running_loss)
                self.state.best_dice = max(self.state.best_dice, running_dice)
                self.save(self.out)
        if self.state.step == first_step:  # resumed at its step count: the checkpoint still belongs at `out`
            self.save(self.out)
        return self.state

    # -- checkpoints
    def save(self, path: PathLike) -> None:
        """Write the checkpoint; a Ctrl+C meanwhile is held until it is written whole (and then raised)."""
        extra = {GRAD_SCALER_KEY: self.scaler.state_dict()} if self.scaler.is_enabled() else {}
        with interrupts_deferred():
            save_checkpoint(
                path,
                self.model,
                epoch=self.state.step * self.options.samples_per_step // max(1, len(self.data.targets)),
                step=self.state.step,
                optimizer_state_dict=self.optimizer.state_dict(),
                lr_scheduler_state_dict=self.scheduler.state_dict(),
                losses=list(self.state.losses),
                dices=list(self.state.dices),
                best_loss=self.state.best_loss,
                best_dice=self.state.best_dice,
                training_options=self.options.to_dict(),
                **extra,
            )
            if Path(path) == self.out:
                self.saved_step = self.state.step

    def resume(
        self,
        path: PathLike,
        steps: Optional[int] = None,
        epochs: Optional[float] = None,
        content: Optional[dict] = None,
    ) -> Optional[str]:
        """Continue from a checkpoint this trainer wrote: weights, optimiser, schedule, loss scaler and step count.

        The run keeps every option it was started with (`resumed_options`) and its total of steps, unless
        `steps` or `epochs` (counted with the kept batch) set a new total above the steps done; a new total
        spreads the learning-rate schedule over it, and the line returned says how the rate changes.
        `content`: the file's content, when already read."""
        content = read_training_checkpoint(path) if content is None else content
        stored = content.get("training_options") or {}
        done = int(content["step"])
        self.options = resumed_options(self.options, stored)
        planned = int(stored.get("steps", self.options.steps))
        total = planned
        if epochs is not None:
            total = steps_for_epochs(epochs, len(self.data.targets), self.options)
        elif steps is not None:
            total = steps
        if steps is not None or epochs is not None:
            check_resumed_total(path, done, planned, total, epochs)
        self.options = replace(self.options, steps=total)
        self.model.load_state_dict(content["model_state_dict"], strict=True)
        # What the weights were trained as, whatever this trainer was made with.
        self.model.first_click_multimask = content.get(FIRST_CLICK_MULTIMASK_KEY) is True
        self.optimizer.load_state_dict(with_official_groups(content["optimizer_state_dict"], self.model))
        # The schedule's function is not saved: made again for the total, at the step reached (its base rates are
        # the loaded groups' `initial_lr`); with a new total the next step takes the spread schedule's rate.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, learning_rate_factor(self.options), last_epoch=done - 1
        )
        if GRAD_SCALER_KEY in content:
            self.scaler.load_state_dict(content[GRAD_SCALER_KEY])
        self.state = TrainingState(
            step=done,
            losses=list(content.get("losses", [])),
            dices=list(content.get("dices", [])),
            best_loss=float(content.get("best_loss", float("inf"))),
            best_dice=float(content.get("best_dice", 0.0)),
        )
        if total == planned or done == 0:  # before any step both schedules start alike
            return None
        trained_at = self.scheduler.base_lrs[0] * learning_rate_factor(replace(self.options, steps=planned))(done - 1)
        return (
            f"The learning-rate schedule of {Path(path).name} is spread over {total} steps instead of {planned}: "
            f"step {done} trained at a learning rate of {trained_at:.2e}, step {done + 1} trains at "
            f"{self.optimizer.param_groups[0]['lr']:.2e}."
        )


def read_training_checkpoint(path: PathLike) -> dict:
    """A checkpoint written by `Trainer.save` (weights-only unpickling; a broken file is a CheckpointError)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; give the file written by an earlier run.")
    content = read_checkpoint_file(path)
    needed = ("model_state_dict", "optimizer_state_dict", "lr_scheduler_state_dict", "step")
    if not isinstance(content, dict) or any(key not in content for key in needed):
        raise CheckpointError(
            f"{path} is not a training checkpoint of this tool (it lacks optimizer or step state); "
            "to start from its weights use fine-tuning instead of resuming."
        )
    return content


def model_for_training(
    config: Optional[ModelConfig] = None,
    checkpoint: Optional[PathLike] = None,
    resume: Optional[PathLike] = None,
    seed: int = 0,
) -> Sam3D:
    """The network to train: the architecture of `resume`, else the weights of `checkpoint`, else `config`
    initialised from `seed` (the same seed gives the same weights; the global random state is left alone)."""
    if resume is not None:
        return model_from_checkpoint(read_training_checkpoint(resume), resume)
    if checkpoint is not None:
        return load_model(checkpoint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(config or ModelConfig())
