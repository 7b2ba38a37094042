"""Segmenting volumes from lists of clicks: one case, or many from a manifest, with the same engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, SAMMed3DError
from .imageio import PathLike, write_image_atomic
from .manifest import manifest_rows
from .predictor import RegionPredictor
from .preprocess import prepare
from .session import Click, InteractiveSession, SessionResult
from .volume import POINT_SPACES, Volume, parse_point


@dataclass
class Case:
    """One volume and its clicks, in the order they are applied."""

    image: Path
    clicks: list[tuple[tuple[float, float, float], bool]]
    space: str = "ras"
    out: Optional[Path] = None

    @property
    def name(self) -> str:
        return self.image.name.split(".")[0]


@dataclass
class CaseOutcome:
    case: Case
    out: Optional[Path] = None
    error: Optional[str] = None
    voxels: int = 0
    iou: float = float("nan")
    regions: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def segment_volume(
    predictor: RegionPredictor,
    volume: Volume,
    clicks: Sequence[tuple[Sequence[float], bool]],
    space: str = "ras",
    prompt_mode: str = "newest",
    regions: str = "auto",
) -> SessionResult:
    """Apply `clicks` ((point, positive) in `space`) in order to one volume; the last mask is returned."""
    if not clicks:
        raise InputError("No clicks were given: add at least one positive point.")
    ras = volume.points_to_ras([point for point, _ in clicks], space)
    session = InteractiveSession(predictor, prepare(volume), prompt_mode=prompt_mode, regions=regions)
    return session.set_clicks([Click(tuple(p), positive) for p, (_, positive) in zip(ras.tolist(), clicks)])


def mask_image(mask_kji: np.ndarray, volume: Volume) -> sitk.Image:
    """A uint8 mask as an image with the volume's geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask_kji, dtype=np.uint8))
    image.CopyInformation(volume.image)
    return image


def write_mask(mask_kji: np.ndarray, volume: Volume, path: PathLike) -> Path:
    """Write a mask with the volume's geometry, whole or not at all."""
    return write_image_atomic(mask_image(mask_kji, volume), path)


def read_manifest(path: PathLike) -> list[Case]:
    """Cases from a CSV (columns image, positive, negative[, space, out]; points 'x,y,z' joined by ';')
    or a JSON list of {"image", "clicks": [{"point": [x, y, z], "positive": true}, ...] | "positive"/"negative",
    "space", "out"}. Relative paths are relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Manifest {path} does not exist: give a .csv or .json file listing images and clicks.")
    if path.suffix.lower() not in (".csv", ".json"):
        raise InputError(f"Manifest {path} must be a .csv or .json file.")
    entries = manifest_rows(path)
    if not entries:
        raise InputError(f"Manifest {path} lists no cases.")
    return [_case_from_entry(entry, path.parent, number) for number, entry in enumerate(entries, start=1)]


def _case_from_entry(entry: dict, folder: Path, number: int) -> Case:
    if not isinstance(entry, dict) or not entry.get("image"):
        raise InputError(f"Manifest entry {number} has no 'image': give each case an image path.")
    if "clicks" in entry:
        clicks = [(_point(c["point"]), bool(c.get("positive", True))) for c in entry["clicks"]]
    else:
        clicks = [(p, True) for p in _points(entry.get("positive"))] + [
            (p, False) for p in _points(entry.get("negative"))
        ]
    space = (entry.get("space") or "ras").lower()
    if space not in POINT_SPACES:
        raise InputError(f"Manifest entry {number} has space '{space}'; use one of {', '.join(POINT_SPACES)}.")
    out = entry.get("out")
    return Case(
        image=folder / entry["image"],
        clicks=clicks,
        space=space,
        out=folder / out if out else None,
    )


def _points(value) -> list[tuple[float, float, float]]:
    if not value:
        return []
    if isinstance(value, str):
        return [parse_point(text) for text in value.split(";") if text.strip()]
    return [_point(p) for p in value]


def _point(value) -> tuple[float, float, float]:
    return parse_point(value) if isinstance(value, str) else parse_point(",".join(str(v) for v in value))


def segment_many(
    predictor: RegionPredictor,
    cases: Sequence[Case],
    out_dir: PathLike,
    prompt_mode: str = "newest",
    regions: str = "auto",
    progress: Optional[Callable[[int, int, CaseOutcome], None]] = None,
) -> list[CaseOutcome]:
    """Segment every case; a failing case is reported in its outcome and the others still run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for number, case in enumerate(cases, start=1):
        started = time.perf_counter()
        outcome = CaseOutcome(case)
        try:
            volume = Volume.from_file(case.image)
            result = segment_volume(predictor, volume, case.clicks, case.space, prompt_mode, regions)
            outcome.out = write_mask(result.mask, volume, case.out or out_dir / f"{case.name}_mask.nii.gz")
            outcome.voxels = int(result.mask.sum())
            outcome.iou = result.iou
            outcome.regions = len(result.regions)
            outcome.timings = result.timings
        except SAMMed3DError as error:
            outcome.error = str(error)
        except Exception as error:  # one broken case must not stop the batch
            outcome.error = f"unexpected {type(error).__name__}: {error}"
        outcome.seconds = time.perf_counter() - started
        outcomes.append(outcome)
        if progress is not None:
            progress(number, len(cases), outcome)
    return outcomes
