"""Interactive segmentation of one target in one volume: the click list is the state.

Every change of the click list (add, move, delete, undo, redo) replays the list from scratch. That is
cheap: each 128^3 region's image embedding is computed once and cached by the predictor, and a
decoder step takes milliseconds. Replay makes a moved or deleted click give exactly the mask that the
edited list gives, with no hidden history. It starts at the first include click (exclude clicks placed
before it follow it); a list of exclude clicks alone gives an empty mask.

Regions: the first include click centres the first region (the official click-centred crop). An include
click outside every region opens a region centred on it. In `auto` mode a mask that touches a region's face
extends the work with a neighbouring region overlapping by half (the paper's strategy for targets larger than
192 mm), seeded with a click inside the mask and the overlapping part of the logits; a neighbour holding
background alone (nothing above 0) is left out. Every region is given its opening prompt (the include click or
the seed), then every click that lies inside it, in replay order, whichever region opened first: where regions
overlap a voxel takes the mask of the region whose centre is nearest, and that region must have seen the clicks
there. An exclude click outside every region at its turn is replayed right after the include click whose region
first holds it (so where it sits in the list does not matter); one that no include click's region holds acts
only on the automatic neighbours that hold it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from .errors import InputError
from .postprocess import Footprint, region_footprint, tight_box
from .predictor import RegionPredictor
from .preprocess import PreparedVolume, Region
from .transforms import intersect_boxes, relative_box

PROMPT_MODES = ("newest", "accumulate")
REGION_MODES = ("auto", "1")
KJI = tuple[slice, slice, slice]
# Footprints kept beyond the regions one result may need: undoing a click that opened a region finds the
# earlier ones still there; unless they hold more than FOOTPRINT_CACHE_BYTES (on a 0.4 mm grid one footprint takes
# about half a GB: kept spares would take gigabytes).
SPARE_FOOTPRINTS = 2
FOOTPRINT_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class Click:
    """A click in the volume's RAS coordinates (mm); positive includes, negative excludes.

    The point is stored as a tuple of three floats, whatever sequence or array it is given as, so a click
    compares by value and never changes with the caller's list.
    """

    ras: tuple[float, float, float]
    positive: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "ras", _as_point(self.ras))
        if not is_click_flag(self.positive):
            raise InputError(f"A click's 'positive' must be True or False, not {self.positive!r}.")
        object.__setattr__(self, "positive", bool(self.positive))


@dataclass
class SessionResult:
    """The mask of the current click list on the volume's own grid, and how it was made."""

    clicks: tuple[Click, ...]
    mask: np.ndarray  # uint8, (K, J, I), the volume's grid
    iou: float  # predicted IoU of the first region's last step (nan without an include click)
    regions: list[Region]
    timings: dict[str, float]
    changed: Optional[KJI]  # bounding box of voxels that differ from the previous result
    # The session's first result with a region (or a preview before it): `changed` then compares with an empty
    # mask, so a caller writing into a segment that had voxels before must clear those outside `changed` itself.
    # Results before it (exclude clicks alone) have no mask and change nothing: a segment keeps its voxels.
    first: bool = False
    # The previous result's mask, which `changed` compares with (None for a session's very first result): a
    # caller can write only the voxels the model changed and keep edits made to its segment by other means.
    previous: Optional[np.ndarray] = None


class _PlacedClick(NamedTuple):
    """A click and its canonical voxel."""

    click: Click
    voxel: np.ndarray


@dataclass
class _RegionRun:
    """Decoder state of one region during a replay."""

    region: Region
    embedding: torch.Tensor
    size: int
    points: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    logits: Optional[torch.Tensor] = None
    iou: float = float("nan")
    mask: Optional[np.ndarray] = None

    def contains(self, index: np.ndarray) -> bool:
        return bool(np.all(index >= 0) and np.all(index < self.size))

    def copy(self) -> _RegionRun:
        """A copy whose click lists can grow independently (tensors are never modified in place)."""
        return replace(self, points=list(self.points), labels=list(self.labels), mask=None)


class InteractiveSession:
    """One target in one prepared volume. Several sessions may share one predictor (and its cache)."""

    def __init__(
        self,
        predictor: RegionPredictor,
        prepared: PreparedVolume,
        prompt_mode: str = "newest",
        regions: str = "auto",
        max_regions: int = 6,
    ) -> None:
        if prompt_mode not in PROMPT_MODES:
            raise InputError(f"Unknown prompt mode '{prompt_mode}': choose one of {', '.join(PROMPT_MODES)}.")
        if regions not in REGION_MODES:
            raise InputError(f"Unknown region mode '{regions}': choose one of {', '.join(REGION_MODES)}.")
        if not isinstance(prepared, PreparedVolume):
            raise InputError(
                f"A session needs a PreparedVolume, not {type(prepared).__name__}: pass PreparedVolume(volume)."
            )
        if max_regions < 1:
            raise InputError(f"max_regions is {max_regions}; give 1 or more.")
        self.predictor = predictor
        self.prepared = prepared
        self.prompt_mode = prompt_mode
        self.regions = regions
        self.max_regions = max_regions
        self._history: list[tuple[Click, ...]] = [()]
        self._position = 0
        self._last: Optional[SessionResult] = None
        self._drawn = False  # whether a result had a region yet
        self._last_boxes: list[KJI] = []
        # Replay cache: _snapshots[n] = the regions' decoder state after the first n clicks of _replayed.
        self._replayed: tuple[Click, ...] = ()
        self._snapshots: list[list[_RegionRun]] = [[]]
        # Least recently used first; bounded by _footprints_of (one can take hundreds of MB).
        self._footprints: dict[tuple[int, int, int], Footprint] = {}

    @property
    def clicks(self) -> tuple[Click, ...]:
        return self._history[self._position]

    @property
    def can_undo(self) -> bool:
        return self._position > 0

    @property
    def can_redo(self) -> bool:
        return self._position < len(self._history) - 1

    def set_clicks(self, clicks: Sequence[Click]) -> SessionResult:
        """Make `clicks` the state (an undoable action) and return its mask."""
        clicks = _checked_clicks(clicks)
        result = self._compute(clicks)  # validates before the history changes
        del self._history[self._position + 1 :]
        self._history.append(clicks)
        self._position += 1
        return result

    def add_click(self, click: Click) -> SessionResult:
        return self.set_clicks(self.clicks + (click,))

    def move_click(self, index: int, ras: Sequence[float]) -> SessionResult:
        clicks = list(self.clicks)
        index = self._checked_index(index)
        clicks[index] = Click(ras, clicks[index].positive)
        return self.set_clicks(clicks)

    def delete_click(self, index: int) -> SessionResult:
        clicks = list(self.clicks)
        del clicks[self._checked_index(index)]
        return self.set_clicks(clicks)

    def _checked_index(self, index: int) -> int:
        count = len(self.clicks)
        if not -count <= index < count:
            raise InputError(f"There is no click {index}: the session has {count} click(s), numbered from 0.")
        return index

    def reset(self) -> SessionResult:
        """Remove every click (undoable)."""
        return self.set_clicks(())

    def preview(self, clicks: Sequence[Click]) -> SessionResult:
        """The mask `clicks` would give, without changing the state (e.g. while a point is dragged)."""
        return self._compute(_checked_clicks(clicks))

    def undo(self) -> Optional[SessionResult]:
        if not self.can_undo:
            return None
        # Computed before the position moves: an undo that fails (say, out of memory) changes nothing, and the
        # next edit does not silently build on a click list whose mask the caller never got.
        result = self._compute(self._history[self._position - 1])
        self._position -= 1
        return result

    def redo(self) -> Optional[SessionResult]:
        if not self.can_redo:
            return None
        result = self._compute(self._history[self._position + 1])  # as in undo: a failure changes nothing
        self._position += 1
        return result

    # Replay -----------------------------------------------------------------------------------

    def _compute(self, clicks: tuple[Click, ...]) -> SessionResult:
        timings = {"region_input": 0.0, "encoder": 0.0, "decoder": 0.0, "upsample": 0.0, "paste": 0.0}
        started = time.perf_counter()
        if clicks:
            self.prepared.volume.points_to_ras([click.ras for click in clicks], "ras")  # rejects points outside
        placed = self._placed_in_replay_order(clicks)
        ordered = tuple(item.click for item in placed)
        runs, done = self._resume_from_common_prefix(ordered)
        self._replayed = ordered[:done]
        for position in range(done, len(placed)):
            self._apply(placed, position, runs, timings)
            self._snapshots.append([run.copy() for run in runs])
            self._replayed = ordered[: len(self._snapshots) - 1]
        for run in runs:
            self._finish(run, timings)
        if self.regions == "auto":
            self._extend_along_borders(runs, placed, timings)
        result = self._assemble(clicks, runs, timings)
        timings["total"] = time.perf_counter() - started
        return result

    def _placed_in_replay_order(self, clicks: tuple[Click, ...]) -> list[_PlacedClick]:
        """The clicks with their canonical voxels, in the order the regions are given them."""
        placed = [
            _PlacedClick(click, self.prepared.canonical_voxel_of_ras(np.asarray(click.ras, dtype=float)))
            for click in replay_order(clicks)
        ]
        if self.regions == "1":  # one region: a click outside it is refused, none waits for another
            return placed
        return _excludes_after_their_region(placed, self.predictor.input_size)

    def _apply(
        self, placed: list[_PlacedClick], position: int, runs: list[_RegionRun], timings: dict[str, float]
    ) -> None:
        """Step every region holding click `position`; an include click outside all of them opens its own region."""
        click, voxel = placed[position]
        containing = [run for run in runs if run.contains(voxel - run.region.begin)]
        if not containing and runs and self.regions == "1":
            raise InputError(
                f"The click at RAS {_fmt(click.ras)} lies outside the 128^3 region around the first include "
                "click: use region mode 'auto' to extend the work, or click inside the region."
            )
        if not containing and click.positive:  # an exclude click where no region is has nothing to take away (yet)
            runs.append(self._opened_by(placed, position, timings))
        for run in containing:
            self._step(run, voxel - run.region.begin, int(click.positive), timings)

    def _opened_by(self, placed: list[_PlacedClick], position: int, timings: dict[str, float]) -> _RegionRun:
        """The region centred on include click `position`, stepped with it, then with the earlier clicks inside."""
        voxel = placed[position].voxel
        run = self._open_region(self.prepared.region(_centred_begin(voxel, self.predictor.input_size)), timings)
        self._step(run, voxel - run.region.begin, 1, timings)
        self._step_with_clicks_inside(run, placed[:position], timings)
        return run

    def _step_with_clicks_inside(
        self, run: _RegionRun, placed: Sequence[_PlacedClick], timings: dict[str, float]
    ) -> None:
        for click, voxel in placed:
            if run.contains(voxel - run.region.begin):
                self._step(run, voxel - run.region.begin, int(click.positive), timings)

    def _resume_from_common_prefix(self, clicks: tuple[Click, ...]) -> tuple[list[_RegionRun], int]:
        """Decoder state after the longest prefix shared with the last replay (same result as from scratch:
        the steps are deterministic), and how many clicks it covers."""
        common = 0
        for old, new in zip(self._replayed, clicks):
            if old != new:
                break
            common += 1
        del self._snapshots[common + 1 :]
        return [run.copy() for run in self._snapshots[common]], common

    def _open_region(self, region: Region, timings: dict[str, float]) -> _RegionRun:
        key = (self.prepared.cache_token, tuple(int(v) for v in region.begin))
        computed = []

        def network_input() -> torch.Tensor:
            started = time.perf_counter()
            tensor = region.network_input()
            computed.append(time.perf_counter() - started)
            return tensor

        started = time.perf_counter()
        embedding = self.predictor.embedding_for(key, network_input)
        if computed:
            timings["region_input"] += computed[0]
            timings["encoder"] += time.perf_counter() - started - computed[0]
        return _RegionRun(region=region, embedding=embedding, size=self.predictor.input_size)

    def _step(self, run: _RegionRun, index: np.ndarray, label: int, timings: dict[str, float]) -> None:
        run.points.append(np.asarray(index, dtype=np.float32))
        run.labels.append(label)
        if self.prompt_mode == "newest":
            points, labels = run.points[-1:], run.labels[-1:]
        else:
            points, labels = run.points, run.labels
        started = time.perf_counter()
        first = run.logits is None  # the step where a model with alternative masks may answer with one of them
        run.logits, run.iou = self.predictor.decode(
            run.embedding, np.stack(points), np.array(labels), run.logits, run.region.raw if first else None
        )
        timings["decoder"] += time.perf_counter() - started

    def _finish(self, run: _RegionRun, timings: dict[str, float]) -> None:
        """Upsample and threshold the region's last logits (only once, after its last step)."""
        started = time.perf_counter()
        run.mask = self.predictor.upsample_to_mask(run.logits)
        timings["upsample"] += time.perf_counter() - started

    def _extend_along_borders(
        self, runs: list[_RegionRun], placed: list[_PlacedClick], timings: dict[str, float]
    ) -> None:
        shape = np.array(self.prepared.canonical.shape)
        queue = list(runs)
        while queue and len(runs) < self.max_regions:
            run = queue.pop(0)
            for axis, direction in _touched_faces(run.mask):
                if len(runs) >= self.max_regions:
                    return
                if not _reaches_beyond(run.region.begin, run.size, shape, axis, direction):
                    continue
                begin = np.array(run.region.begin, dtype=int)
                begin[axis] += direction * (run.size // 2)
                if any(np.array_equal(begin, other.region.begin) for other in runs):
                    continue
                seed = _seed_in_overlap(run.mask, axis, direction)
                if seed is None:
                    continue
                try:
                    new = self._open_region(self.prepared.region(begin), timings)
                except InputError:  # nothing above 0 there, or one value only (air, padding): nothing to extend into
                    continue
                new.logits = _shift_logits(run.logits, axis, direction)
                self._step(new, seed, 1, timings)
                self._step_with_clicks_inside(new, placed, timings)
                self._finish(new, timings)
                runs.append(new)
                queue.append(new)

    def _assemble(self, clicks: tuple[Click, ...], runs: list[_RegionRun], timings: dict[str, float]) -> SessionResult:
        started = time.perf_counter()
        volume = self.prepared.volume
        mask = np.zeros(volume.shape_kji, dtype=np.uint8)
        boxes = []
        footprints = self._footprints_of([run.region for run in runs])
        if len(runs) == 1:
            mask[footprints[0].box] = footprints[0].paste(runs[0].mask)
            boxes.append(footprints[0].box)
        elif runs:
            boxes = _paste_nearest_region(mask, runs, footprints, volume.ijk_to_ras)
        timings["paste"] += time.perf_counter() - started
        changed = self._changed_box(mask, boxes)
        result = SessionResult(
            first=bool(runs) and not self._drawn,
            clicks=clicks,
            mask=mask,
            iou=runs[0].iou if runs else float("nan"),
            regions=[run.region for run in runs],
            timings=timings,
            changed=changed,
            previous=self._last.mask if self._last is not None else None,
        )
        self._last = result
        self._last_boxes = boxes
        self._drawn = self._drawn or bool(runs)
        return result

    def _footprints_of(self, regions: list[Region]) -> list[Footprint]:
        """Where the regions land on the volume's grid; the least recently used others are forgotten first, so
        that a drag (a new region start per mouse position) does not keep one footprint per position, and while
        all of them hold more than FOOTPRINT_CACHE_BYTES."""
        needed = {region.begin for region in regions}
        most = 1 if self.regions == "1" else self.max_regions
        limit = max(most + SPARE_FOOTPRINTS, len(needed))
        missing = len(needed - self._footprints.keys())
        unneeded = [begin for begin in self._footprints if begin not in needed]
        for begin in unneeded[: max(0, len(self._footprints) + missing - limit)]:
            del self._footprints[begin]
        footprints = [self._footprint(region) for region in regions]
        held = sum(footprint.nbytes for footprint in self._footprints.values())
        for begin in [begin for begin in self._footprints if begin not in needed]:
            if held <= FOOTPRINT_CACHE_BYTES:
                break
            held -= self._footprints.pop(begin).nbytes
        return footprints

    def _footprint(self, region: Region) -> Footprint:
        footprint = self._footprints.pop(region.begin, None)
        if footprint is None:
            footprint = region_footprint(region, self.prepared.volume)
        self._footprints[region.begin] = footprint  # now the most recently used
        return footprint

    def _changed_box(self, mask: np.ndarray, boxes: list[KJI]) -> Optional[KJI]:
        """Bounding box of the voxels that differ from the previous result (only footprints can differ)."""
        previous = self._last.mask if self._last is not None else None
        candidates = boxes + (self._last_boxes if previous is not None else [])
        if not candidates:
            return None
        union = _union_box(candidates)
        before = previous[union] if previous is not None else np.zeros_like(mask[union])
        differs = before != mask[union]
        return tight_box(differs, union) if differs.any() else None


def _paste_nearest_region(
    mask: np.ndarray, runs: list[_RegionRun], footprints: list[Footprint], ijk_to_ras: np.ndarray
) -> list[KJI]:
    """Where regions overlap, each voxel takes the mask of the region whose centre is nearest (the first of them
    at the same float32 distance)."""
    centres = [np.asarray(run.region.center_ras, dtype=np.float64) for run in runs]
    for run, footprint, owned in zip(runs, footprints, _owned_voxels(footprints, centres, ijk_to_ras)):
        np.copyto(mask[footprint.box], footprint.paste(run.mask), where=owned)
    return [footprint.box for footprint in footprints]


def _owned_voxels(footprints: list[Footprint], centres: list[np.ndarray], ijk_to_ras: np.ndarray) -> list[np.ndarray]:
    """Per footprint, the voxels its region pastes: inside it, and no other region inside there is nearer (or as
    near and earlier). Regions are compared in pairs, over the boxes they share only."""
    owned = [footprint.inside.copy() for footprint in footprints]
    for first, second in combinations(range(len(footprints)), 2):
        shared = intersect_boxes(footprints[first].box, footprints[second].box)
        if shared is None:
            continue
        in_first, in_second = relative_box(shared, footprints[first].box), relative_box(shared, footprints[second].box)
        first_wins = _first_is_nearer(shared, ijk_to_ras, centres[first], centres[second])
        owned[first][in_first] &= first_wins | ~footprints[second].inside[in_second]
        owned[second][in_second] &= ~first_wins | ~footprints[first].inside[in_first]
    return owned


def _first_is_nearer(box: KJI, ijk_to_ras: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Whether each voxel centre of a KJI box is at most as far from `first` as from `second`, both distances
    rounded to float32 as `_distance_to_point` gives them (ties go to the first, the earlier region).

    |x - first|^2 - |x - second|^2 = 2 (second - first) . (x - midpoint) is affine in the voxel index, so a float32
    sum of three per-axis terms decides all but the voxels too near the bisecting plane for it (those where the
    float32 rounding of the distances could tie or swap them), which are decided by the distances themselves."""
    k, j, i = _box_axes(box)
    direction = 2.0 * (second - first)
    gradient = ijk_to_ras[:3, :3].T @ direction  # per i, j, k
    plane = (gradient[2] * k + direction @ (ijk_to_ras[:3, 3] - (first + second) / 2))[:, None] + gradient[1] * j
    along_i = (gradient[0] * i).astype(np.float32)
    difference = plane.astype(np.float32)[:, :, None] + along_i
    first_wins = difference < 0
    farthest = max(
        np.linalg.norm(_box_corners_ras(box, ijk_to_ras) - centre, axis=1).max() for centre in (first, second)
    )
    # Bound on the float32 sum's error plus the band where the distances' float32 rounding decides, with margin.
    tolerance = 2.0**-20 * (np.abs(plane).max() + np.abs(along_i).max() + farthest**2) + 1e-6
    unsure = np.abs(difference, out=difference) <= tolerance
    if unsure.any():
        kk, jj, ii = np.nonzero(unsure)
        points = (k[kk], j[jj], i[ii])
        first_wins[unsure] = _distance_to_point(*points, ijk_to_ras, first) <= _distance_to_point(
            *points, ijk_to_ras, second
        )
    return first_wins


def _distance_to_point(
    k: np.ndarray, j: np.ndarray, i: np.ndarray, ijk_to_ras: np.ndarray, point: np.ndarray
) -> np.ndarray:
    """Distance (mm), rounded to float32, from voxel centres (float64 indices that broadcast) to a RAS point."""
    offset = ijk_to_ras[:3, 3] - point
    columns = ijk_to_ras[:3, :3]
    squared = 0.0
    for axis in range(3):
        component = (columns[axis, 2] * k + columns[axis, 1] * j + columns[axis, 0] * i) + offset[axis]
        squared = squared + component**2
    return np.sqrt(squared).astype(np.float32)


def _box_axes(box: KJI) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.arange(s.start, s.stop, dtype=np.float64) for s in box)  # type: ignore[return-value]


def _box_corners_ras(box: KJI, ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS of the 8 outermost voxel centres of a KJI box (the farthest from any point is one of them)."""
    kji = np.array(np.meshgrid(*([s.start, s.stop - 1] for s in box), indexing="ij"), dtype=np.float64).reshape(3, -1)
    return (ijk_to_ras[:3, :3] @ kji[::-1] + ijk_to_ras[:3, 3:4]).T


def _union_box(boxes: Sequence[KJI]) -> KJI:
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))


def _touched_faces(mask: np.ndarray) -> list[tuple[int, int]]:
    """(axis, direction) of every face of a region mask that the mask touches."""
    faces = []
    for axis in range(3):
        for direction, index in ((-1, 0), (1, -1)):
            if np.take(mask, index, axis=axis).any():
                faces.append((axis, direction))
    return faces


def _reaches_beyond(begin: Sequence[int], size: int, shape: np.ndarray, axis: int, direction: int) -> bool:
    """Whether the volume goes on beyond a region's face (else there is nothing to extend into)."""
    if direction > 0:
        return begin[axis] + size < shape[axis]
    return begin[axis] > 0


def _seed_in_overlap(mask: np.ndarray, axis: int, direction: int) -> Optional[np.ndarray]:
    """A mask voxel in the half shared with the neighbour, in the neighbour's region indices."""
    half = mask.shape[axis] // 2
    kept = slice(half, None) if direction > 0 else slice(None, half)
    index = [slice(None)] * 3
    index[axis] = kept
    voxels = np.argwhere(mask[tuple(index)])
    if not len(voxels):
        return None
    centroid = voxels.mean(axis=0)
    seed = voxels[np.argmin(((voxels - centroid) ** 2).sum(axis=1))].copy()
    if direction > 0:
        seed[axis] += half
    # Shift into the neighbour: its index = ours - direction * half.
    seed[axis] -= direction * half
    return seed


def _shift_logits(logits: torch.Tensor, axis: int, direction: int) -> torch.Tensor:
    """Low-resolution logits of the overlapping half, placed in the neighbour's grid (rest zero)."""
    shifted = torch.zeros_like(logits)
    half = logits.shape[2 + axis] // 2
    source = [slice(None)] * 5
    target = [slice(None)] * 5
    source[2 + axis] = slice(half, None) if direction > 0 else slice(None, half)
    target[2 + axis] = slice(None, half) if direction > 0 else slice(half, None)
    shifted[tuple(target)] = logits[tuple(source)]
    return shifted


def is_click_flag(value: object) -> bool:
    """Whether `value` can say include or exclude: a boolean, or the integer 1 or 0."""
    return isinstance(value, (bool, np.bool_, int, np.integer)) and value in (0, 1)


def replay_order(clicks: Sequence[Click]) -> tuple[Click, ...]:
    """The order the decoder is given the clicks in: from the first positive click on, with any negative clicks
    placed before it right after it. Exclude clicks alone do not say what to segment (no positive click: no
    mask), and SAM, like its training, starts from an include click."""
    first = next((index for index, click in enumerate(clicks) if click.positive), None)
    if first is None:
        return ()
    return (clicks[first], *clicks[:first], *clicks[first + 1 :])


def _excludes_after_their_region(placed: list[_PlacedClick], size: int) -> list[_PlacedClick]:
    """Replay order with each exclude click that lies outside every region at its turn moved to right after the
    include click whose region first holds it (regions that include clicks open depend on the clicks alone: each
    is centred on the first include click outside the earlier ones). Exclude clicks no such region holds stay."""
    begins: list[np.ndarray] = []
    order: list[int] = []
    waiting: list[int] = []
    for index, (click, voxel) in enumerate(placed):
        if any(_holds(begin, size, voxel) for begin in begins):
            order.append(index)
        elif not click.positive:
            order.append(index)
            waiting.append(index)
        else:
            begins.append(_centred_begin(voxel, size))
            held = [other for other in waiting if _holds(begins[-1], size, placed[other].voxel)]
            waiting = [other for other in waiting if other not in held]
            order = [other for other in order if other not in held] + [index, *held]
    return [placed[index] for index in order]


def _centred_begin(voxel: np.ndarray, size: int) -> np.ndarray:
    """Where the region an include click at canonical `voxel` opens begins: centred on the click."""
    return voxel - size // 2


def _holds(begin: np.ndarray, size: int, voxel: np.ndarray) -> bool:
    return bool(np.all(voxel >= begin) and np.all(voxel < begin + size))


def _checked_clicks(clicks: Sequence[Click]) -> tuple[Click, ...]:
    clicks = tuple(clicks)
    for number, click in enumerate(clicks):
        if not isinstance(click, Click):
            raise InputError(f"Click {number} is a {type(click).__name__}, not a Click: write Click((x, y, z)).")
    return clicks


def _as_point(values: Sequence[float]) -> tuple[float, float, float]:
    try:
        point = tuple(float(v) for v in np.asarray(values, dtype=float).reshape(-1))
    except (TypeError, ValueError):
        raise InputError(f"A point needs three numbers x, y, z; got {values!r}.") from None
    if len(point) != 3:
        raise InputError(f"A point needs three coordinates, got {len(point)}: give x, y, z.")
    return point  # type: ignore[return-value]


def _fmt(point: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in point) + ")"
