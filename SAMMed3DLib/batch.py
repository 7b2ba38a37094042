"""Segmenting volumes from lists of clicks: one case, or many from a manifest, with the same engine."""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .atomic import check_output_folder
from .errors import InputError, SAMMed3DError
from .imageio import (
    PathLike,
    check_image_exists,
    check_image_output,
    image_stem,
    image_suffix,
    slicer_segmentation_fields,
    write_image_atomic,
)
from .manifest import manifest_path, manifest_rows
from .predictor import RegionPredictor
from .preprocess import prepare
from .session import Click, InteractiveSession, SessionResult, is_click_flag
from .volume import POINT_SPACES, Volume, parse_point

Point = tuple[float, float, float]

# A CSV manifest's header must name these; 'negative', 'space' and 'out' may be left out.
CSV_COLUMNS = ("image", "positive")
OPTIONAL_COLUMNS = ("negative", "space", "out")
# A JSON entry gives its clicks either in order ("clicks") or as lists of points ("positive", "negative").
JSON_KEYS = (*CSV_COLUMNS, *OPTIONAL_COLUMNS, "clicks")
CLICK_KEYS = ("point", "positive")
# Why a case was skipped under skip_existing.
EXISTING_KEPT = "its output exists (kept)"


@dataclass
class Case:
    """One volume and its clicks, in the order they are applied. `problem` says why a manifest entry cannot be
    segmented; such a case is reported as failed without running. `source` says where a manifest lists it
    ('Manifest line 3'), for messages."""

    image: Optional[Path]
    clicks: list[tuple[Point, bool]]
    space: str = "ras"
    out: Optional[Path] = None
    problem: Optional[str] = None
    source: str = ""

    def __post_init__(self) -> None:  # paths may be given as text from Python
        self.image = None if self.image is None else Path(self.image)
        self.out = None if self.out is None else Path(self.out)

    @property
    def name(self) -> str:
        """The image's name without its image extension: 'ct.v1' for ct.v1.nii.gz; a folder's whole name."""
        if self.image is None:
            return "(no image)"
        return image_stem(self.image)

    @property
    def folder(self) -> str:
        """The name of the image's folder: 'case1' for case1/image.nii.gz (abspath, not resolve: a linked image
        keeps its folder)."""
        return Path(os.path.abspath(self.image)).parent.name


@dataclass
class CaseOutcome:
    """What became of a case: segmented into `out`, failed with `error`, or not run for the reason `skipped`."""

    case: Case
    out: Optional[Path] = None
    error: Optional[str] = None
    skipped: Optional[str] = None
    voxels: int = 0
    iou: float = float("nan")
    regions: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        return "failed" if self.error is not None else "skipped" if self.skipped is not None else "ok"


def segment_volume(
    predictor: RegionPredictor,
    volume: Volume,
    clicks: Sequence[tuple[Sequence[float], bool]],
    space: str = "ras",
    prompt_mode: str = "newest",
    regions: str = "auto",
) -> SessionResult:
    """Apply `clicks` ((point, positive) in `space`) in order to one volume; the last mask is returned."""
    if not isinstance(volume, Volume):
        raise InputError(f"segment_volume needs a Volume, not {type(volume).__name__}: use Volume.from_file(path).")
    clicks = _point_label_pairs(clicks)
    if not any(positive for _, positive in clicks):  # negative clicks alone do not say what to segment
        raise InputError("No positive click was given: add at least one positive point.")
    ras = volume.points_to_ras([point for point, _ in clicks], space)
    session = InteractiveSession(predictor, prepare(volume), prompt_mode=prompt_mode, regions=regions)
    return session.set_clicks([Click(p, positive) for p, (_, positive) in zip(ras.tolist(), clicks)])


def _point_label_pairs(clicks: Sequence[tuple[Sequence[float], bool]]) -> list[tuple[Sequence[float], bool]]:
    """The clicks as a list (a generator is read once), each checked to be a (point, positive) pair."""
    pairs = list(clicks)
    for number, pair in enumerate(pairs, start=1):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and is_click_flag(pair[1])):
            raise InputError(
                f"Click {number} is {pair!r}; give each click as a (point, positive) pair like ((x, y, z), True)."
            )
    return pairs


def mask_image(mask_kji: np.ndarray, volume: Volume) -> sitk.Image:
    """A mask (bool or uint8, written as uint8) or a label map (its integer type kept) as an image with the
    volume's geometry."""
    array = np.asarray(mask_kji)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8 if array.dtype == np.bool_ else None))
    image.CopyInformation(volume.image)
    return image


def write_mask(mask_kji: np.ndarray, volume: Volume, path: PathLike, overwrite: bool = True) -> Path:
    """Write a mask or label map with the volume's geometry, whole or not at all; a .seg.nrrd as a segmentation
    with a segment named after the file. Unless `overwrite`, a file at `path` is never replaced."""
    image = mask_image(mask_kji, volume)
    if image_suffix(path).lower() == ".seg.nrrd":
        for key, value in slicer_segmentation_fields(mask_kji, image_stem(path)).items():
            image.SetMetaData(key, value)
    return write_image_atomic(image, path, overwrite)


def read_manifest(path: PathLike) -> list[Case]:
    """Cases from a CSV (columns image, positive[, negative, space, out]; points 'x,y,z' joined by ';')
    or a JSON list of {"image", "clicks": [{"point": [x, y, z], "positive": true}, ...] | "positive"/"negative",
    "space", "out"}. Relative paths are relative to the manifest's folder ('~' is the home folder). A file that
    cannot be read as a whole is an InputError; an entry that cannot be used becomes a case with a `problem`
    naming the entry (a CSV file's line, the header being line 1; a JSON list's entry, counted from 1)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"Manifest {path} is a folder; give a .csv or .json file listing images and clicks.")
    if not path.is_file():
        raise InputError(f"Manifest {path} does not exist: give a .csv or .json file listing images and clicks.")
    if path.suffix.lower() not in (".csv", ".json"):
        raise InputError(f"Manifest {path} must be a .csv or .json file.")
    entries = manifest_rows(path, columns=CSV_COLUMNS, optional=OPTIONAL_COLUMNS)
    if not entries:
        raise InputError(f"Manifest {path} lists no cases.")
    return [_case_from_entry(row.fields, path.parent, f"Manifest {row.where}") for row in entries]


def _case_from_entry(entry: object, folder: Path, where: str) -> Case:
    if not isinstance(entry, dict):
        return Case(None, [], problem=f'{where} is not an object; write each case as {{"image": ..., ...}}.')
    miscased = [key for key in entry if isinstance(key, str) and key != key.lower() and key.lower() in JSON_KEYS]
    if miscased:  # CSV headers are read without case; JSON keys are not
        keys = ", ".join(f'"{key}"' for key in miscased)
        return Case(None, [], problem=f'{where} has the key(s) {keys}; write them in lower case, like "image".')
    image = entry.get("image")
    if not isinstance(image, str) or not image.strip():
        return Case(None, [], problem=f'{where} has no \'image\' path; give each case one, like "image": "ct.nii.gz".')
    case = Case(manifest_path(folder, image), [], source=where)
    try:
        case.out = _out(entry.get("out"), folder)  # first, so that the output is known even when the clicks are bad
        if None in entry:  # where csv puts a row's fields beyond the header: every later column is shifted
            raise InputError('it has more fields than the header names; put each point in quotes, like "10,20,30".')
        case.space = _space(entry.get("space"))
        case.clicks = _clicks(entry)
    except InputError as error:
        case.problem = f"{where}: {error}"
    return case


def _clicks(entry: dict) -> list[tuple[Point, bool]]:
    _refuse_unknown_keys(entry, JSON_KEYS, "it")
    if "clicks" in entry and ("positive" in entry or "negative" in entry):
        raise InputError("it gives both 'clicks' and 'positive'/'negative'; give the clicks one way.")
    if "clicks" not in entry:
        positive, negative = _points(entry.get("positive"), "positive"), _points(entry.get("negative"), "negative")
        return [(point, True) for point in positive] + [(point, False) for point in negative]
    clicks = entry["clicks"]
    if not isinstance(clicks, list):
        raise InputError('\'clicks\' must be a list like [{"point": [x, y, z], "positive": true}].')
    return [_click(click, number) for number, click in enumerate(clicks, start=1)]


def _refuse_unknown_keys(entry: dict, known: Sequence[str], what: str) -> None:
    """A misspelt key ("negatives") would drop its clicks without a word."""
    unknown = [str(key) for key in entry if key not in known]
    if unknown:
        raise InputError(
            f"{what} has the key(s) {', '.join(unknown)}, which SAMMed3D does not read; use {', '.join(known)}."
        )


def _click(click: object, number: int) -> tuple[Point, bool]:
    if not isinstance(click, dict) or "point" not in click:
        raise InputError(f'click {number} has no "point"; write it like {{"point": [x, y, z], "positive": true}}.')
    _refuse_unknown_keys(click, CLICK_KEYS, f"click {number}")
    positive = click.get("positive", True)
    if not isinstance(positive, bool):  # bool("false") is True: only JSON true and false are safe to read
        raise InputError(f'click {number} has "positive": {json.dumps(positive)}; use true or false, unquoted.')
    return _point(click["point"]), positive


def _points(value: object, key: str) -> list[Point]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [parse_point(text) for text in value.split(";") if text.strip()]
    if isinstance(value, list):
        if value and all(isinstance(item, (int, float)) for item in value):
            raise InputError(f"'{key}' is one point {json.dumps(value)}; write a list of points, [[x, y, z]].")
        return [_point(point) for point in value]
    raise InputError(f"'{key}' must be points 'x,y,z' joined by ';', or a list of [x, y, z].")


def _point(value: object) -> Point:
    if isinstance(value, str):
        return parse_point(value)
    numbers = isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not numbers or len(value) != 3:
        raise InputError(f"Point {json.dumps(value)} is not three numbers; write it like [12.5, -30, 40].")
    return tuple(float(v) for v in value)


def _space(value: object) -> str:
    space = "ras" if value in (None, "") else value
    if not isinstance(space, str) or space.lower() not in POINT_SPACES:
        raise InputError(f"'space' is {json.dumps(value)}; use one of {', '.join(POINT_SPACES)}.")
    return space.lower()


def _out(value: object, folder: Path) -> Optional[Path]:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InputError(f"'out' is {json.dumps(value)}; give a file path such as liver_mask.nii.gz.")
    return manifest_path(folder, value)


def plan_outputs(
    cases: Sequence[Case], out_dir: PathLike, overwrite: bool = False, skip_existing: bool = False
) -> list[Case]:
    """The cases with `out` set: a case's own `out`, else <out_dir>/<image name>_mask.nii.gz, or
    <out_dir>/<image's folder>_<image name>_mask.nii.gz where several such cases share an image name, in any case
    (the usual case-per-folder layout). Raises InputError if `out_dir` is unusable or two cases would write one
    file; a case whose image does not exist, whose output is an input, or whose output exists (unless `overwrite`
    or `skip_existing`) gets that as its `problem`. Checked before any work; planned cases are planned again
    unchanged."""
    out_dir = check_output_folder(out_dir)
    # Counted over every case, runnable or not, so that fixing one row does not rename another's mask; without
    # case, as CT_mask.nii.gz and ct_mask.nii.gz are one file on macOS and Windows.
    unnamed = Counter(case.name.casefold() for case in cases if case.image is not None and case.out is None)
    repeated = {name for name, count in unnamed.items() if count > 1}
    planned = [
        replace(case, out=_default_out(case, out_dir, repeated)) if _needs_default_out(case) else case for case in cases
    ]
    _refuse_shared_outputs(planned)
    # Resolved once, not once per output.
    images = {_file_key(case.image): case.image for case in cases if case.image is not None}
    return [_with_checked_output(case, images, overwrite or skip_existing) for case in planned]


def _needs_default_out(case: Case) -> bool:
    return case.problem is None and case.out is None


def _default_out(case: Case, out_dir: Path, repeated: set[str]) -> Path:
    if case.name.casefold() not in repeated:
        return out_dir / f"{case.name}_mask.nii.gz"
    return out_dir / f"{case.folder}_{case.name}_mask.nii.gz"


def _with_checked_output(case: Case, images: dict[str, Path], overwrite: bool) -> Case:
    if case.problem is not None:
        return case
    try:
        check_image_exists(case.image)
        # Given only the input it may be: check_image_output would resolve every input again for each output.
        same_name = images.get(_file_key(case.out))
        inputs = [same_name] if same_name is not None else []
        check_image_output(case.out, inputs=inputs, overwrite=overwrite)
    except InputError as error:
        return replace(case, problem=str(error))
    return case


def _file_key(path: Path) -> str:
    """One key per file, without case: CT_mask.nii.gz and ct_mask.nii.gz are one file on macOS and Windows."""
    return str(path.resolve()).casefold()


def _refuse_shared_outputs(cases: Sequence[Case]) -> None:
    writers: dict[str, tuple[int, Case]] = {}
    for number, case in enumerate(cases, start=1):
        if case.problem is not None:
            continue
        first_number, first = writers.setdefault(_file_key(case.out), (number, case))
        if first_number != number:
            both = (
                f"{first.source} and {case.source.replace('Manifest ', '')}"
                if first.source and case.source
                else f"Cases {first_number} and {number} (counted in list order)"
            )
            raise InputError(f"{both} would both write {case.out}; give each of them its own 'out'.")


def segment_many(
    predictor: RegionPredictor,
    cases: Sequence[Case],
    out_dir: PathLike,
    prompt_mode: str = "newest",
    regions: str = "auto",
    progress: Optional[Callable[[int, int, CaseOutcome], None]] = None,
    overwrite: bool = False,
    skip_existing: bool = False,
) -> list[CaseOutcome]:
    """Segment every case into the file `plan_outputs` gives it; a failing case (among them one whose output
    exists, unless `overwrite` or `skip_existing`, or is an input) is reported in its outcome and the others still
    run. With `skip_existing`, a case whose output exists is skipped (a batch that was stopped goes on). Unless
    `overwrite`, a file that appears at a case's output while the batch runs is kept, and that case fails."""
    cases = plan_outputs(cases, out_dir, overwrite, skip_existing)
    outcomes = []
    for number, case in enumerate(cases, start=1):
        if keeps_existing_output(case, skip_existing):
            outcome = not_run(case, EXISTING_KEPT)
        else:
            outcome = _segment_case(predictor, case, prompt_mode, regions, overwrite)
        outcomes.append(outcome)
        if progress is not None:
            progress(number, len(cases), outcome)
    return outcomes


def case_labels(cases: Sequence[Case]) -> list[str]:
    """What reports call each case: its image's name, with the folder where images share a name ('case1/image',
    'case2/image' in the usual case-per-folder layout)."""
    counts = Counter(case.name.casefold() for case in cases)
    return [
        f"{case.folder}/{case.name}" if case.image is not None and counts[case.name.casefold()] > 1 else case.name
        for case in cases
    ]


def not_run(case: Case, reason: str) -> CaseOutcome:
    """The outcome of a case that is not run: failed with its problem, else skipped for `reason`."""
    if case.problem is not None:
        return CaseOutcome(case, error=case.problem)
    return CaseOutcome(case, out=case.out, skipped=reason)


def keeps_existing_output(case: Case, skip_existing: bool) -> bool:
    """Whether a planned case is skipped because its output exists (with `skip_existing`)."""
    return skip_existing and case.problem is None and case.out.exists()


def _segment_case(
    predictor: RegionPredictor, case: Case, prompt_mode: str, regions: str, overwrite: bool
) -> CaseOutcome:
    started = time.perf_counter()
    outcome = CaseOutcome(case)
    try:
        if case.problem is not None:
            raise InputError(case.problem)
        volume = Volume.from_file(case.image)
        result = segment_volume(predictor, volume, case.clicks, case.space, prompt_mode, regions)
        outcome.out = write_mask(result.mask, volume, case.out, overwrite)
        outcome.voxels = int(result.mask.sum())
        outcome.iou = result.iou
        outcome.regions = len(result.regions)
        outcome.timings = result.timings
    except SAMMed3DError as error:
        outcome.error = str(error)
    except Exception as error:  # one broken case must not stop the batch
        outcome.error = f"unexpected {type(error).__name__}: {error}"
    outcome.seconds = time.perf_counter() - started
    return outcome
