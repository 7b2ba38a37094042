"""The `sammed3d` command line: segment, batch and demo, end to end on small files."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import shared_path

from SAMMed3DLib import cli
from SAMMed3DLib.cli import main
from SAMMed3DLib.commands import phantom as phantom_command
from SAMMed3DLib.commands.segment import OrderedClick
from SAMMed3DLib.preprocess import PreparedVolume
from SAMMed3DLib.preview import BOTH_COLOUR, CLICK_COLOUR, MASK_COLOUR, TRUTH_COLOUR, save_preview


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 200, size=(30, 60, 50)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 3.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    path = tmp_path_factory.mktemp("data") / "scan.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def _segment(image, checkpoint, out, *options: str) -> int:
    """Run `sammed3d segment` on IJK points."""
    return main(["segment", str(image), "--checkpoint", str(checkpoint), "--out", str(out), "--space", "ijk", *options])


def test_segment_writes_a_mask_with_the_image_geometry(tmp_path, checkpoint, image_path, capsys):
    out = tmp_path / "mask.nii.gz"
    assert _segment(image_path, checkpoint, out, "--pos", "25,30,15", "--neg", "20,30,15", "--regions", "1") == 0
    mask, image = sitk.ReadImage(str(out)), sitk.ReadImage(str(image_path))
    assert mask.GetSize() == image.GetSize() and mask.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(mask.GetOrigin(), image.GetOrigin()) and np.allclose(mask.GetDirection(), image.GetDirection())
    assert "predicted IoU" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


def test_points_with_negative_coordinates_need_no_equals_sign(tmp_path, checkpoint, image_path):
    """RAS points left of or behind the origin start with '-', which argparse would take for an option."""
    by_index, by_ras = tmp_path / "ijk.nii.gz", tmp_path / "ras.nii.gz"
    assert _segment(image_path, checkpoint, by_index, "--pos", "25,30,15", "--neg", "20,30,15", "--regions", "1") == 0
    ras = ["--pos", "-47.5,-25,50", "--neg", "-40,-25,50", "--regions", "1"]  # the same voxels (origin 10,-20,5 LPS)
    assert main(["segment", str(image_path), "--checkpoint", str(checkpoint), "--out", str(by_ras), *ras]) == 0
    masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(path))) for path in (by_index, by_ras)]
    assert masks[0].any() and np.array_equal(masks[0], masks[1])


def test_clicks_keep_command_line_order():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--pos", action=OrderedClick)
    parser.add_argument("--neg", action=OrderedClick)
    args = parser.parse_args(["--neg", "1,2,3", "--pos", "4,5,6", "--neg", "7,8,9"])
    assert args.clicks == [((1, 2, 3), False), ((4, 5, 6), True), ((7, 8, 9), False)]


@pytest.mark.parametrize(
    "clicks, message",
    [(["--pos", "1,2"], "three numbers"), (["--pos", "9999,0,0"], "outside"), (["--neg", "1,1,1"], "positive")],
)
def test_segment_errors_are_one_clear_sentence(tmp_path, checkpoint, image_path, clicks, message, capsys):
    out = tmp_path / "mask.nii.gz"
    assert _segment(image_path, checkpoint, out, *clicks) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("point, message", [("9999,0,0", "outside"), ("1e999,0,0", "finite")])
def test_a_point_that_cannot_be_used_fails_before_the_model_loads(tmp_path, image_path, point, message, capsys):
    """A published checkpoint may have to be downloaded first: a typo in a point must not wait for it."""
    assert _segment(image_path, tmp_path / "absent.pth", tmp_path / "mask.nii.gz", "--pos", point) == 2
    error = capsys.readouterr().err
    assert message in error and "absent.pth" not in error


def test_ctrl_c_is_one_line_and_exit_code_130(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(phantom_command, "run", interrupted)
    assert main(["phantom", "--seed", "1", "--out", str(tmp_path / "p")]) == 130
    assert capsys.readouterr().err == (
        "sammed3d: interrupted; files already written are whole, nothing was left half-written.\n"
    )


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGTERM and SIGHUP are sent this way on POSIX only")
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_a_cluster_time_limit_or_closed_terminal_stops_as_ctrl_c_does(stop, tmp_path):
    """Stopped like Ctrl+C, temporary files are removed and training saves its last step; killed outright, not.
    After SIGHUP the terminal is gone: output goes nowhere instead of failing with EIO (exit status 1)."""
    notes = tmp_path / "notes.txt"
    script = f"""
import os, signal, sys, time
from SAMMed3DLib import cli
from SAMMed3DLib.commands import phantom
from SAMMed3DLib.training import interrupts_deferred

def run(args):
    with interrupts_deferred():  # training's save: the signal waits for it
        os.kill(os.getpid(), signal.{stop})
        time.sleep(0.2)
        with open({str(notes)!r}, "w") as file:
            file.write("the save finished")
    time.sleep(30)

phantom.run = run
code = cli.main(["phantom", "--out", "unused"])
print("after main", flush=True)
os._exit(code if signal.getsignal(signal.{stop}) is signal.SIG_DFL else 1)
"""
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert finished.returncode == 130 and notes.read_text() == "the save finished"
    if stop == "SIGTERM":
        assert finished.stderr.startswith("sammed3d: interrupted") and finished.stdout == "after main\n"
    else:
        assert finished.stderr == "" and finished.stdout == ""


def test_a_ctrl_c_while_the_commands_load_is_one_line_too(monkeypatch, capsys):
    """Loading the commands imports PyTorch, a second or so; the command line is started before that."""
    startup = subprocess.run(
        [sys.executable, "-c", "import sys, SAMMed3DLib.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert startup.stdout.strip() == "False"

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert main(["phantom", "--seed", "1", "--out", "p"]) == 130
    assert capsys.readouterr().err.startswith("sammed3d: interrupted")


def test_missing_image_and_bad_checkpoint(tmp_path, checkpoint, capsys):
    assert _segment(tmp_path / "absent.nii.gz", checkpoint, tmp_path / "m.nii.gz", "--pos", "1,2,3") == 2
    assert "absent.nii.gz" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_text("not a model")
    image = tmp_path / "img.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(8000, dtype=np.int16).reshape(20, 20, 20)), str(image))
    assert _segment(image, bad, tmp_path / "m.nii.gz", "--pos", "5,5,5") == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err


def test_cuda_requested_without_cuda(tmp_path, checkpoint, image_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _segment(image_path, checkpoint, tmp_path / "m.nii.gz", "--pos", "25,30,15", "--device", "cuda") == 2
    assert "--device cpu" in capsys.readouterr().err


def test_batch_continues_past_a_failing_case(tmp_path, checkpoint, image_path, capsys):
    manifest = tmp_path / "cases.json"
    manifest.write_text(
        json.dumps(
            [
                {"image": str(image_path), "positive": [[25, 30, 15]], "negative": [[20, 30, 15]], "space": "ijk"},
                {"image": str(tmp_path / "missing.nii.gz"), "positive": "1,2,3"},
                {
                    "image": str(image_path),
                    "clicks": [{"point": [26, 31, 14], "positive": True}],
                    "space": "ijk",
                    "out": "second.nii.gz",
                },
            ]
        )
    )
    code = main(
        ["batch", str(manifest), "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path / "out"), "--regions", "1"]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "2 of 3 cases segmented, 1 failed" in captured.out
    assert "missing.nii.gz" in captured.out
    assert (tmp_path / "out" / "scan_mask.nii.gz").exists() and (tmp_path / "second.nii.gz").exists()


def test_batch_reads_csv_manifests(tmp_path, checkpoint, image_path, capsys):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f'image,positive,negative,space\n{image_path},"25,30,15;26,30,15","20,30,15",ijk\n')
    assert main(["batch", str(manifest), "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path / "out")]) == 0
    assert "1 of 1 cases segmented" in capsys.readouterr().out


def test_evaluate_command_reproduces_the_official_run(tmp_path, capsys):
    """Official protocol through the command (seed 233, one click) on the real half-voxel-tie CT."""
    out, report_path = tmp_path / "pred.nii.gz", tmp_path / "report.json"
    code = main(
        [
            "evaluate",
            str(shared_path("data/ct_abdomen_pelvis_totalseg_3mm/image.nii.gz")),
            str(shared_path("fixtures/parity/pipeline_real/label_1_2_5.nii.gz")),
            "--checkpoint",
            str(shared_path("fixtures/parity/model_small/state_dict.pt")),
            "--clicks",
            "1",
            "--out",
            str(out),
            "--report",
            str(report_path),
        ]
    )
    assert code == 0
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    official = sitk.GetArrayFromImage(
        sitk.ReadImage(str(shared_path("fixtures/parity/pipeline_real/official_1click_pred.nii.gz")))
    )
    assert (ours != official).sum() <= 1e-3 * (official > 0).sum()
    report = json.loads(report_path.read_text())
    assert sorted(report["labels"]) == ["1", "2", "5"]
    assert len(report["mean_dice"]) == 1 and len(report["labels"]["5"]["clicks"]) == 1
    assert report["run"]["seed"] == 233 and report["run"]["clicks"] == 1 and report["run"]["device"] == "cpu"
    assert report["run"]["checkpoint"].endswith("state_dict.pt") and report["run"]["prompts"] == "every click"
    printed = capsys.readouterr().out
    assert "mean" in printed and f"Wrote {out} and {report_path}" in printed


def test_segment_never_writes_over_its_input_or_an_existing_file(tmp_path, checkpoint, image_path, capsys):
    image = tmp_path / "ct.nii.gz"
    image.write_bytes(image_path.read_bytes())
    assert _segment(image, checkpoint, image, "--pos", "25,30,15", "--overwrite") == 2
    assert "one of the input files" in capsys.readouterr().err
    assert image.read_bytes() == image_path.read_bytes()
    existing = tmp_path / "mask.nii.gz"
    existing.write_text("an earlier result")
    absent = tmp_path / "absent.pth"  # the output is checked before the model loads: no checkpoint error
    assert _segment(image, absent, existing, "--pos", "25,30,15") == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_text() == "an earlier result"
    assert _segment(image, checkpoint, existing, "--pos", "25,30,15", "--overwrite") == 0
    assert sitk.ReadImage(str(existing)).GetSize() == sitk.ReadImage(str(image)).GetSize()


def _label_file(folder, image_path, size_change: int = 0, shift_mm: float = 0.0):
    image = sitk.ReadImage(str(image_path))
    size = list(image.GetSize())
    size[0] += size_change
    label = sitk.Image(size, sitk.sitkUInt8)
    label.SetSpacing(image.GetSpacing())
    label.SetDirection(image.GetDirection())
    label.SetOrigin([image.GetOrigin()[0] + shift_mm, *image.GetOrigin()[1:]])
    label[25, 30, 15] = 1
    path = folder / f"label_{size_change}_{shift_mm}.nii.gz"
    sitk.WriteImage(label, str(path))
    return path


def test_negative_label_values_can_be_named_in_options(tmp_path, image_path, checkpoint, capsys):
    image = sitk.ReadImage(str(image_path))
    array = np.zeros(image.GetSize()[::-1], dtype=np.int16)
    array[5:10, 5:10, 5:10] = -2
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(image)
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(labels, str(path))
    arguments = ["evaluate", str(image_path), str(path), "--out", str(tmp_path / "pred.nii.gz")]
    assert main([*arguments, "--checkpoint", str(tmp_path / "absent.pth"), "--labels", "-2,7"]) == 2
    assert "Label values [7] do not occur in the label map; it has [-2]" in capsys.readouterr().err
    demo = ["demo", "--image", str(image_path), "--label", str(path), "--out", str(tmp_path / "d")]
    assert main([*demo, "--checkpoint", str(checkpoint), "--target", "-2"]) == 0
    assert "Target label -2: one positive click" in capsys.readouterr().out


@pytest.mark.parametrize("size_change, shift_mm", [(-2, 0.0), (0, 30.0)])
def test_demo_refuses_a_label_map_on_another_grid(tmp_path, image_path, size_change, shift_mm, capsys):
    label = _label_file(tmp_path, image_path, size_change, shift_mm)
    out = tmp_path / "demo"
    assert main(["demo", "--image", str(image_path), "--label", str(label), "--out", str(out)]) == 2
    assert "must share one voxel grid" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("value, message", [(0, "label map is empty"), (-3, "only negative values besides 0")])
def test_demo_names_why_a_label_map_has_no_structure(tmp_path, image_path, value, message, capsys):
    image = sitk.ReadImage(str(image_path))
    array = np.zeros(image.GetSize()[::-1], dtype=np.int16)
    array[5:10, 5:10, 5:10] = value
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(image)
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(labels, str(path))
    arguments = ["demo", "--image", str(image_path), "--label", str(path), "--out", str(tmp_path / "d")]
    assert main([*arguments, "--checkpoint", str(tmp_path / "absent.pth")]) == 2
    assert message in capsys.readouterr().err


def test_evaluate_refuses_an_empty_label_map_before_loading_a_model(tmp_path, image_path, capsys):
    empty = tmp_path / "empty.nii.gz"
    sitk.WriteImage(sitk.Image(sitk.ReadImage(str(image_path)).GetSize(), sitk.sitkUInt8), str(empty))
    arguments = ["evaluate", str(image_path), str(empty), "--out", str(tmp_path / "pred.nii.gz")]
    assert main([*arguments, "--checkpoint", str(tmp_path / "absent.pth")]) == 2
    assert "is empty" in capsys.readouterr().err


@pytest.mark.parametrize("size_change, shift_mm", [(-2, 0.0), (0, 30.0)])
def test_evaluate_refuses_a_label_map_on_another_grid_before_loading_a_model(
    tmp_path, image_path, size_change, shift_mm, capsys
):
    label = _label_file(tmp_path, image_path, size_change, shift_mm)
    arguments = ["evaluate", str(image_path), str(label), "--out", str(tmp_path / "pred.nii.gz")]
    assert main([*arguments, "--checkpoint", str(tmp_path / "absent.pth")]) == 2
    assert "must share one voxel grid" in capsys.readouterr().err


def test_phantom_keeps_a_case_already_in_its_folder(tmp_path, capsys):
    (tmp_path / "label.nii.gz").write_text("someone's labels")
    assert main(["phantom", "--seed", "0", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "label.nii.gz").read_text() == "someone's labels"


def test_an_operating_system_error_is_one_sentence_not_a_traceback(tmp_path, monkeypatch, capsys):
    def disk_full(*arguments, **options):
        raise OSError(28, "No space left on device", str(tmp_path / "image.nii.gz"))

    monkeypatch.setattr("SAMMed3DLib.commands.phantom.make_phantom", disk_full)
    assert main(["phantom", "--seed", "0", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sammed3d: error: [Errno 28] No space left on device") and "Traceback" not in error


def test_evaluate_writes_label_values_above_255(tmp_path, checkpoint, image_path):
    image = sitk.ReadImage(str(image_path))
    labels = np.zeros(sitk.GetArrayFromImage(image).shape, dtype=np.uint16)
    labels[10:20, 25:35, 20:30] = 300
    label = sitk.GetImageFromArray(labels)
    label.CopyInformation(image)
    label_path, out = tmp_path / "label.nii.gz", tmp_path / "pred.nii.gz"
    sitk.WriteImage(label, str(label_path))
    arguments = ["evaluate", str(image_path), str(label_path), "--out", str(out), "--checkpoint", str(checkpoint)]
    assert main(arguments) == 0
    written = sitk.ReadImage(str(out))
    assert written.GetPixelID() == sitk.sitkUInt16 and set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 300}


def test_evaluate_says_which_targets_vanish_at_the_model_s_resolution(tmp_path, checkpoint, capsys):
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 50, (40, 40, 40)).astype(np.int16))
    image.SetSpacing((0.5, 0.5, 0.5))
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    labels[10:30, 10:30, 10:30] = 3
    labels[35, 35, 36] = 7  # one 0.5 mm voxel: between the 1.5 mm grid's voxel centres
    label = sitk.GetImageFromArray(labels)
    label.CopyInformation(image)
    paths = {name: tmp_path / f"{name}.nii.gz" for name in ("image", "label", "pred")}
    sitk.WriteImage(image, str(paths["image"]))
    sitk.WriteImage(label, str(paths["label"]))
    report_path = tmp_path / "report.json"
    arguments = ["evaluate", str(paths["image"]), str(paths["label"]), "--out", str(paths["pred"]), "--clicks", "2"]
    assert main([*arguments, "--checkpoint", str(checkpoint), "--report", str(report_path)]) == 0
    assert "Label(s) 7: no voxel left at 1.5 mm" in capsys.readouterr().out
    report = json.loads(report_path.read_text())["labels"]
    assert report["7"]["vanished_at_1.5mm"] and report["7"]["dice"] == [0.0, 0.0]
    assert report["7"]["iou_pred"] == [None, None] and report["7"]["clicks"] == []
    assert not report["3"]["vanished_at_1.5mm"] and len(report["3"]["iou_pred"]) == 2


@pytest.mark.parametrize(
    "seed, message", [("-5", "seed -5 is out of range"), ("99999999999", "is out of range"), ("two", "not a whole")]
)
def test_a_seed_numpy_cannot_take_is_a_usage_error(tmp_path, image_path, seed, message, capsys):
    label = _label_file(tmp_path, image_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(image_path), str(label), "--out", str(tmp_path / "pred.nii.gz"), "--seed", seed])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--clicks", "0"], "--clicks is 0"),
        (["--report", "{out}"], "--report and --out both name"),
        (["--labels", "1,7"], "Label values [7] do not occur in the label map; it has [1]"),
    ],
)
def test_evaluate_refuses_bad_options_before_loading_a_model(tmp_path, image_path, options, message, capsys):
    label = _label_file(tmp_path, image_path)
    out = tmp_path / "pred.nii.gz"
    options = [option.format(out=out) for option in options]
    arguments = ["evaluate", str(image_path), str(label), "--out", str(out), "--checkpoint", str(tmp_path / "x.pth")]
    assert main([*arguments, *options]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_mask_in_a_slice_format_is_refused_before_the_model_loads(tmp_path, image_path, capsys):
    assert _segment(image_path, tmp_path / "absent.pth", tmp_path / "mask.png", "--pos", "25,30,15") == 2
    assert "not a volume format" in capsys.readouterr().err and not (tmp_path / "mask.png").exists()


def test_demo_never_writes_over_a_users_files(tmp_path, image_path, capsys):
    folder = tmp_path / "study"
    folder.mkdir()
    label = _label_file(folder, image_path).rename(folder / "mask.nii.gz")
    label_bytes = label.read_bytes()
    arguments = ["demo", "--image", str(image_path), "--label", str(label), "--out", str(folder)]
    assert main(arguments) == 2
    assert "is where the demo writes its mask.nii.gz" in capsys.readouterr().err
    scan = folder / "image.nii.gz"
    scan.write_bytes(image_path.read_bytes())
    assert main(["demo", "--out", str(folder)]) == 2  # a phantom would replace someone's scan
    assert "is not a phantom written by sammed3d" in capsys.readouterr().err
    assert label.read_bytes() == label_bytes and scan.read_bytes() == image_path.read_bytes()
    assert sorted(path.name for path in folder.iterdir()) == ["image.nii.gz", "mask.nii.gz"]


@pytest.mark.parametrize("name", ["mask.nii.gz", "preview.png"])
def test_demo_replaces_a_mask_or_preview_of_someone_else_only_with_overwrite(tmp_path, image_path, name, capsys):
    label = _label_file(tmp_path, image_path)
    for arguments in (["demo"], ["demo", "--image", str(image_path), "--label", str(label)]):
        folder = tmp_path / f"theirs{len(arguments)}"
        folder.mkdir()
        theirs = folder / name
        theirs.write_bytes(b"a file of the user's")
        assert main([*arguments, "--out", str(folder), "--checkpoint", str(tmp_path / "absent.pth")]) == 2
        assert f"{theirs} already exists" in capsys.readouterr().err
        assert theirs.read_bytes() == b"a file of the user's" and [p.name for p in folder.iterdir()] == [name]
        assert main([*arguments, "--out", str(folder), "--overwrite"]) == 0
        assert theirs.read_bytes() != b"a file of the user's"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--label", "labels.nii.gz"], "--label needs --image"),
        (["--target", "0"], "--target 0 is the background"),
        (["--image", "scan.nii.gz", "--label", "labels.nii.gz", "--seed", "3"], "--seed picks a phantom"),
    ],
)
def test_demo_refuses_options_that_would_be_ignored_or_meaningless(tmp_path, options, message, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), *options]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_demo_times_the_click_not_the_resampling_done_before_it(tmp_path, checkpoint, image_path, monkeypatch, capsys):
    """The Slicer module resamples a volume when it is selected: the click-to-mask time leaves that out."""
    resample = PreparedVolume.__init__

    def slow_resample(self, volume):
        resample(self, volume)
        time.sleep(2.0)

    monkeypatch.setattr(PreparedVolume, "__init__", slow_resample)
    label = _label_file(tmp_path, image_path)
    arguments = ["demo", "--image", str(image_path), "--label", str(label), "--out", str(tmp_path / "d")]
    assert main([*arguments, "--checkpoint", str(checkpoint)]) == 0
    seconds = float(re.search(r"([0-9.]+) s from click to mask", capsys.readouterr().out).group(1))
    assert seconds < 2.0


def _preview(folder, array, spacing, point_ijk) -> np.ndarray:
    """save_preview of `array` (K, J, I) with an empty mask, read back as (rows, columns, RGB)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    mask = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(image)
    save_preview(image, mask, point_ijk, folder / "preview.png")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "preview.png")))


def test_preview_of_a_scan_not_in_hounsfield_units_shows_its_contrast(tmp_path):
    """An MR (here 1000 on the patient's right, 3000 on the left) was all white in the CT soft-tissue window."""
    array = np.full((10, 20, 20), 1000, dtype=np.uint16)
    array[:, :, 10:] = 3000
    axial = _preview(tmp_path, array, (1.0, 1.0, 1.0), (10, 10, 5))[:20, :20]
    assert axial[5, 2].tolist() != axial[5, 17].tolist()


def test_preview_panels_share_one_mm_scale(tmp_path):
    """With three different spacings, the sagittal panel was drawn at 1 mm a pixel and the others at 0.5 mm."""
    preview = _preview(tmp_path, np.zeros((10, 20, 40), dtype=np.int16), (0.5, 1.0, 2.0), (20, 10, 5))
    assert preview.shape[:2] == (40, 3 * (40 + 4))  # each panel 20 mm x 20 mm at 0.5 mm a pixel, then a gap


def test_preview_marks_the_click_with_a_dot_not_a_bar_three_thick_slices_tall(tmp_path):
    preview = _preview(tmp_path, np.zeros((8, 40, 40), dtype=np.int16), (0.7, 0.7, 5.0), (20, 20, 4))
    assert np.all(preview == CLICK_COLOUR, axis=2).sum() == 3 * 3 * 3


def test_a_mask_equal_to_the_truth_shows_in_the_preview_instead_of_hiding_under_it(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((20, 40, 40), dtype=np.int16))
    square = np.zeros((20, 40, 40), dtype=np.uint8)
    square[:, 10:30, 10:30] = 1
    mask = sitk.GetImageFromArray(square)
    mask.CopyInformation(image)
    save_preview(image, mask, (20, 20, 10), tmp_path / "preview.png", truth=mask)
    axial = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "preview.png")))[:40, :40]
    coloured = {tuple(colour) for colour in axial.reshape(-1, 3).tolist()}
    assert BOTH_COLOUR in coloured and TRUTH_COLOUR not in coloured and MASK_COLOUR not in coloured


def test_a_scan_given_as_the_label_map_or_a_float_label_map_is_refused(tmp_path, image_path, capsys):
    image = sitk.ReadImage(str(image_path))
    scan_like = sitk.GetImageFromArray(np.arange(30 * 60 * 50, dtype=np.int16).reshape(30, 60, 50) % 3000)
    scan_like.CopyInformation(image)
    swapped = tmp_path / "ct.nii.gz"
    sitk.WriteImage(scan_like, str(swapped))
    arguments = ["evaluate", str(image_path), str(swapped), "--out", str(tmp_path / "pred.nii.gz")]
    assert main([*arguments, "--checkpoint", str(tmp_path / "absent.pth")]) == 2
    assert "3000 different values: it looks like an image" in capsys.readouterr().err
    fractional = sitk.Cast(sitk.ReadImage(str(_label_file(tmp_path, image_path))), sitk.sitkFloat32) * 0.5
    floats = tmp_path / "floats.nii.gz"
    sitk.WriteImage(fractional, str(floats))
    assert main(["demo", "--image", str(image_path), "--label", str(floats), "--out", str(tmp_path / "d")]) == 2
    assert "non-integer values" in capsys.readouterr().err
