"""Segment undo/redo as box-limited diffs: exact restoration, small storage, memory cap, per-segment stacks."""

from __future__ import annotations

import numpy as np
import pytest

from SAMMed3DLib.segment_history import (
    HistoryStep,
    PatchChange,
    SegmentHistory,
    differing_box,
    merge_changes,
    patch_change,
)

SHAPE = (40, 50, 60)
WHOLE = tuple(slice(0, n) for n in SHAPE)


def sphere(center, radius, shape=SHAPE) -> np.ndarray:
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (((k - center[0]) ** 2 + (j - center[1]) ** 2 + (i - center[2]) ** 2) <= radius**2).astype(np.uint8)


class Segments:
    """Segments as full arrays, edited the way the Slicer module edits them: box patches through history."""

    def __init__(self, **arrays: np.ndarray):
        self.arrays = {name: array.copy() for name, array in arrays.items()}

    def edit(self, segment_id: str, box, new_patch: np.ndarray) -> PatchChange | None:
        before = self.arrays[segment_id][box].copy()
        self.arrays[segment_id][box] = new_patch
        return patch_change(segment_id, box, before, new_patch)

    def undo(self, step: HistoryStep) -> None:
        for change in step.changes:
            self.arrays[change.segment_id][change.box] = change.undo_onto(self.arrays[change.segment_id][change.box])

    def redo(self, step: HistoryStep) -> None:
        for change in step.changes:
            self.arrays[change.segment_id][change.box] = change.redo_onto(self.arrays[change.segment_id][change.box])

    def snapshot(self) -> dict[str, np.ndarray]:
        return {name: array.copy() for name, array in self.arrays.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_patch_change_keeps_only_the_tight_box_of_differences():
    before = np.zeros(SHAPE, np.uint8)
    after = sphere((20, 25, 30), 4)
    change = patch_change("liver", WHOLE, before, after)
    assert change.box == (slice(16, 25), slice(21, 30), slice(26, 35))
    assert change.before.shape == (9, 9, 9)
    assert change.nbytes == 2 * 9**3
    assert change.nbytes < before.nbytes / 50


def test_patch_change_of_identical_content_is_none_and_shapes_are_checked():
    content = sphere((20, 25, 30), 4)
    assert patch_change("a", WHOLE, content, content.copy()) is None
    with pytest.raises(ValueError, match="one shape"):
        patch_change("a", (slice(0, 2),) * 3, np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_patch_change_offsets_the_box_into_volume_coordinates_and_copies():
    box = (slice(10, 20), slice(5, 15), slice(30, 40))
    before = np.zeros((10, 10, 10), np.uint8)
    after = before.copy()
    after[2, 3, 4] = 1
    change = patch_change("a", box, before, after)
    assert change.box == (slice(12, 13), slice(8, 9), slice(34, 35))
    after[2, 3, 4] = 0
    assert change.after[0, 0, 0] == 1


def test_undo_and_redo_restore_every_voxel_exactly_through_several_steps():
    segments = Segments(liver=sphere((15, 20, 20), 6))
    history = SegmentHistory()
    states = [segments.snapshot()]
    edits = [
        ((slice(5, 30), slice(10, 35), slice(10, 40)), sphere((12, 12, 15), 7, (25, 25, 30))),
        ((slice(0, 40), slice(0, 20), slice(0, 20)), np.zeros((40, 20, 20), np.uint8)),
        ((slice(20, 40), slice(30, 50), slice(40, 60)), sphere((10, 10, 10), 9, (20, 20, 20))),
    ]
    for box, patch in edits:
        change = segments.edit("liver", box, patch)
        history.record(HistoryStep("liver", (change,), prompts_before=len(states) - 1, prompts_after=len(states)))
        states.append(segments.snapshot())

    for expected in reversed(range(len(edits))):
        step = history.undo("liver")
        segments.undo(step)
        assert step.prompts_before == expected
        assert_same(segments.arrays, states[expected])
    assert history.undo("liver") is None

    for expected in range(1, len(edits) + 1):
        step = history.redo("liver")
        segments.redo(step)
        assert step.prompts_after == expected
        assert_same(segments.arrays, states[expected])
    assert history.redo("liver") is None


def test_a_new_step_clears_the_redo_stack():
    segments = Segments(a=np.zeros(SHAPE, np.uint8))
    history = SegmentHistory()
    history.record(HistoryStep("a", (segments.edit("a", WHOLE, sphere((20, 20, 20), 3)),)))
    segments.undo(history.undo("a"))
    assert history.can_redo("a")
    history.record(HistoryStep("a", (segments.edit("a", WHOLE, sphere((10, 10, 10), 3)),)))
    assert not history.can_redo("a")
    assert history.redo("a") is None


def test_undo_restores_other_segments_that_an_overwriting_edit_changed_and_nothing_else():
    kidney = sphere((20, 25, 20), 8)
    spleen = sphere((20, 25, 45), 8)
    segments = Segments(liver=np.zeros(SHAPE, np.uint8), kidney=kidney, spleen=spleen)
    original = segments.snapshot()
    new_liver = sphere((20, 25, 28), 9)
    box = (slice(10, 30), slice(15, 35), slice(18, 38))
    kidney_change = segments.edit("kidney", box, kidney[box] & (1 - new_liver[box]))
    liver_change = segments.edit("liver", box, new_liver[box])
    history = SegmentHistory()
    history.record(HistoryStep("liver", (kidney_change, liver_change)))
    after_edit = segments.snapshot()
    np.testing.assert_array_equal(after_edit["spleen"], spleen)
    assert (after_edit["kidney"] & after_edit["liver"]).sum() == 0

    segments.undo(history.undo("liver"))
    assert_same(segments.arrays, original)
    segments.redo(history.redo("liver"))
    assert_same(segments.arrays, after_edit)


def test_stacks_are_per_segment():
    segments = Segments(a=np.zeros(SHAPE, np.uint8), b=np.zeros(SHAPE, np.uint8))
    history = SegmentHistory()
    history.record(HistoryStep("a", (segments.edit("a", WHOLE, sphere((10, 10, 10), 3)),)))
    history.record(HistoryStep("b", (segments.edit("b", WHOLE, sphere((30, 30, 30), 3)),)))
    b_after = segments.arrays["b"].copy()
    segments.undo(history.undo("a"))
    assert segments.arrays["a"].sum() == 0
    np.testing.assert_array_equal(segments.arrays["b"], b_after)
    assert history.can_undo("b") and not history.can_undo("a")
    history.forget("b")
    assert not history.can_undo("b") and history.undo("b") is None


def test_undo_leaves_voxels_edited_since_by_someone_else_alone():
    segments = Segments(a=np.zeros(SHAPE, np.uint8))
    history = SegmentHistory()
    history.record(HistoryStep("a", (segments.edit("a", WHOLE, sphere((20, 25, 30), 5)),)))
    segments.arrays["a"][20, 25, 30] = 0  # painted away by hand after the edit
    segments.arrays["a"][20, 25, 36] = 1  # painted by hand just outside the sphere, inside the box
    segments.undo(history.undo("a"))
    assert segments.arrays["a"][20, 25, 36] == 1
    assert segments.arrays["a"].sum() == 1


def test_preview_steps_merge_into_one_undo_step_that_spans_the_whole_drag():
    segments = Segments(a=sphere((20, 25, 10), 4))
    start = segments.snapshot()
    history = SegmentHistory()
    for step_number, center in enumerate([(20, 25, 20), (20, 25, 30), (22, 30, 40)]):
        moved = sphere(center, 5)
        change = segments.edit("a", WHOLE, moved)
        preview = step_number < 2
        history.record(HistoryStep("a", (change,), prompts_before=step_number, prompts_after=step_number + 1), preview)
    final = segments.snapshot()
    step = history.undo("a")
    assert history.undo("a") is None
    assert (step.prompts_before, step.prompts_after) == (0, 3)
    segments.undo(step)
    assert_same(segments.arrays, start)
    segments.redo(history.redo("a"))
    assert_same(segments.arrays, final)


def test_the_next_step_can_be_looked_at_before_it_is_applied_and_keeps_its_grid():
    segments = Segments(a=np.zeros(SHAPE, np.uint8))
    history = SegmentHistory()
    assert history.next_undo("a") is None and history.next_redo("a") is None
    history.record(HistoryStep("a", (segments.edit("a", WHOLE, sphere((10, 10, 10), 3)),), grid="ct"), preview=True)
    history.record(HistoryStep("a", (segments.edit("a", WHOLE, sphere((12, 10, 10), 3)),), grid="ct"))
    step = history.next_undo("a")
    assert step.grid == "ct" and history.next_undo("a") is step  # looking moves nothing
    assert history.undo("a") is step and history.next_undo("a") is None
    assert history.next_redo("a") is step and history.redo("a") is step


def test_close_ends_an_open_preview_step():
    segments = Segments(a=np.zeros(SHAPE, np.uint8))
    history = SegmentHistory()
    history.record(HistoryStep("a", (segments.edit("a", WHOLE, sphere((10, 10, 10), 3)),)), preview=True)
    history.close("a")
    history.record(HistoryStep("a", (segments.edit("a", WHOLE, sphere((30, 30, 30), 3)),)))
    assert history.undo("a") is not None and history.undo("a") is not None


def test_merge_changes_covers_disjoint_boxes_and_leaves_the_gap_untouched():
    older = patch_change("a", WHOLE, np.zeros(SHAPE, np.uint8), sphere((5, 5, 5), 2))
    newer = patch_change("a", WHOLE, np.zeros(SHAPE, np.uint8), sphere((30, 40, 50), 2))
    merged = merge_changes(older, newer)
    assert merged.box == (slice(3, 33), slice(3, 43), slice(3, 53))
    current = np.ones(merged.before.shape, np.uint8)  # content unknown to both edits
    gap = (15, 20, 25)
    assert merged.undo_onto(current)[gap] == 1 and merged.redo_onto(current)[gap] == 1
    with pytest.raises(ValueError, match="same segment"):
        merge_changes(older, patch_change("b", WHOLE, np.zeros(SHAPE, np.uint8), sphere((5, 5, 5), 2)))


def test_a_drag_of_previews_in_separate_places_undoes_to_exactly_the_state_before_it():
    """Each merge fills the gap between the boxes; a later preview over that gap must not take the filler for
    what was there (a voxel painted by hand before the drag was erased by its undo)."""
    painted = np.zeros(SHAPE, np.uint8)
    painted[20, 25, 30] = 1
    segments = Segments(a=painted)
    history = SegmentHistory()
    for center, preview in (((5, 5, 5), True), ((35, 45, 55), True), ((20, 25, 28), False)):
        mask = segments.arrays["a"] | sphere(center, 3)
        history.record(HistoryStep("a", (segments.edit("a", WHOLE, mask),)), preview=preview)
    after_the_drag = segments.snapshot()
    step = history.undo("a")
    assert history.undo("a") is None  # one step for the whole drag
    segments.undo(step)
    assert_same(segments.snapshot(), {"a": painted})
    segments.redo(step)
    assert_same(segments.snapshot(), after_the_drag)


def test_merging_a_change_that_an_edit_undid_leaves_that_voxel_alone():
    older = patch_change("a", WHOLE, np.zeros(SHAPE, np.uint8), sphere((20, 25, 30), 4))
    newer = patch_change("a", WHOLE, sphere((20, 25, 30), 4), np.zeros(SHAPE, np.uint8))
    merged = merge_changes(older, newer)
    current = np.full(merged.before.shape, 7, np.uint8)  # whatever is there now stays
    np.testing.assert_array_equal(merged.undo_onto(current), current)
    np.testing.assert_array_equal(merged.redo_onto(current), current)


def test_memory_cap_drops_the_oldest_steps_but_keeps_the_newest():
    segments = Segments(a=np.zeros(SHAPE, np.uint8))
    one_step = patch_change("a", WHOLE, np.zeros(SHAPE, np.uint8), sphere((20, 25, 30), 5)).nbytes
    history = SegmentHistory(max_bytes=int(2.5 * one_step))
    for n in range(5):
        center = (20, 25, 30) if n % 2 == 0 else (20, 25, 29)
        history.record(HistoryStep("a", (segments.edit("a", WHOLE, sphere(center, 5)),), prompts_after=n))
        assert history.nbytes <= history.max_bytes
    assert history.undo("a").prompts_after == 4
    assert history.undo("a").prompts_after == 3
    assert history.undo("a") is None

    tiny = SegmentHistory(max_bytes=1)
    tiny.record(HistoryStep("a", (segments.edit("a", WHOLE, sphere((5, 5, 5), 3)),), prompts_after="last"))
    assert tiny.undo("a").prompts_after == "last"


def test_memory_cap_drops_redo_steps_before_undo_steps():
    segments = Segments(a=np.zeros(SHAPE, np.uint8), b=np.zeros(SHAPE, np.uint8))
    change_size = patch_change("a", WHOLE, np.zeros(SHAPE, np.uint8), sphere((20, 25, 30), 5)).nbytes
    history = SegmentHistory(max_bytes=int(2.5 * change_size))
    history.record(HistoryStep("a", (segments.edit("a", WHOLE, sphere((20, 25, 30), 5)),), prompts_after="a1"))
    history.record(HistoryStep("a", (segments.edit("a", WHOLE, sphere((20, 25, 29), 5)),), prompts_after="a2"))
    history.undo("a")  # a2 is now a redo step
    history.record(HistoryStep("b", (segments.edit("b", WHOLE, sphere((20, 25, 30), 5)),), prompts_after="b1"))
    assert not history.can_redo("a")
    assert history.undo("a").prompts_after == "a1"
    assert history.undo("b").prompts_after == "b1"


def test_memory_cap_drops_a_redo_stack_from_its_bottom_so_redo_never_skips_a_step():
    segments = Segments(a=np.zeros(SHAPE, np.uint8), b=np.zeros(SHAPE, np.uint8))
    history = SegmentHistory()
    states = [segments.snapshot()]
    for n, center in enumerate(((10, 10, 10), (20, 25, 30), (30, 40, 50)), start=1):
        mask = segments.arrays["a"] | sphere(center, 4)
        history.record(HistoryStep("a", (segments.edit("a", WHOLE, mask),), prompts_after=f"a{n}"))
        states.append(segments.snapshot())
    for _ in range(3):
        segments.undo(history.undo("a"))  # the redo stack: a3 at its bottom, a1 on top
    history.max_bytes = history.nbytes  # the next step of another segment goes over the cap
    history.record(HistoryStep("b", (segments.edit("b", WHOLE, sphere((20, 25, 30), 2)),), prompts_after="b1"))
    assert history.nbytes <= history.max_bytes
    step = history.redo("a")
    assert step.prompts_after == "a1"
    segments.redo(step)
    np.testing.assert_array_equal(segments.arrays["a"], states[1]["a"])


def test_differing_box_is_none_for_equal_arrays():
    a = sphere((10, 10, 10), 3)
    assert differing_box(a, a.copy()) is None
    b = a.copy()
    b[0, 49, 59] = 1
    assert differing_box(a, b) == (slice(0, 1), slice(49, 50), slice(59, 60))


def test_a_negative_memory_cap_is_refused():
    with pytest.raises(ValueError, match="max_bytes is -1"):
        SegmentHistory(max_bytes=-1)
