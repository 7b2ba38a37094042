"""Interactive session: replay semantics, undo/redo, prompt modes, regions, and official click-centred parity."""

from __future__ import annotations

import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY, shared_path

from SAMMed3DLib import session as session_module
from SAMMed3DLib.checkpoint import load_model
from SAMMed3DLib.config import build_model
from SAMMed3DLib.errors import InputError
from SAMMed3DLib.postprocess import region_footprint
from SAMMed3DLib.predictor import RegionPredictor
from SAMMed3DLib.preprocess import PreparedVolume
from SAMMed3DLib.session import Click, InteractiveSession
from SAMMed3DLib.volume import Volume


class CountingPredictor(RegionPredictor):
    """A predictor that counts image-encoder runs."""

    encoder_runs = 0

    def embed(self, region_input):
        self.encoder_runs += 1
        return super().embed(region_input)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(7)
    model = build_model(TINY)
    with torch.no_grad():  # make random masks non-trivial: larger hypernetwork outputs
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[2].weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def volume() -> Volume:
    """A synthetic oblique, anisotropic CT-like volume: a bright ellipsoid in soft tissue."""
    size = (90, 80, 40)  # I, J, K
    k, j, i = np.meshgrid(*(np.arange(n) for n in reversed(size)), indexing="ij")
    body = 40 + 10 * np.sin(i / 7.0) * np.cos(j / 5.0)
    organ = ((i - 45) / 20.0) ** 2 + ((j - 40) / 15.0) ** 2 + ((k - 20) / 8.0) ** 2 < 1
    array = np.where(organ, 150, body).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.2, 1.0, 3.0))
    image.SetOrigin((-50.0, 20.0, -30.0))
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(tuple(rotation.ravel()))
    return Volume.from_sitk(image)


@pytest.fixture(scope="module")
def prepared(volume) -> PreparedVolume:
    return PreparedVolume(volume)


def _textured(shape_kji) -> np.ndarray:
    return np.random.default_rng(0).integers(50, 150, size=shape_kji).astype(np.int16)


def _session(model, prepared, **options):
    return InteractiveSession(CountingPredictor(model), prepared, **options)


def _ras(volume, ijk):
    return tuple(volume.ijk_to_ras_points([ijk])[0])


def test_first_click_gives_a_mask_on_the_volume_grid(tiny_model, volume, prepared):
    result = _session(tiny_model, prepared).add_click(Click(_ras(volume, (45, 40, 20))))
    assert result.mask.shape == volume.shape_kji and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {0, 1}
    assert len(result.regions) >= 1 and np.isfinite(result.iou)
    assert {"encoder", "decoder", "paste", "total"} <= set(result.timings)


def test_refinement_reuses_the_embedding(tiny_model, volume, prepared):
    session = _session(tiny_model, prepared, regions="1")
    session.add_click(Click(_ras(volume, (45, 40, 20))))
    session.add_click(Click(_ras(volume, (50, 45, 22)), positive=False))
    session.add_click(Click(_ras(volume, (40, 38, 18))))
    assert session.predictor.encoder_runs == 1


def test_moving_a_click_equals_the_edited_list_from_scratch(tiny_model, volume, prepared):
    first, second, moved = _ras(volume, (45, 40, 20)), _ras(volume, (55, 45, 22)), _ras(volume, (35, 35, 18))
    session = _session(tiny_model, prepared, regions="1")
    session.set_clicks([Click(first), Click(second, positive=False)])
    edited = session.move_click(1, moved)
    fresh = _session(tiny_model, prepared, regions="1").set_clicks([Click(first), Click(moved, positive=False)])
    assert np.array_equal(edited.mask, fresh.mask)
    assert edited.clicks == fresh.clicks


def test_deleting_a_click_equals_the_shorter_list(tiny_model, volume, prepared):
    clicks = [
        Click(_ras(volume, (45, 40, 20))),
        Click(_ras(volume, (55, 45, 22)), False),
        Click(_ras(volume, (40, 38, 18))),
    ]
    session = _session(tiny_model, prepared, regions="1")
    session.set_clicks(clicks)
    edited = session.delete_click(1)
    fresh = _session(tiny_model, prepared, regions="1").set_clicks([clicks[0], clicks[2]])
    assert np.array_equal(edited.mask, fresh.mask)


def test_undo_and_redo_restore_clicks_and_mask(tiny_model, volume, prepared):
    session = _session(tiny_model, prepared, regions="1")
    one = session.add_click(Click(_ras(volume, (45, 40, 20))))
    two = session.add_click(Click(_ras(volume, (55, 45, 22)), positive=False))
    assert not np.array_equal(one.mask, two.mask)
    undone = session.undo()
    assert session.clicks == one.clicks and np.array_equal(undone.mask, one.mask)
    redone = session.redo()
    assert session.clicks == two.clicks and np.array_equal(redone.mask, two.mask)
    assert session.redo() is None
    session.undo()
    session.undo()
    assert session.clicks == () and session.undo() is None
    session.redo()
    session.add_click(Click(_ras(volume, (40, 38, 18))))
    assert not session.can_redo  # a new action drops the redo branch


def test_reset_empties_the_mask_and_is_undoable(tiny_model, volume, prepared):
    session = _session(tiny_model, prepared)
    clicked = session.add_click(Click(_ras(volume, (45, 40, 20))))
    cleared = session.reset()
    assert not cleared.mask.any() and cleared.regions == []
    assert np.array_equal(session.undo().mask, clicked.mask)


def test_changed_box_bounds_every_difference(tiny_model, volume, prepared):
    session = _session(tiny_model, prepared, regions="1")
    one = session.add_click(Click(_ras(volume, (45, 40, 20))))
    two = session.add_click(Click(_ras(volume, (50, 42, 21)), positive=False))
    differs = one.mask != two.mask
    assert differs.any()
    inside = np.zeros_like(differs)
    inside[two.changed] = True
    assert not (differs & ~inside).any()
    assert all(s.stop - s.start == int(np.ptp(np.nonzero(differs)[a])) + 1 for a, s in enumerate(two.changed))
    assert one.previous is None and two.previous is one.mask  # what `changed` was measured against
    three = session.preview([*two.clicks, Click(_ras(volume, (40, 38, 18)))])
    assert three.previous is two.mask and np.array_equal(session.undo().previous, three.mask)


def test_only_the_first_result_of_a_session_compares_with_an_empty_mask(tiny_model, volume, prepared):
    session = _session(tiny_model, prepared, regions="1")
    preview = session.preview([Click(_ras(volume, (45, 40, 20)))])
    one = session.add_click(Click(_ras(volume, (45, 40, 20))))
    two = session.add_click(Click(_ras(volume, (50, 42, 21)), positive=False))
    assert preview.first and not one.first and not two.first  # the preview was the session's first result
    fresh = _session(tiny_model, prepared, regions="1").set_clicks(two.clicks)
    assert fresh.first and np.array_equal(fresh.mask, two.mask)
    inside = np.zeros(fresh.mask.shape, dtype=bool)
    inside[fresh.changed] = True
    assert fresh.mask.any() and not (fresh.mask.astype(bool) & ~inside).any()  # changed covers the whole mask


def test_prompt_modes_differ_and_accumulate_passes_all_clicks(tiny_model, volume, prepared):
    clicks = [Click(_ras(volume, (45, 40, 20))), Click(_ras(volume, (52, 44, 22)), positive=False)]
    newest = _session(tiny_model, prepared, regions="1").set_clicks(clicks)
    accumulate = _session(tiny_model, prepared, prompt_mode="accumulate", regions="1").set_clicks(clicks)
    assert not np.array_equal(newest.mask, accumulate.mask)


def test_click_outside_the_region(tiny_model):
    big = Volume.from_array(_textured((10, 10, 300)), np.diag([1.0, 1.0, 1.0, 1.0]))
    big_prepared = PreparedVolume(big)
    clicks = [Click(_ras(big, (5, 5, 5))), Click(_ras(big, (290, 5, 5)))]
    with pytest.raises(InputError, match="outside the 128\\^3 region"):
        _session(tiny_model, big_prepared, regions="1").set_clicks(clicks)
    result = _session(tiny_model, big_prepared, regions="auto").set_clicks(clicks)
    assert len(result.regions) >= 2
    far_exclude = [clicks[0], Click(_ras(big, (290, 5, 5)), positive=False)]
    alone = _session(tiny_model, big_prepared, regions="auto").set_clicks(clicks[:1])
    excluded = _session(tiny_model, big_prepared, regions="auto").set_clicks(far_exclude)
    assert [r.begin for r in excluded.regions] == [r.begin for r in alone.regions]  # no region for it alone
    differs = np.argwhere(excluded.mask != alone.mask)  # it acts only on the automatic neighbour that holds it
    assert not len(differs) or differs[:, 2].min() > 100


def test_click_outside_the_volume_is_refused(tiny_model, volume, prepared):
    with pytest.raises(InputError, match="outside"):
        _session(tiny_model, prepared).add_click(Click((1e4, 0.0, 0.0)))


class AllForegroundPredictor(CountingPredictor):
    """Predicts foreground everywhere, so every mask touches every face of its region."""

    def decode(self, embedding, points, labels, previous_logits=None, region_image=None):
        return torch.full((1, 1, 32, 32, 32), 10.0), 1.0


def test_mask_touching_the_border_extends_to_neighbouring_regions(tiny_model):
    long_volume = Volume.from_array(_textured((8, 8, 400)), np.eye(4))  # 400 mm along I
    prepared = PreparedVolume(long_volume)
    click = Click(_ras(long_volume, (200, 4, 4)))
    session = InteractiveSession(AllForegroundPredictor(tiny_model), prepared)
    result = session.add_click(click)
    assert len(result.regions) >= 3
    assert len({region.begin[1:] for region in result.regions}) == 1  # only along the long axis
    assert result.mask.all()  # the whole 400 mm is reached, not cut at 192 mm
    capped = InteractiveSession(AllForegroundPredictor(tiny_model), prepared, max_regions=1).add_click(click)
    assert len(capped.regions) == 1 and not capped.mask.all()
    single = InteractiveSession(AllForegroundPredictor(tiny_model), prepared, regions="1").add_click(click)
    assert len(single.regions) == 1


def test_a_neighbour_of_background_alone_is_not_extended_into(tiny_model):
    """The mask reaches a face, but the region beyond holds air only (nothing above 0): the click still works."""
    array = np.full((8, 8, 400), -1000, dtype=np.int16)
    array[:, :, :150] = _textured((8, 8, 150))
    body_then_air = Volume.from_array(array, np.eye(4))
    click = Click(_ras(body_then_air, (60, 4, 4)))
    result = InteractiveSession(AllForegroundPredictor(tiny_model), PreparedVolume(body_then_air)).add_click(click)
    assert len(result.regions) == 2 and result.mask[:, :, :150].all()  # the body's neighbour yes, the air's no


def test_an_exclude_click_in_an_automatic_neighbour_region_acts_there(tiny_model):
    long_volume = Volume.from_array(_textured((10, 12, 300)), np.diag([1.5, 1.5, 1.5, 1.0]))
    prepared = PreparedVolume(long_volume)
    include, exclude = Click(_ras(long_volume, (30, 6, 5))), Click(_ras(long_volume, (200, 6, 5)), positive=False)
    session = InteractiveSession(CountingPredictor(tiny_model), prepared)
    before = session.add_click(include)
    assert len(before.regions) > 2 and before.mask[5, 6, 200]  # the mask reached the clicked voxel by extension
    after = session.add_click(exclude)
    assert [r.begin for r in after.regions] == [r.begin for r in before.regions] and after.changed is not None
    differs = np.argwhere(after.mask != before.mask)
    assert len(differs) and differs[:, 2].min() > 120  # only in the neighbour far from the first region
    fresh = InteractiveSession(CountingPredictor(tiny_model), prepared).set_clicks([include, exclude])
    assert np.array_equal(fresh.mask, after.mask)


def test_sessions_share_region_embeddings(tiny_model, volume, prepared):
    predictor = CountingPredictor(tiny_model)
    click = Click(_ras(volume, (45, 40, 20)))
    InteractiveSession(predictor, prepared).add_click(click)
    InteractiveSession(predictor, prepared).add_click(click)
    assert predictor.encoder_runs == 1


# Official click-centred path (spec 5.8) with the small fixture model --------------------------------


@pytest.fixture(scope="module")
def small_model():
    return load_model(shared_path("fixtures/parity/model_small/state_dict.pt"))


def _differing(ours: np.ndarray, reference_path) -> tuple[int, int]:
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_path)))
    return int((ours != reference).sum()), int(reference.sum())


def test_click_centred_fixture_p2(small_model):
    import json

    fixture = json.loads(shared_path("fixtures/parity/pipeline/pipeline_fixture.json").read_text())["P2_click_centered"]
    volume = Volume.from_file(shared_path("fixtures/parity/pipeline/input_image.nii.gz"))
    session = InteractiveSession(RegionPredictor(small_model), PreparedVolume(volume), regions="1")
    result = session.add_click(Click(tuple(fixture["click_ras_mm"])))
    assert [r.begin for r in result.regions] == [tuple(fixture["roi_begin_in_canonical_index"])]
    differing, foreground = _differing(
        result.mask, shared_path("fixtures/parity/pipeline/P2_click_centered_pred.nii.gz")
    )
    assert foreground == fixture["original_grid_foreground_voxels"]
    assert differing <= 1e-3 * foreground


@pytest.mark.parametrize("mode, name", [("newest", "newonly"), ("accumulate", "accum")])
def test_click_centred_real_ct_two_clicks(small_model, mode, name):
    import json

    fixture = json.loads(shared_path("fixtures/parity/pipeline_real/pipeline_real.json").read_text())["click_centered"]
    volume = Volume.from_file(shared_path("data/ct_abdomen_pelvis_totalseg_3mm/image.nii.gz"))
    positive = volume.points_to_ras([fixture["click1_positive"]["original_voxel_ijk"]], "ijk")[0]
    negative = volume.points_to_ras([fixture["click2_negative"]["original_voxel_ijk"]], "ijk")[0]
    session = InteractiveSession(RegionPredictor(small_model), PreparedVolume(volume), prompt_mode=mode, regions="1")
    first = session.add_click(Click(tuple(positive)))
    folder = "fixtures/parity/pipeline_real"
    differing, foreground = _differing(first.mask, shared_path(f"{folder}/click_centered_click1_pred.nii.gz"))
    assert differing <= 1e-3 * foreground
    second = session.add_click(Click(tuple(negative), positive=False))
    differing, foreground = _differing(second.mask, shared_path(f"{folder}/click_centered_click2_{name}_pred.nii.gz"))
    assert differing <= 1e-3 * foreground


def test_incremental_replay_equals_replay_from_scratch(tiny_model, volume, prepared):
    """Adding a click decodes once; undo decodes nothing; results equal a fresh session's."""
    clicks = [
        Click(_ras(volume, (45, 40, 20))),
        Click(_ras(volume, (55, 45, 22)), False),
        Click(_ras(volume, (40, 38, 18))),
    ]
    session = _session(tiny_model, prepared, regions="1")
    decoded = []
    original = session.predictor.decode
    session.predictor.decode = lambda *args: decoded.append(1) or original(*args)
    for click in clicks:
        result = session.add_click(click)
    assert len(decoded) == 3
    fresh = _session(tiny_model, prepared, regions="1").set_clicks(clicks)
    assert np.array_equal(result.mask, fresh.mask) and result.iou == fresh.iou
    undone = session.undo()
    assert len(decoded) == 3
    assert np.array_equal(undone.mask, _session(tiny_model, prepared, regions="1").set_clicks(clicks[:2]).mask)
    with pytest.raises(InputError):
        session.add_click(Click((1e4, 0.0, 0.0)))
    moved = session.move_click(0, _ras(volume, (46, 41, 20)))
    expected = _session(tiny_model, prepared, regions="1").set_clicks([Click(_ras(volume, (46, 41, 20))), clicks[1]])
    assert np.array_equal(moved.mask, expected.mask)


def test_exclude_clicks_alone_give_no_mask_and_are_replayed_after_the_first_include(tiny_model, volume, prepared):
    include, exclude = Click(_ras(volume, (45, 40, 20))), Click(_ras(volume, (55, 45, 22)), positive=False)
    session = _session(tiny_model, prepared, regions="1")
    alone = session.add_click(exclude)
    assert not alone.mask.any() and alone.regions == [] and session.clicks == (exclude,)
    assert not alone.first and alone.changed is None  # no mask yet: a segment written into keeps its voxels
    both = session.add_click(include)
    assert both.first  # the first mask of the session: it replaces what the segment held
    include_first = _session(tiny_model, prepared, regions="1").set_clicks([include, exclude])
    assert np.array_equal(both.mask, include_first.mask) and both.mask.any()
    assert both.clicks == (exclude, include)  # the user's order is kept; only the decoder sees include first
    assert not session.delete_click(1).mask.any()


def test_a_click_keeps_its_point_as_three_floats_whatever_it_was_given_as(volume):
    given = [10, 20.5, np.float32(30)]
    click = Click(given)
    given[0] = 99
    assert click.ras == (10.0, 20.5, 30.0) and click == Click(np.array([10.0, 20.5, 30.0]))
    for bad, message in [((1.0, 2.0), "three coordinates"), (("a", "b", "c"), "three numbers")]:
        with pytest.raises(InputError, match=message):
            Click(bad)
    with pytest.raises(InputError, match="'positive' must be True or False"):
        Click((1.0, 2.0, 3.0), positive="no")


def test_mistakes_in_session_calls_are_clear_errors(tiny_model, volume, prepared):
    session = _session(tiny_model, prepared, regions="1")
    session.add_click(Click(_ras(volume, (45, 40, 20))))
    for call in (lambda: session.move_click(3, (0.0, 0.0, 0.0)), lambda: session.delete_click(-2)):
        with pytest.raises(InputError, match=r"There is no click -?\d: the session has 1 click"):
            call()
    with pytest.raises(InputError, match="Click 0 is a tuple, not a Click"):
        session.set_clicks([(_ras(volume, (45, 40, 20)), True)])
    with pytest.raises(InputError, match="needs a PreparedVolume, not Volume"):
        InteractiveSession(RegionPredictor(tiny_model), volume)
    assert len(session.clicks) == 1 and not session.can_redo


# Regions see every click inside them; footprints stay bounded; overlaps paste by nearest centre ------------


class ClickBallPredictor(RegionPredictor):
    """Honours clicks on top of the previous logits: foreground in a ball of 70 region voxels around an include
    click, background in a ball of 8 around an exclude click, so where a region saw an exclude click is visible."""

    def embedding_for(self, key, region_input):
        return torch.zeros(1)

    def decode(self, embedding, points, labels, previous_logits=None, region_image=None):
        logits = torch.full((1, 1, 32, 32, 32), -10.0) if previous_logits is None else previous_logits.clone()
        centres = torch.from_numpy(np.indices((32,) * 3).transpose(1, 2, 3, 0) * 4 + 1.5).float()
        for point, label in zip(points, labels):
            distance = (centres - torch.as_tensor(point, dtype=torch.float32)).norm(dim=-1)
            logits[0, 0][distance <= (70 if label else 8)] = 10.0 if label else -10.0
        return logits, 1.0


@pytest.fixture(scope="module")
def long_prepared() -> PreparedVolume:
    """450 mm along I at 1.5 mm (the canonical grid is the volume's own): room for several regions."""
    return PreparedVolume(Volume.from_array(_textured((40, 40, 300)), np.diag([1.5, 1.5, 1.5, 1.0])))


def _along_i(prepared: PreparedVolume, i: int, positive: bool = True) -> Click:
    return Click(_ras(prepared.volume, (i, 20, 20)), positive)


@pytest.mark.parametrize("max_regions", [2, 6])
def test_an_exclude_click_before_the_include_click_of_its_region_acts_there(tiny_model, long_prepared, max_regions):
    include, far_include = _along_i(long_prepared, 40), _along_i(long_prepared, 250)  # regions i -24..103, 186..313
    exclude = _along_i(long_prepared, 240, positive=False)  # in the far region only

    def mask(*clicks):
        session = InteractiveSession(ClickBallPredictor(tiny_model), long_prepared, max_regions=max_regions)
        return session.set_clicks(clicks).mask

    without = mask(include, far_include)
    orders = [mask(include, exclude, far_include), mask(exclude, include, far_include)]
    after = mask(include, far_include, exclude)
    assert without[20, 20, 240] and not after[20, 20, 240]
    for before in orders:  # the exclude click is replayed right after the include click whose region holds it
        assert np.array_equal(before, after)


@pytest.mark.parametrize(
    "clicks, max_regions",
    [
        ([(150, True), (190, False)], 6),  # nearer the centre of the automatic neighbour at i 150..277
        ([(40, True), (100, False), (150, True)], 2),  # nearer the centre of the region the third click opens
    ],
)
def test_an_exclude_click_where_regions_overlap_acts_in_the_region_pasted_there(
    tiny_model, long_prepared, clicks, max_regions
):
    session = InteractiveSession(ClickBallPredictor(tiny_model), long_prepared, max_regions=max_regions)
    result = session.set_clicks([_along_i(long_prepared, i, positive) for i, positive in clicks])
    assert len(result.regions) >= 2
    excluded = next(i for i, positive in clicks if not positive)
    assert result.mask[20, 20, excluded - 10] and not result.mask[20, 20, excluded]


def test_dragging_the_first_click_keeps_a_bounded_number_of_footprints(tiny_model, volume, prepared):
    session = _session(tiny_model, prepared, regions="1")
    session.add_click(Click(_ras(volume, (30, 40, 20))))
    for step in range(1, 13):
        session.preview([Click(_ras(volume, (30 + 2 * step, 40, 20)))])
    result = session.move_click(0, _ras(volume, (56, 40, 20)))
    assert len({region.begin for region in result.regions}) == 1
    assert 1 <= len(session._footprints) <= 3  # the one in use and a couple kept for undo, not one per position
    undone = session.undo()
    assert np.array_equal(undone.mask, _session(tiny_model, prepared, regions="1").set_clicks(undone.clicks).mask)


def test_spare_footprints_are_forgotten_beyond_the_memory_bound(tiny_model, volume, prepared, monkeypatch):
    session = _session(tiny_model, prepared, regions="1")
    session.add_click(Click(_ras(volume, (30, 40, 20))))
    session.move_click(0, _ras(volume, (56, 40, 20)))
    assert len(session._footprints) == 2  # the one in use and the spare for undo
    in_use = next(reversed(session._footprints.values()))
    monkeypatch.setattr(session_module, "FOOTPRINT_CACHE_BYTES", in_use.nbytes)
    moved = session.move_click(0, _ras(volume, (58, 40, 20)))
    assert len(session._footprints) == 1
    undone = session.undo()
    assert np.array_equal(undone.mask, _session(tiny_model, prepared, regions="1").set_clicks(undone.clicks).mask)
    assert np.array_equal(session.redo().mask, moved.mask)


def _reference_paste(mask, runs, footprints, ijk_to_ras) -> None:
    """The rule as first written: each region's float32 distance to every voxel of its footprint box; a voxel
    takes the mask of the first region at the smallest distance among those whose footprint holds it."""
    union = tuple(
        slice(min(f.box[a].start for f in footprints), max(f.box[a].stop for f in footprints)) for a in range(3)
    )
    best = np.full(tuple(s.stop - s.start for s in union), np.inf, dtype=np.float32)
    for run, footprint in zip(runs, footprints):
        box = footprint.box
        local = tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(box, union))
        k, j, i = (np.arange(s.start, s.stop, dtype=np.float64) for s in box)
        offset = ijk_to_ras[:3, 3] - np.asarray(run.region.center_ras)
        squared = np.zeros((len(k), len(j), len(i)))
        for axis in range(3):
            columns = ijk_to_ras[axis, :3]
            component = columns[2] * k[:, None, None] + columns[1] * j[None, :, None] + columns[0] * i[None, None, :]
            squared += (component + offset[axis]) ** 2
        distance = np.sqrt(squared).astype(np.float32)
        nearer = footprint.inside & (distance < best[local])
        best[local][nearer] = distance[nearer]
        mask[box][nearer] = footprint.paste(run.mask)[nearer]


def _overlapping_runs(volume: Volume, seed: int) -> list[SimpleNamespace]:
    prepared = PreparedVolume(volume)
    rng = np.random.default_rng(seed)
    middle = np.array(prepared.canonical_shape) // 2 - 64 + rng.integers(-10, 10, 3)
    offsets = [(0, 0, 0), (64, 0, 0), (0, 64, 0), (64, 64, 0), (0, 0, -64), (-64, 0, 32)]
    return [
        SimpleNamespace(region=prepared.region(middle + offset), mask=rng.random((128,) * 3) < 0.5)
        for offset in offsets[: rng.integers(2, len(offsets) + 1)]
    ]


def _grid_volume(size_ijk, spacing, angle_deg) -> Volume:
    image = sitk.GetImageFromArray(_textured(size_ijk[::-1]))
    image.SetSpacing(spacing)
    image.SetOrigin((-50.0, 20.0, -30.0))
    angle = np.deg2rad(angle_deg)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    return Volume.from_sitk(image)


@pytest.mark.parametrize(
    "size_ijk, spacing, angle_deg",
    [
        ((150, 130, 60), (1.2, 1.0, 3.0), 17),
        ((200, 160, 120), (0.75, 0.75, 0.75), 0),
        ((160, 160, 90), (0.6, 0.6, 0.5), 0),
    ],
)
def test_overlapping_regions_paste_exactly_as_the_nearest_centre_rule(size_ijk, spacing, angle_deg):
    """Axis-aligned grids put whole planes of voxels at the same distance from two centres: ties are exact."""
    volume = _grid_volume(size_ijk, spacing, angle_deg)
    for seed in range(3):
        runs = _overlapping_runs(volume, seed)
        footprints = [region_footprint(run.region, volume) for run in runs]
        expected, pasted = np.zeros(volume.shape_kji, np.uint8), np.zeros(volume.shape_kji, np.uint8)
        _reference_paste(expected, runs, footprints, volume.ijk_to_ras)
        session_module._paste_nearest_region(pasted, runs, footprints, volume.ijk_to_ras)
        assert np.array_equal(pasted, expected)


def _pasted_in_advance(footprint, region_mask) -> SimpleNamespace:
    """A footprint whose paste allocates nothing, so that only what the session adds is measured."""
    patch = footprint.paste(region_mask)
    return SimpleNamespace(box=footprint.box, inside=footprint.inside, paste=lambda _: patch)


def test_pasting_overlapping_regions_computes_no_float64_distance_per_voxel():
    """Float64 distances over every footprint voxel, per region and per click, took seconds on a large CT."""
    volume = _grid_volume((200, 160, 120), (0.75, 0.75, 0.75), 0)
    runs = _overlapping_runs(volume, 0)[:3]
    footprints = [region_footprint(run.region, volume) for run in runs]
    pasted = [_pasted_in_advance(footprint, run.mask) for footprint, run in zip(footprints, runs)]
    mask = np.zeros(volume.shape_kji, np.uint8)
    tracemalloc.start()
    try:
        session_module._paste_nearest_region(mask, runs, pasted, volume.ijk_to_ras)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * max(footprint.inside.size for footprint in footprints)


class FailingPredictor(RegionPredictor):
    """A predictor whose upsampling fails while `failing` is set (a transient error, e.g. out of memory)."""

    failing = False

    def upsample_to_mask(self, logits):
        if self.failing:
            raise RuntimeError("transient failure")
        return super().upsample_to_mask(logits)


@pytest.mark.parametrize("action", ["undo", "redo"])
def test_an_undo_or_redo_that_fails_changes_nothing(action):
    torch.manual_seed(7)
    array = np.random.default_rng(0).integers(50, 150, size=(30, 30, 40)).astype(np.int16)
    volume = Volume.from_array(array, np.eye(4))
    predictor = FailingPredictor(build_model(TINY))
    session = InteractiveSession(predictor, PreparedVolume(volume))
    include = Click(tuple(volume.ijk_to_ras_points([[20, 15, 15]])[0]))
    exclude = Click(tuple(volume.ijk_to_ras_points([[24, 15, 15]])[0]), positive=False)
    session.add_click(include)
    session.add_click(exclude)
    if action == "redo":
        session.undo()
    clicks, can_undo, can_redo = session.clicks, session.can_undo, session.can_redo
    predictor.failing = True
    with pytest.raises(RuntimeError, match="transient"):
        getattr(session, action)()
    predictor.failing = False
    assert (session.clicks, session.can_undo, session.can_redo) == (clicks, can_undo, can_redo)
    # The next edit builds on the click list whose mask the caller last got, and the edit can be undone to it.
    added = session.add_click(Click(tuple(volume.ijk_to_ras_points([[16, 15, 15]])[0])))
    assert added.clicks[:-1] == clicks and session.undo().clicks == clicks
