"""Undo and redo of segment edits as small box-limited diffs, with a memory cap.

A full-volume snapshot per edit costs gigabytes on large scans. An edit here is stored as, for each
segment it touched, the tightest (K, J, I) box around the voxels that changed with the patch before and
after. Each segment has its own undo and redo stacks, so undoing while working on one segment never
rewinds another; a step may still carry changes of other segments (when an edit was allowed to
overwrite them), and undoing it restores those too.

Undo and redo are applied onto the current content: only voxels still equal to the state the step
left behind are changed back, so an edit made since by someone else is never silently reverted.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .transforms import Box, bounding_box, box_shape, offset_box, relative_box, union_box

DEFAULT_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True, eq=False)
class PatchChange:
    """One segment's voxels inside `box` (K, J, I) before and after an edit."""

    segment_id: Hashable
    box: Box
    before: np.ndarray
    after: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.before.nbytes + self.after.nbytes)

    def undo_onto(self, current: np.ndarray) -> np.ndarray:
        """The box content after undoing, given its `current` content."""
        return np.where(current == self.after, self.before, current).astype(current.dtype, copy=False)

    def redo_onto(self, current: np.ndarray) -> np.ndarray:
        """The box content after redoing, given its `current` content."""
        return np.where(current == self.before, self.after, current).astype(current.dtype, copy=False)


def patch_change(segment_id: Hashable, box: Box, before: np.ndarray, after: np.ndarray) -> Optional[PatchChange]:
    """The change from `before` to `after` (both the content of `box`) cut to the voxels that differ.

    None when nothing differs. The stored patches are copies, so later edits of the arrays passed in
    do not alter the history.
    """
    if before.shape != after.shape or before.shape != box_shape(box):
        raise ValueError(f"before {before.shape}, after {after.shape} and box {box_shape(box)} must have one shape")
    tight = differing_box(before, after)
    if tight is None:
        return None
    return PatchChange(
        segment_id=segment_id,
        box=offset_box(tight, box),
        before=before[tight].copy(),
        after=after[tight].copy(),
    )


def merge_changes(older: PatchChange, newer: PatchChange) -> PatchChange:
    """One change equivalent to `older` followed by `newer` (same segment), over the union of their boxes.

    Only voxels an edit changed decide: before is the older edit's where it changed the voxel, else the newer's;
    after is the newer edit's where it changed the voxel, else the older's. A voxel neither changed (inside
    the union, its content unknown) is stored equal before and after, hence left alone by undo and redo; so is
    one the newer edit changed back.
    """
    if older.segment_id != newer.segment_id:
        raise ValueError("Only changes of the same segment can be merged.")
    union = union_box(older.box, newer.box)
    older_changed = _placed(older.before != older.after, older.box, union)
    newer_changed = _placed(newer.before != newer.after, newer.box, union)
    before = np.where(
        newer_changed & ~older_changed, _placed(newer.before, newer.box, union), _placed(older.before, older.box, union)
    )
    older_after = np.where(older_changed, _placed(older.after, older.box, union), before)
    after = np.where(newer_changed, _placed(newer.after, newer.box, union), older_after)
    return PatchChange(older.segment_id, union, before, after)


def _placed(content: np.ndarray, box: Box, union: Box) -> np.ndarray:
    """`content` of `box` in a zero array of `union`."""
    placed = np.zeros(box_shape(union), dtype=content.dtype)
    placed[relative_box(box, union)] = content
    return placed


@dataclass(frozen=True, eq=False)
class HistoryStep:
    """One user action: its voxel changes, the prompts before and after it, and the grid its boxes index (the
    last three opaque to the history; a caller compares `grid` before applying a step on another volume)."""

    segment_id: Hashable
    changes: tuple[PatchChange, ...]
    prompts_before: Any = None
    prompts_after: Any = None
    grid: Any = None

    @property
    def nbytes(self) -> int:
        return sum(change.nbytes for change in self.changes)

    def then(self, newer: HistoryStep) -> HistoryStep:
        """This step followed by `newer`, as one step."""
        merged: dict[Hashable, PatchChange] = {change.segment_id: change for change in self.changes}
        for change in newer.changes:
            earlier = merged.get(change.segment_id)
            merged[change.segment_id] = change if earlier is None else merge_changes(earlier, change)
        return HistoryStep(self.segment_id, tuple(merged.values()), self.prompts_before, newer.prompts_after, self.grid)


@dataclass(eq=False)
class _Entry:
    step: HistoryStep
    order: int
    open: bool = False


@dataclass(eq=False)
class _Stacks:
    undo: list[_Entry] = field(default_factory=list)
    redo: list[_Entry] = field(default_factory=list)


class SegmentHistory:
    """Per-segment undo/redo stacks of `HistoryStep`s, holding at most `max_bytes` of patches.

    When the cap is exceeded the oldest steps (of any segment, redo steps first) are forgotten; the
    newest step is always kept so that the last action can be undone.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes is {max_bytes}; give 0 or more (0 keeps only the newest step).")
        self.max_bytes = max_bytes
        self._stacks: dict[Hashable, _Stacks] = {}
        self._counter = itertools.count()

    def record(self, step: HistoryStep, preview: bool = False) -> None:
        """Push `step` onto its segment's undo stack and clear that segment's redo stack.

        Steps recorded with `preview=True` stay open: following steps of the same segment are merged into
        them until a step recorded without `preview` closes them, so dragging a point is one undo step.
        """
        stacks = self._stacks.setdefault(step.segment_id, _Stacks())
        stacks.redo.clear()
        top = stacks.undo[-1] if stacks.undo else None
        if top is not None and top.open:
            top.step = top.step.then(step)
            top.open = preview
            top.order = next(self._counter)
        else:
            stacks.undo.append(_Entry(step, next(self._counter), open=preview))
        self._enforce_cap()

    def close(self, segment_id: Hashable) -> None:
        """End an open preview step, so that the next step is recorded on its own."""
        stacks = self._stacks.get(segment_id)
        if stacks and stacks.undo:
            stacks.undo[-1].open = False

    def can_undo(self, segment_id: Hashable) -> bool:
        stacks = self._stacks.get(segment_id)
        return bool(stacks and stacks.undo)

    def can_redo(self, segment_id: Hashable) -> bool:
        stacks = self._stacks.get(segment_id)
        return bool(stacks and stacks.redo)

    def next_undo(self, segment_id: Hashable) -> Optional[HistoryStep]:
        """The step `undo` would return, left where it is."""
        stacks = self._stacks.get(segment_id)
        return stacks.undo[-1].step if stacks and stacks.undo else None

    def next_redo(self, segment_id: Hashable) -> Optional[HistoryStep]:
        """The step `redo` would return, left where it is."""
        stacks = self._stacks.get(segment_id)
        return stacks.redo[-1].step if stacks and stacks.redo else None

    def undo(self, segment_id: Hashable) -> Optional[HistoryStep]:
        """The step to revert (apply its changes' `undo_onto` in reverse order), moved to the redo stack."""
        stacks = self._stacks.get(segment_id)
        if not stacks or not stacks.undo:
            return None
        entry = stacks.undo.pop()
        entry.open = False
        stacks.redo.append(entry)
        return entry.step

    def redo(self, segment_id: Hashable) -> Optional[HistoryStep]:
        """The step to re-apply (its changes' `redo_onto` in order), moved back to the undo stack."""
        stacks = self._stacks.get(segment_id)
        if not stacks or not stacks.redo:
            return None
        entry = stacks.redo.pop()
        stacks.undo.append(entry)
        return entry.step

    def forget(self, segment_id: Hashable) -> None:
        """Drop the stacks of one segment (e.g. after it was deleted)."""
        self._stacks.pop(segment_id, None)

    def clear(self) -> None:
        self._stacks.clear()

    @property
    def nbytes(self) -> int:
        return sum(entry.step.nbytes for _, _, entry in self._entries())

    def _entries(self) -> list[tuple[bool, list[_Entry], _Entry]]:
        """(is an undo step, its stack, entry) for every stored step."""
        return [
            (is_undo, stack, entry)
            for stacks in self._stacks.values()
            for is_undo, stack in ((False, stacks.redo), (True, stacks.undo))
            for entry in stack
        ]

    def _enforce_cap(self) -> None:
        entries = self._entries()
        total = sum(entry.step.nbytes for _, _, entry in entries)
        if total <= self.max_bytes:
            return
        newest = max(entry.order for _, _, entry in entries)
        # Redo steps are the least likely to be wanted again, then the oldest undo steps; each stack loses steps
        # from its bottom only (a redo stack's top, the step redo applies next, is its oldest recorded).
        entries.sort(key=lambda item: (item[0], item[2].order if item[0] else -item[2].order))
        for _, stack, entry in entries:
            if total <= self.max_bytes:
                break
            if entry.order == newest:
                continue
            stack.remove(entry)
            total -= entry.step.nbytes


def differing_box(before: np.ndarray, after: np.ndarray) -> Optional[Box]:
    """The tightest box (relative to the arrays) around voxels where `before` and `after` differ."""
    return bounding_box(before != after)
