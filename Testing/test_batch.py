"""`sammed3d batch`: output names that never collide or overwrite, and manifest errors that name the file or row."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SAMMed3DLib import batch as batch_module
from SAMMed3DLib.batch import Case, case_labels, plan_outputs, read_manifest, segment_volume, write_mask
from SAMMed3DLib.cli import main
from SAMMed3DLib.errors import InputError
from SAMMed3DLib.predictor import load_predictor
from SAMMed3DLib.volume import Volume

GOOD_CLICKS = {"positive": [[25, 30, 15]], "negative": [[20, 30, 15]], "space": "ijk"}


def _write_image(path: Path) -> Path:
    rng = np.random.default_rng(1)
    image = sitk.GetImageFromArray(rng.integers(0, 200, size=(30, 60, 50)).astype(np.int16))
    image.SetSpacing((1.5, 1.5, 3.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    return _write_image(tmp_path_factory.mktemp("data") / "scan.nii.gz")


def _manifest(folder: Path, cases: list) -> Path:
    path = folder / "cases.json"
    path.write_text(json.dumps(cases))
    return path


def _batch(manifest: Path, checkpoint: Path, out_dir: Path, *options: str) -> int:
    return main(["batch", str(manifest), "--checkpoint", str(checkpoint), "--out-dir", str(out_dir), *options])


def _case(image: Path, **entry) -> dict:
    clicks = {"space": "ijk"} if "clicks" in entry else GOOD_CLICKS  # an entry gives its clicks one way
    return {"image": str(image), **clicks, **entry}


# -- output names


def test_images_of_the_same_name_get_their_folder_name(tmp_path, checkpoint, capsys):
    """The usual folder-per-case layout: c1/image.nii.gz and c2/image.nii.gz must not share one mask."""
    images = [_write_image(tmp_path / folder / "image.nii.gz") for folder in ("c1", "c2")]
    manifest = _manifest(tmp_path, [_case(image) for image in images])
    assert _batch(manifest, checkpoint, tmp_path / "out", "--regions", "1") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c1_image_mask.nii.gz", "c2_image_mask.nii.gz"]
    captured = capsys.readouterr()
    assert "2 of 2 cases segmented" in captured.out
    # The table and the progress lines tell the two cases apart as the mask names do.
    rows = [line.split()[1] for line in captured.out.splitlines() if line.startswith(("   1 ", "   2 "))]
    assert rows == ["c1/image", "c2/image"]
    assert "2/2 c2/image: ok" in captured.err


def test_case_labels_add_the_folder_only_where_image_names_repeat(tmp_path):
    cases = [Case(tmp_path / f / n, []) for f, n in (("a", "ct.nii.gz"), ("b", "CT.nrrd"), ("a", "mr.nii.gz"))]
    assert case_labels(cases) == ["a/ct", "b/CT", "mr"]
    assert case_labels([Case(None, [], problem="no image"), Case(None, [], problem="no image")]) == ["(no image)"] * 2


def test_a_bad_row_does_not_rename_the_others(tmp_path):
    """Fixing row 2 later must not move row 1's mask: names repeat whether or not a case can run."""
    cases = [Case(tmp_path / "c1" / "image.nii.gz", []), Case(tmp_path / "c2" / "image.nii.gz", [], problem="bad")]
    assert plan_outputs(cases, tmp_path / "out")[0].out == tmp_path / "out" / "c1_image_mask.nii.gz"


def test_names_keep_every_dot_but_the_image_extension(tmp_path):
    cases = [Case(tmp_path / "ct.v1.nii.gz", []), Case(tmp_path / "ct.v2.nii.gz", []), Case(tmp_path / "a.nrrd", [])]
    outs = [case.out for case in plan_outputs(cases, tmp_path / "out")]
    assert outs == [tmp_path / "out" / name for name in ("ct.v1_mask.nii.gz", "ct.v2_mask.nii.gz", "a_mask.nii.gz")]


def test_dicom_folders_named_by_series_uid_keep_their_whole_name(tmp_path):
    folders = [tmp_path / "study" / "1.2.840.113619.2.55.3", tmp_path / "study" / "1.2.840.113619.2.55.4"]
    for folder in folders:
        folder.mkdir(parents=True)
    outs = [case.out for case in plan_outputs([Case(folder, []) for folder in folders], tmp_path / "out")]
    assert outs == [tmp_path / "out" / f"{folder.name}_mask.nii.gz" for folder in folders]


def test_outputs_differing_only_in_case_are_one_file(tmp_path):
    """On macOS and Windows mask.nii.gz and Mask.nii.gz are one file: the second case would replace the first."""
    cases = [Case(tmp_path / "a" / "CT.nii.gz", []), Case(tmp_path / "b" / "ct.nii.gz", [])]
    outs = [case.out for case in plan_outputs(cases, tmp_path / "out")]
    assert outs == [tmp_path / "out" / "a_CT_mask.nii.gz", tmp_path / "out" / "b_ct_mask.nii.gz"]
    given = [replace(case, out=tmp_path / name) for case, name in zip(cases, ("Mask.nii.gz", "mask.nii.gz"))]
    with pytest.raises(InputError, match="Cases 1 and 2"):
        plan_outputs(given, tmp_path / "out")


def test_an_out_naming_an_input_in_other_letter_case_is_refused_where_it_is_that_file(tmp_path):
    image = tmp_path / "CT.nii.gz"
    image.write_text("scan")
    other_case = tmp_path / "ct.nii.gz"
    os.link(image, other_case)  # what a case-insensitive disk (macOS, Windows) makes of the other spelling
    planned = plan_outputs([Case(image, [], out=other_case)], tmp_path / "out", overwrite=True)
    assert "one of the input files" in planned[0].problem


def test_planning_keeps_given_outputs_and_is_repeatable(tmp_path):
    cases = [Case(tmp_path / "a" / "x.nii.gz", [], out=tmp_path / "mine.nii.gz"), Case(tmp_path / "b" / "x.nii.gz", [])]
    planned = plan_outputs(cases, tmp_path / "out")
    assert [case.out for case in planned] == [tmp_path / "mine.nii.gz", tmp_path / "out" / "x_mask.nii.gz"]
    assert plan_outputs(planned, tmp_path / "out") == planned


@pytest.mark.parametrize(
    "entries",
    [
        [{}, {}],  # the same image twice (two organs) and no 'out'
        [{}, {"out": "out/scan_mask.nii.gz"}],  # an 'out' equal to another case's default name
    ],
)
def test_two_cases_writing_one_file_fail_before_the_model_loads(tmp_path, image_path, entries, capsys):
    manifest = _manifest(tmp_path, [_case(image_path, **entry) for entry in entries])
    # A checkpoint that does not exist: the batch must stop before it would be needed.
    assert _batch(manifest, tmp_path / "absent.pth", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "Manifest entry 1 and entry 2 would both write" in error and "scan_mask.nii.gz" in error
    assert "'out'" in error and not (tmp_path / "out").exists()


# -- never overwriting


def test_an_existing_mask_is_kept_unless_overwrite(tmp_path, checkpoint, image_path, capsys):
    manifest = _manifest(tmp_path, [_case(image_path)])
    existing = tmp_path / "out" / "scan_mask.nii.gz"
    existing.parent.mkdir()
    existing.write_bytes(b"an earlier mask")
    assert _batch(manifest, checkpoint, tmp_path / "out", "--regions", "1") == 1
    assert "already exists" in capsys.readouterr().out
    assert existing.read_bytes() == b"an earlier mask"
    assert _batch(manifest, checkpoint, tmp_path / "out", "--regions", "1", "--overwrite") == 0
    assert sitk.ReadImage(str(existing)).GetSize() == sitk.ReadImage(str(image_path)).GetSize()


def test_an_output_equal_to_an_input_is_refused_even_with_overwrite(tmp_path, checkpoint, capsys):
    image = _write_image(tmp_path / "ct.nii.gz")
    before = image.read_bytes()
    manifest = _manifest(tmp_path, [_case(image, out="ct.nii.gz"), _case(image, out="other.nii.gz")])
    assert _batch(manifest, checkpoint, tmp_path / "out", "--regions", "1", "--overwrite") == 1
    output = capsys.readouterr().out
    assert "one of the input files" in output and "1 of 2 cases segmented" in output
    assert image.read_bytes() == before and (tmp_path / "other.nii.gz").exists()


def test_outputs_are_checked_when_planned(tmp_path):
    """Before the model loads: a missing image, an existing mask or an input as output becomes that case's problem."""
    existing, image = tmp_path / "out" / "a_mask.nii.gz", tmp_path / "b.nii.gz"
    existing.parent.mkdir()
    existing.write_bytes(b"an earlier mask")
    images = [tmp_path / f"{name}.nii.gz" for name in "abcd"]
    for path in images[:3]:
        path.write_bytes(b"an image")
    cases = [Case(images[0], []), Case(image, [], out=image), Case(images[2], []), Case(images[3], [])]
    first, second, third, fourth = plan_outputs(cases, tmp_path / "out")
    assert "already exists" in first.problem and "input" in second.problem and third.problem is None
    assert fourth.problem == f"Image {images[3]} does not exist; check the path."
    for planned in (
        plan_outputs(cases, tmp_path / "out", overwrite=True),
        plan_outputs(cases, tmp_path / "out", skip_existing=True),
    ):
        assert planned[0].problem is None and "input" in planned[1].problem


def test_planning_resolves_each_path_a_few_times_not_once_per_pair_of_cases(tmp_path, monkeypatch):
    """Each output is compared with every input: resolving every input again for each output took minutes for
    a few thousand cases."""
    resolve, calls = Path.resolve, []

    def counted(path, *args, **kwargs):
        calls.append(path)
        return resolve(path, *args, **kwargs)

    monkeypatch.setattr(Path, "resolve", counted)
    cases = [Case(tmp_path / f"image{number}.nii.gz", []) for number in range(300)]
    for case in cases:
        case.image.write_bytes(b"an image")
    planned = plan_outputs(cases, tmp_path / "out")
    assert all(case.problem is None for case in planned)
    assert len(calls) < 20 * len(cases)  # 300 x 300 = 90,000 when every check resolved all inputs again


def test_an_out_dir_under_a_file_fails_before_the_model_loads(tmp_path, image_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    manifest = _manifest(tmp_path, [_case(image_path)])
    assert _batch(manifest, tmp_path / "absent.pth", tmp_path / "file" / "out") == 2
    error = capsys.readouterr().err
    assert "is a file" in error and "absent.pth" not in error


# -- manifest files that cannot be read at all


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("cases.json", b'[{"image": "a.nii.gz",]', "not valid JSON"),
        ("cases.json", b'{"cases": 5}', "JSON list of cases"),
        ("cases.json", b'"a.nii.gz"', "JSON list of cases"),
        ("cases.json", '[{"image": "é.nii.gz"}]'.encode("latin-1"), "not UTF-8"),
        ("cases.csv", b"file,points\na.nii.gz,1;2;3\n", "lacks the column(s) image, positive"),
        ("cases.csv", b"image,negative\na.nii.gz,1;2;3\n", "lacks the column(s) positive"),
    ],
)
def test_an_unreadable_manifest_is_one_sentence_naming_it(tmp_path, name, content, message, capsys):
    manifest = tmp_path / name
    manifest.write_bytes(content)
    assert _batch(manifest, tmp_path / "absent.pth", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert error.startswith("sammed3d: error: ") and message in error and str(manifest) in error
    assert "Traceback" not in error and error.count("\n") == 1


# -- one bad entry fails that case alone


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"clicks": [{"positive": True}]}, 'click 1 has no "point"'),
        ({"clicks": [{"point": [25, 30, 15], "positive": "false"}]}, '"positive": "false"; use true or false'),
        ({"clicks": [{"point": [25, 30, 15], "positive": 0}]}, '"positive": 0'),
        ({"clicks": {"point": [25, 30, 15]}}, "'clicks' must be a list"),
        ({"space": 3}, "'space' is 3"),
        ({"space": "mni"}, "'space' is \"mni\""),
        ({"positive": [[25, "x", 15]]}, "is not three numbers"),
        ({"positive": [[25, 30]]}, "is not three numbers"),
        ({"positive": 5}, "'positive' must be points"),
        ({"positive": [25, 30, 15]}, "'positive' is one point [25, 30, 15]; write a list of points, [[x, y, z]]"),
        ({"out": 5}, "'out' is 5"),
        ({"negatives": [[20, 30, 15]]}, "the key(s) negatives, which SAMMed3D does not read"),
        ({"clicks": [{"point": [25, 30, 15], "Positive": False}]}, "click 1 has the key(s) Positive"),
    ],
)
def test_a_bad_entry_becomes_a_problem_naming_it(tmp_path, image_path, entry, message):
    manifest = _manifest(tmp_path, [_case(image_path), _case(image_path, **entry)])
    first, second = read_manifest(manifest)
    assert first.problem is None
    assert second.problem.startswith("Manifest entry 2: ") and message in second.problem


@pytest.mark.parametrize("entry", [5, {"image": 5}, {"image": ""}, {"positive": "1,2,3"}])
def test_an_entry_without_an_image_path_is_a_problem(tmp_path, entry):
    (case,) = read_manifest(_manifest(tmp_path, [entry]))
    assert case.image is None and case.problem.startswith("Manifest entry 1 ")


def test_an_entry_giving_clicks_both_ways_is_a_problem(tmp_path, image_path):
    entry = {**_case(image_path), "clicks": [{"point": [25, 30, 15]}]}
    (case,) = read_manifest(_manifest(tmp_path, [entry]))
    assert "both 'clicks' and 'positive'/'negative'" in case.problem


def test_csv_headers_are_read_without_case_or_spaces_and_unknown_columns_are_refused(tmp_path, image_path):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f'Image , POSITIVE,Space\n{image_path},"1,2,3",ijk\n')
    (case,) = read_manifest(manifest)
    assert case.problem is None and case.clicks == [((1.0, 2.0, 3.0), True)] and case.space == "ijk"
    manifest.write_text(f'image,positive,\n{image_path},"1,2,3",\n')  # a spreadsheet's trailing comma
    assert read_manifest(manifest)[0].problem is None
    manifest.write_text(f'image,positive,negatives\n{image_path},"1,2,3","4,5,6"\n')
    with pytest.raises(InputError, match="column.s. negatives, which SAMMed3D does not read"):
        read_manifest(manifest)


def test_csv_cells_are_read_without_surrounding_spaces(tmp_path, image_path):
    """Hand-written and spreadsheet CSV: ', ' between cells and trailing spaces are not part of a path or point."""
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f'image, positive, space, out\n {image_path} , "1,2,3", ijk , mask.nii.gz \n')
    (case,) = read_manifest(manifest)
    assert case.problem is None and case.image == image_path and case.out == tmp_path / "mask.nii.gz"
    assert case.clicks == [((1.0, 2.0, 3.0), True)] and case.space == "ijk"


def test_csv_rows_of_empty_cells_are_skipped_like_blank_lines(tmp_path, image_path):
    """Spreadsheets export rows they once formatted as ',,,'; they are not cases without an image."""
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f'image,positive\r\n\r\n{image_path},"1,2,3",\r\n,\r\n , ,,\r\n')
    (case,) = read_manifest(manifest)
    assert case.problem is None and case.clicks == [((1.0, 2.0, 3.0), True)]


def test_a_column_with_an_empty_header_cell_is_refused_when_it_holds_values(tmp_path, image_path):
    """'image,positive,,space': the user forgot to name 'negative'; its clicks must not be dropped unread."""
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f'image,positive,,space\n{image_path},"40,40,10","60,40,10",ijk\n')
    with pytest.raises(InputError, match=re.escape("line 2 has '60,40,10' in column 3, whose header cell is empty")):
        read_manifest(manifest)
    manifest.write_text(f'image,positive,,space,\n{image_path},"40,40,10",,ijk,\n')  # empty: trailing commas
    (case,) = read_manifest(manifest)
    assert case.problem is None and case.space == "ijk" and case.clicks == [((40.0, 40.0, 10.0), True)]


def test_problems_name_the_line_a_spreadsheet_shows_past_blank_rows(tmp_path, image_path):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f'image,positive\n\n,\n{image_path},"1,2,3"\n{image_path},"4,5"\n')
    first, second = read_manifest(manifest)
    assert first.problem is None and second.problem.startswith("Manifest line 5: Point '4,5'")


def test_an_unquoted_point_is_named_before_the_columns_it_shifted(tmp_path, image_path):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"image,positive,space\n{image_path},60,50,10,ijk\n")
    (case,) = read_manifest(manifest)
    assert case.problem.startswith("Manifest line 2: it has more fields than the header names; put each point")


def test_a_json_key_in_another_case_is_named(tmp_path, image_path):
    manifest = _manifest(tmp_path, [{"Image": str(image_path), "Positive": [[1, 2, 3]]}])
    (case,) = read_manifest(manifest)
    expected = 'has the key(s) "Image", "Positive"; write them in lower case, like "image".'
    assert case.problem == f"Manifest entry 1 {expected}"


def test_a_tilde_in_a_manifest_path_is_the_home_folder(tmp_path, image_path, monkeypatch):
    home = tmp_path / "home"
    (home / "scans").mkdir(parents=True)
    shutil.copy(image_path, home / "scans" / "ct.nii.gz")
    monkeypatch.setenv("HOME", str(home))
    manifest = tmp_path / "project" / "cases.csv"
    manifest.parent.mkdir()
    manifest.write_text('image,positive,out\n~/scans/ct.nii.gz,"1,2,3",~/masks/ct.nii.gz\n')
    (case,) = read_manifest(manifest)
    assert case.image == home / "scans" / "ct.nii.gz" and case.out == home / "masks" / "ct.nii.gz"
    manifest.write_text('image,positive,out\n~scan.nii.gz,"1,2,3",~mask.nii.gz\n')  # names, not a user's home
    (case,) = read_manifest(manifest)
    assert case.image == manifest.parent / "~scan.nii.gz" and case.out == manifest.parent / "~mask.nii.gz"


def test_an_unclosed_quote_is_refused_rather_than_swallowing_the_rows_below(tmp_path, image_path):
    manifest = tmp_path / "cases.csv"
    rows = [f'{image_path},"1,2,3",{name}.nii.gz' for name in ("a", "b", "c", "d")]
    rows[1] = rows[1].replace('3"', "3")
    manifest.write_text("image,positive,out\n" + "\n".join(rows) + "\n")
    with pytest.raises(InputError, match="line 3 has a quote that is not closed"):
        read_manifest(manifest)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("cases.csv", "image,positive,negative,Negative\na.nii.gz,1;2;3,4;5;6,\n", "the column(s) negative twice"),
        ("cases.json", '[{"image": "a.nii.gz", "positive": [[1, 2, 3]], "positive": [[4, 5, 6]]}]', "positive twice"),
        (
            "cases.json",
            '[{"image": "a.nii.gz", "clicks": [{"point": [1, 2, 3], "positive": true, "positive": false}]}]',
            "positive twice",
        ),
        (
            "cases.json",
            '{"space": "ijk", "cases": [{"image": "a.nii.gz", "positive": [[1, 2, 3]]}]}',
            "the key(s) space",
        ),
    ],
)
def test_what_would_be_read_over_or_ignored_is_refused(tmp_path, name, content, message):
    """Python keeps the last of repeated CSV columns and JSON keys, and nothing reads keys beside "cases"."""
    manifest = tmp_path / name
    manifest.write_text(content)
    with pytest.raises(InputError, match=re.escape(message)):
        read_manifest(manifest)


def test_a_header_not_separated_by_commas_is_named(tmp_path):
    """Spreadsheets set to a comma-decimal language save CSV with ';' between cells."""
    manifest = tmp_path / "cases.csv"
    manifest.write_text("image;positive\na.nii.gz;1,2,3\n")
    with pytest.raises(InputError, match=re.escape("in its first row ('image;positive')")) as error:
        read_manifest(manifest)
    assert "separated by commas" in str(error.value)


def test_csv_problems_name_the_row(tmp_path, image_path):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f'image,positive,space\n{image_path},"1,2,3",ijk\n{image_path},"1,2",ijk\n')
    first, second = read_manifest(manifest)
    assert first.problem is None and first.clicks == [((1.0, 2.0, 3.0), True)]
    assert second.problem.startswith("Manifest line 3: Point '1,2' is not three numbers")
    manifest.write_text(f"image,positive\n{image_path},1,2,3\n")
    (unquoted,) = read_manifest(manifest)
    assert unquoted.problem == (
        'Manifest line 2: it has more fields than the header names; put each point in quotes, like "10,20,30".'
    )


def test_an_interrupted_batch_prints_what_it_did_and_goes_on_with_skip_existing(
    tmp_path, checkpoint, image_path, capsys, monkeypatch
):
    entries = [_case(image_path, out=f"case{number}.nii.gz") for number in range(3)]
    manifest = _manifest(tmp_path, [*entries, _case(tmp_path / "missing.nii.gz", out="case3.nii.gz")])
    segmented = []

    def interrupted_at_the_second(*args, **kwargs):
        if len(segmented) == 1:
            raise KeyboardInterrupt
        segmented.append(args)
        return real_segment_volume(*args, **kwargs)

    real_segment_volume = batch_module.segment_volume
    monkeypatch.setattr(batch_module, "segment_volume", interrupted_at_the_second)
    assert _batch(manifest, checkpoint, tmp_path / "out", "--regions", "1") == 130
    output = capsys.readouterr().out
    assert "1 of 4 cases segmented, 1 failed, 2 skipped" in output and output.count("not run: interrupted") == 2
    assert "--skip-existing" in output
    first = (tmp_path / "case0.nii.gz").read_bytes()
    assert not (tmp_path / "case1.nii.gz").exists() and not list(tmp_path.glob(".case1*"))
    monkeypatch.setattr(batch_module, "segment_volume", real_segment_volume)
    assert _batch(manifest, checkpoint, tmp_path / "out", "--regions", "1", "--skip-existing") == 1
    output = capsys.readouterr().out
    assert "its output exists (kept)" in output and "2 of 4 cases segmented, 1 failed, 1 skipped" in output
    assert (tmp_path / "case0.nii.gz").read_bytes() == first and (tmp_path / "case2.nii.gz").exists()
    # Every mask there: nothing to run, so no model is loaded (one that does not exist is not even looked for).
    assert _batch(manifest, tmp_path / "absent.pth", tmp_path / "out", "--skip-existing") == 1
    assert "0 of 4 cases segmented, 1 failed, 3 skipped" in capsys.readouterr().out
    assert _batch(manifest, checkpoint, tmp_path / "out", "--overwrite", "--skip-existing") == 2


def test_a_batch_where_no_case_can_run_loads_no_model(tmp_path, capsys):
    manifest = _manifest(tmp_path, [_case(tmp_path / "missing.nii.gz")])
    assert _batch(manifest, tmp_path / "absent.pth", tmp_path / "out") == 1
    captured = capsys.readouterr()
    assert "missing.nii.gz does not exist" in captured.out and "0 of 1 cases segmented, 1 failed" in captured.out
    assert "absent.pth" not in captured.out + captured.err


def test_a_mask_saved_while_the_batch_ran_is_kept(tmp_path, checkpoint, image_path, capsys, monkeypatch):
    """Outputs are checked before the model loads; one that appears later must not be replaced either."""
    target = tmp_path / "case.nii.gz"
    real_segment_volume = batch_module.segment_volume

    def user_saves_meanwhile(*args, **kwargs):
        target.write_bytes(b"the user's hand-corrected mask")
        return real_segment_volume(*args, **kwargs)

    monkeypatch.setattr(batch_module, "segment_volume", user_saves_meanwhile)
    assert _batch(_manifest(tmp_path, [_case(image_path, out="case.nii.gz")]), checkpoint, tmp_path / "out") == 1
    assert "was created by something else while this ran; it was kept" in capsys.readouterr().out
    assert target.read_bytes() == b"the user's hand-corrected mask" and not list(tmp_path.glob(".case*"))


def test_bad_entries_are_reported_and_the_others_run(tmp_path, checkpoint, image_path, capsys):
    entries = [
        _case(image_path, out="first.nii.gz"),
        _case(image_path, positive=[[25, 30, 15], [1, 2]], out="second.nii.gz"),
        {"image": str(image_path), "negative": [[20, 30, 15]], "space": "ijk", "out": "negatives.nii.gz"},
        {"image": str(image_path), "clicks": [{"point": [26, 31, 14], "positive": True}], "space": "ijk"},
    ]
    assert _batch(_manifest(tmp_path, entries), checkpoint, tmp_path / "out", "--regions", "1") == 1
    output = capsys.readouterr().out
    assert "Manifest entry 2: Point [1, 2] is not three numbers" in output
    assert "No positive click" in output
    assert "2 of 4 cases segmented, 2 failed" in output
    assert (tmp_path / "first.nii.gz").exists() and (tmp_path / "out" / "scan_mask.nii.gz").exists()
    assert not (tmp_path / "second.nii.gz").exists() and not (tmp_path / "negatives.nii.gz").exists()


def test_only_json_booleans_say_whether_a_click_is_positive(tmp_path, image_path):
    clicks = [{"point": [25, 30, 15]}, {"point": [20, 30, 15], "positive": False}]
    (case,) = read_manifest(_manifest(tmp_path, [{"image": str(image_path), "clicks": clicks}]))
    assert case.problem is None and [positive for _, positive in case.clicks] == [True, False]


def test_a_folder_given_as_the_manifest_is_named_as_one(tmp_path):
    """`finetune` takes a folder of cases; `batch` needs clicks, so a manifest, and the folder does exist."""
    with pytest.raises(InputError, match="is a folder"):
        read_manifest(tmp_path)


def test_an_empty_manifest_is_an_error(tmp_path):
    with pytest.raises(InputError, match="lists no cases"):
        read_manifest(_manifest(tmp_path, []))


def test_segment_volume_names_a_misused_argument_and_takes_clicks_from_a_generator(checkpoint, image_path):
    predictor = load_predictor(str(checkpoint), device="cpu")
    volume = Volume.from_file(image_path)
    clicks = [((25, 30, 15), True), ((20, 30, 15), False)]
    expected = segment_volume(predictor, volume, clicks, space="ijk", regions="1").mask
    generated = segment_volume(predictor, volume, (click for click in clicks), space="ijk", regions="1").mask
    assert np.array_equal(generated, expected)
    for call, message in [
        (lambda: segment_volume(predictor, str(image_path), clicks), "needs a Volume, not str"),
        (lambda: segment_volume(predictor, volume, [(25, 30, 15)]), "Click 1 is (25, 30, 15); give each click"),
        (lambda: segment_volume(predictor, volume, [((25, 30, 15), "yes")]), "as a (point, positive) pair"),
        (lambda: segment_volume(predictor, volume, clicks, space=None), "Point space None is unknown"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            call()


def test_a_case_made_in_python_may_give_its_paths_as_text(tmp_path, image_path):
    (case,) = plan_outputs([Case(str(image_path), [((25, 30, 15), True)], space="ijk")], tmp_path)
    assert case.image == image_path and case.out == tmp_path / "scan_mask.nii.gz"


def _nrrd_fields(path: Path) -> dict[str, str]:
    """The `key:=value` fields of an NRRD header, as 3D Slicer's segmentation reader takes them."""
    header = path.read_bytes().split(b"\n\n", 1)[0].decode("ascii")  # the header ends at the first empty line
    return dict(line.split(":=", 1) for line in header.splitlines() if ":=" in line)


def test_a_seg_nrrd_mask_is_a_slicer_segmentation_with_a_named_segment(tmp_path):
    volume = Volume.from_array(np.zeros((10, 12, 14), np.int16), np.diag([-0.8, -0.8, 2.0, 1.0]))
    mask = np.zeros((10, 12, 14), np.uint8)
    mask[3:6, 4:8, 5:9] = 1
    path = write_mask(mask, volume, tmp_path / "liver.seg.nrrd")
    fields = _nrrd_fields(path)
    assert fields["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert fields["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert (fields["Segment0_ID"], fields["Segment0_Name"], fields["Segment0_LabelValue"]) == (
        "Segment_1",
        "liver",
        "1",
    )
    assert fields["Segment0_Layer"] == "0" and len(fields["Segment0_Color"].split()) == 3
    assert fields["Segment0_Extent"] == "5 8 4 7 3 5"  # i0 i1 j0 j1 k0 k1 of the filled voxels
    assert "Segment1_ID" not in fields
    np.testing.assert_array_equal(Volume.from_file(path).array_kji, mask)
    assert not any(key.startswith("Segment") for key in _nrrd_fields(write_mask(mask, volume, tmp_path / "m.nrrd")))


def test_an_empty_seg_nrrd_mask_keeps_its_segment_and_a_label_map_gets_one_per_value(tmp_path):
    volume = Volume.from_array(np.zeros((4, 5, 6), np.int16), np.eye(4))
    empty = _nrrd_fields(write_mask(np.zeros((4, 5, 6), bool), volume, tmp_path / "none.seg.nrrd"))
    assert (empty["Segment0_Name"], empty["Segment0_Extent"]) == ("none", "0 -1 0 -1 0 -1")
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[0, 0, 0], labels[3, 4, 5] = 2, 7
    fields = _nrrd_fields(write_mask(labels, volume, tmp_path / "pred.seg.nrrd"))
    assert [fields[f"Segment{i}_LabelValue"] for i in (0, 1)] == ["2", "7"] and "Segment2_ID" not in fields
    assert [fields[f"Segment{i}_Name"] for i in (0, 1)] == ["pred 2", "pred 7"]
    assert fields["Segment1_Extent"] == "5 5 4 4 3 3" and fields["Segment0_Color"] != fields["Segment1_Color"]
