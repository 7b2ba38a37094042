"""Training and fine-tuning: data preparation, samples, clicks, loss, checkpoints, resume, the commands."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import threading
import time
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from SAMMed3DLib import training
from SAMMed3DLib.checkpoint import load_model, save_checkpoint
from SAMMed3DLib.clicks import simulate_click
from SAMMed3DLib.commands import train as train_command
from SAMMed3DLib.config import ModelConfig, build_model
from SAMMed3DLib.errors import CheckpointError, InputError, SAMMed3DError
from SAMMed3DLib.phantom import MIN_MAX_VOXELS, make_phantom, write_phantom
from SAMMed3DLib.preprocess import crop_with_zero_padding, normalise_intensities
from SAMMed3DLib.published import DEMO_CHECKPOINT
from SAMMed3DLib.training import (
    GRAD_SCALER_KEY,
    CaseCache,
    CaseFiles,
    ProgressLine,
    Trainer,
    TrainingData,
    TrainingOptions,
    ambiguity_loss,
    dice_ce_loss,
    dice_loss,
    find_cases,
    flip_region,
    interact,
    interrupts_deferred,
    learning_rate_factor,
    make_sample,
    mask_only_steps,
    model_for_training,
    read_training_checkpoint,
    seed_multimask_outputs,
    steps_for_epochs,
)

TINY = ModelConfig(
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    window_size=4,
    prompt_embed_dim=48,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and polite on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    write_phantom(make_phantom(1000, max_voxels=MIN_MAX_VOXELS), folder / "phantom_1000")
    return folder


@pytest.fixture(scope="module")
def data(cases_dir, tmp_path_factory):
    return TrainingData(find_cases(cases_dir), CaseCache(tmp_path_factory.mktemp("cache")), min_voxels=20)


def tiny_options(**changes) -> TrainingOptions:
    values = dict(steps=2, clicks_per_sample=2, warmup_steps=1, checkpoint_every=1, lr_encoder=1e-3, lr_decoder=1e-3)
    values["min_voxels"] = 20  # as `data` was made with (a resumed run keeps it)
    values.update(changes)
    return TrainingOptions(**values)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY)


# ------------------------------------------------------------------------------------------- data


def test_targets_are_the_label_values_with_enough_voxels(data, cases_dir, tmp_path):
    phantom_values = set(make_phantom(1000, max_voxels=MIN_MAX_VOXELS).label_names)
    assert {target.value for target in data.targets} <= phantom_values
    assert all(target.voxels >= 20 for target in data.targets)
    strict = TrainingData(find_cases(cases_dir), data.cache, min_voxels=max(t.voxels for t in data.targets))
    assert len(strict.targets) == 1
    with pytest.raises(InputError, match="min-voxels"):
        TrainingData(find_cases(cases_dir), data.cache, min_voxels=10**9)


def test_the_cache_is_reused(data, cases_dir):
    files = find_cases(cases_dir)[0]
    path = data.cache.path_for(files)
    written = path.stat().st_mtime_ns
    CaseCache(data.cache.folder).summary(files)
    assert path.stat().st_mtime_ns == written


def test_a_manifest_lists_cases(cases_dir, tmp_path, monkeypatch):
    manifest = tmp_path / "cases.csv"
    row = f"{cases_dir}/phantom_1000/image.nii.gz,{cases_dir}/phantom_1000/label.nii.gz,train"
    manifest.write_text(f"image,label,split\n{row}\n")  # a column of the user's own is fine
    assert find_cases(manifest) == find_cases(cases_dir)
    monkeypatch.setenv("HOME", str(cases_dir))
    manifest.write_text("image,label\n~/phantom_1000/image.nii.gz,~/phantom_1000/label.nii.gz\n")
    assert find_cases(manifest) == find_cases(cases_dir)  # '~' is the home folder, not a folder named '~'
    broken = tmp_path / "broken.csv"
    broken.write_text("image,label\nmissing.nii.gz,missing_label.nii.gz\n")
    with pytest.raises(InputError, match="does not exist"):
        find_cases(broken)
    folder = tmp_path / "series.csv"  # a DICOM folder as the image
    folder.write_text(f"image,label\n{cases_dir}/phantom_1000,{cases_dir}/phantom_1000/label.nii.gz\n")
    with pytest.raises(InputError, match=r"phantom_1000 \(line 2 of .*series.csv\) is a folder \(a DICOM series\?\)"):
        find_cases(folder)
    numbered = tmp_path / "numbered.json"
    numbered.write_text(json.dumps([{"image": f"{cases_dir}/phantom_1000/image.nii.gz", "label": 5}]))
    with pytest.raises(InputError, match="Entry 1 of .* lacks an 'image' or 'label' path"):
        find_cases(numbered)
    (tmp_path / "linked").symlink_to(cases_dir, target_is_directory=True)
    repeated = tmp_path / "repeated.csv"  # the same files, the second time by a relative path through a link
    repeated.write_text(f"image,label\n{row}\nlinked/phantom_1000/image.nii.gz,linked/phantom_1000/label.nii.gz\n")
    with pytest.raises(InputError, match="Line 3 of .*repeated.csv repeats line 2; list each case once"):
        find_cases(repeated)


def test_a_case_folder_without_its_label_or_image_is_refused_not_left_out(cases_dir, tmp_path):
    (tmp_path / "notes").mkdir()  # a folder that is no case at all is passed over
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "complete").symlink_to(cases_dir / "phantom_1000", target_is_directory=True)
    assert len(find_cases(tmp_path)) == 1
    for present, absent in (("image.nii.gz", "label.nii.gz"), ("label.nii.gz", "image.nii.gz")):
        half = tmp_path / f"only_{present.split('.')[0]}"
        half.mkdir()
        (half / present).symlink_to(cases_dir / "phantom_1000" / present)
        with pytest.raises(InputError, match=f"only_{present.split('.')[0]} has {present} but no {absent}"):
            find_cases(tmp_path)
        (half / present).unlink()


def _case_with_label(cases_dir, folder, change) -> CaseFiles:
    """The phantom's image with its label map changed by `change` (a SimpleITK image to a SimpleITK image)."""
    folder.mkdir()
    (folder / "image.nii.gz").symlink_to(cases_dir / "phantom_1000" / "image.nii.gz")
    sitk.WriteImage(change(sitk.ReadImage(str(cases_dir / "phantom_1000" / "label.nii.gz"))), str(folder / "l.nii.gz"))
    return CaseFiles(folder / "image.nii.gz", folder / "l.nii.gz")


def _only_value(value: int, scale: float):
    def change(label):
        array = (sitk.GetArrayFromImage(label) == value).astype(np.float32) * scale
        changed = sitk.GetImageFromArray(array)
        changed.CopyInformation(label)
        return changed

    return change


def test_a_float_label_map_of_whole_numbers_trains_and_one_of_fractions_is_refused(data, cases_dir, tmp_path):
    largest = max(data.targets, key=lambda target: target.voxels)
    cache = CaseCache(tmp_path / "cache")
    whole = cache.summary(_case_with_label(cases_dir, tmp_path / "whole", _only_value(largest.value, 1.0)))
    assert whole.values == [1] and whole.voxel_counts == [largest.voxels]
    # Resampled with linear interpolation, or a probability map: int() would make 0.5 the background, value 0.
    fractions = _case_with_label(cases_dir, tmp_path / "fractions", _only_value(largest.value, 0.5))
    with pytest.raises(InputError, match=re.escape(f"{fractions.label} has non-integer values")):
        cache.summary(fractions)


def test_an_image_given_as_the_label_map_is_refused_saying_so(cases_dir, tmp_path):
    image = cases_dir / "phantom_1000" / "image.nii.gz"
    with pytest.raises(InputError, match=r"not a label map \(at most 1000 values\); give the case.s label map"):
        CaseCache(tmp_path / "cache").summary(CaseFiles(image, image))


def test_more_than_255_labels_train(tmp_path):
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 20, (8, 8, 8)).astype(np.int16))
    label = sitk.GetImageFromArray((np.arange(8**3) % 256 + 1).reshape(8, 8, 8).astype(np.int16))  # 256 labels
    for volume, name in ((image, "image.nii.gz"), (label, "label.nii.gz")):
        volume.SetSpacing((1.5, 1.5, 1.5))
        sitk.WriteImage(volume, str(tmp_path / name))
    prepared = CaseCache(tmp_path / "cache").summary(CaseFiles(tmp_path / "image.nii.gz", tmp_path / "label.nii.gz"))
    assert prepared.values == list(range(1, 257)) and prepared.targets.max() == 256


def test_a_label_map_on_another_grid_is_refused_naming_its_file(cases_dir, tmp_path):
    def shifted(label):
        label.SetOrigin([coordinate + 30.0 for coordinate in label.GetOrigin()])
        return label

    files = _case_with_label(cases_dir, tmp_path / "shifted", shifted)
    with pytest.raises(InputError, match=re.escape(f"{files.label} and {files.image} have the same size but differ")):
        CaseCache(tmp_path / "cache").summary(files)


def test_an_interrupted_preparation_leaves_no_part_file_in_the_cache(cases_dir, tmp_path, monkeypatch):
    def cut_off(file, **arrays):
        file.write_bytes(b"PK part of a case")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", cut_off)
    cache = CaseCache(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        cache.summary(find_cases(cases_dir)[0])
    assert list(cache.folder.iterdir()) == []


def test_a_sample_is_the_flipped_region_of_its_target(data):
    rng = np.random.default_rng(3)
    target = data.targets[0]
    case = data.case(target)
    for _ in range(4):
        sample = make_sample(case, target, rng, jitter=8, foreground_centre_probability=0.5)
        label = crop_with_zero_padding(case.targets == target.number, sample.begin)
        raw = crop_with_zero_padding(case.raw, sample.begin)
        raw, label = flip_region(raw, label, sample.flips)
        assert sample.label.any()
        np.testing.assert_array_equal(sample.label, label)
        torch.testing.assert_close(sample.image, normalise_intensities(raw))


def test_a_click_centred_sample_starts_with_a_positive_click_at_the_region_centre(data):
    rng = np.random.default_rng(4)
    target = data.targets[0]
    case = data.case(target)
    flipped = set()
    for _ in range(8):
        sample = make_sample(case, target, rng, click_centre_probability=1.0)
        centre = np.full(3, 64)
        centre[list(sample.flips)] = 63  # a flip mirrors index 64 to 127 - 64
        assert sample.first_click == tuple(centre)
        assert sample.label[sample.first_click]  # the click lies in the target
        flipped.update(sample.flips)
    assert flipped  # flips were exercised
    assert make_sample(case, target, rng).first_click is None  # the official sampling has no fixed first click


def test_interaction_starts_from_the_given_first_click(data):
    rng = np.random.default_rng(5)
    target = data.targets[0]
    sample = make_sample(data.case(target), target, rng, click_centre_probability=1.0)
    model = tiny_model()
    with torch.no_grad():
        embedding = model.image_encoder(sample.image)
    outside = tuple(int(i) for i in np.argwhere(~sample.label)[0])
    losses = []
    for first_click in (sample.first_click, outside):
        loss, _ = interact(model, embedding, sample.label, 1 + 1, np.random.default_rng(6), first_click=first_click)
        losses.append(loss.item())
    assert losses[0] != losses[1]  # the first click given is the one the decoder sees


def test_flips_keep_image_label_and_clicks_together():
    raw = np.arange(128**3, dtype=np.int32).reshape((128,) * 3)
    label = raw % 7 == 0
    random_state = np.random.RandomState(0)
    for axes in [(0,), (1, 2), (0, 1, 2)]:
        flipped_raw, flipped_label = flip_region(raw, label, axes)
        np.testing.assert_array_equal(flipped_label, flipped_raw % 7 == 0)
        # a click drawn on the flipped label is the mirror image of a foreground voxel of the original
        point, point_label = simulate_click(np.zeros_like(flipped_label), flipped_label, random_state=random_state)
        mirrored = np.array(point)
        mirrored[list(axes)] = 127 - mirrored[list(axes)]
        assert point_label == 1 and label[tuple(mirrored)]
        assert flipped_raw[tuple(point)] == raw[tuple(mirrored)]


# ----------------------------------------------------------------------------------- interaction


def test_clicks_are_positive_in_false_negatives_and_negative_in_false_positives():
    label = np.zeros((32, 32, 32), dtype=bool)
    label[2:10, 2:10, 2:10] = True
    prediction = np.zeros_like(label)
    prediction[20:30, 20:30, 20:30] = True
    random_state = np.random.RandomState(0)
    seen = set()
    for _ in range(40):
        point, point_label = simulate_click(prediction, label, random_state=random_state)
        assert point_label == int(label[tuple(point)])
        assert label[tuple(point)] or prediction[tuple(point)]
        seen.add(point_label)
    assert seen == {0, 1}
    point, point_label = simulate_click(label, label, random_state=random_state)
    assert point_label == 1 and label[tuple(point)]


def test_mask_only_steps_are_the_last_and_one_random_middle_step():
    rng = np.random.default_rng(0)
    middles = set()
    for _ in range(50):
        steps = mask_only_steps(11, rng)
        assert 10 in steps and len(steps) == 2
        middles |= steps - {10}
    assert middles <= set(range(2, 9)) and len(middles) > 3
    assert mask_only_steps(2, rng) == {1}


def test_dice_ce_loss_is_small_for_a_confident_correct_prediction():
    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., 2:6, 2:6, 2:6] = 1
    correct = dice_ce_loss((target * 2 - 1) * 20, target)
    wrong = dice_ce_loss((1 - target * 2) * 20, target)
    assert float(correct) < 1e-3
    assert float(wrong) > 10


def test_dicece_is_the_dice_loss_plus_binary_cross_entropy():
    target = cube_target()
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(0)) * 3
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(dice_ce_loss(logits, target) - dice_loss(logits, target), cross_entropy)
    probabilities = torch.sigmoid(logits)
    squared_dice = 2 * (probabilities * target).sum() / ((probabilities**2).sum() + target.sum())
    torch.testing.assert_close(dice_loss(logits, target), 1 - squared_dice, atol=1e-6, rtol=0)
    assert float(dice_loss((target * 2 - 1) * 20, target)) < 1e-6


# Squared-prediction Dice alone starts slowly from random weights (its gradient is small while every voxel is
# near 0.5), so ten steps lower it less.
@pytest.mark.parametrize("loss, fall", [("dicece", 0.8), ("dice", 0.97)])
def test_the_loss_goes_down_on_one_fixed_sample(data, loss, fall):
    model = tiny_model().train()
    sample = make_sample(data.case(data.targets[0]), data.targets[0], np.random.default_rng(0), flip=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        embedding = model.image_encoder(sample.image)
        value, _ = interact(model, embedding, sample.label, steps=2, rng=np.random.default_rng(1), loss=loss)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < fall * losses[0]


# ---------------------------------------------------------------------------- alternative masks


def cube_target() -> torch.Tensor:
    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., 2:6, 2:6, 2:6] = 1
    return target


def test_the_ambiguity_loss_trains_the_best_mask_and_the_iou_prediction():
    target = cube_target()
    empty, right, everything = -20 * torch.ones_like(target), (target * 2 - 1) * 20, 20 * torch.ones_like(target)
    logits = torch.cat([empty, everything, right], dim=1).requires_grad_()
    measured_iou = torch.tensor([[0.0, 64 / 512, 1.0]])
    loss = ambiguity_loss(logits, target, measured_iou)
    torch.testing.assert_close(loss, dice_ce_loss(right, target))  # exact IoU predictions add nothing
    loss.backward()
    assert logits.grad[:, :2].abs().sum() == 0 and logits.grad[:, 2].abs().sum() > 0  # only the best mask learns

    wrong_iou = torch.tensor([[1.0, 1.0, 0.0]])
    worse = ambiguity_loss(logits.detach(), target, wrong_iou)
    squared_error = torch.tensor((1 + (1 - 64 / 512) ** 2 + 1) / 3)
    torch.testing.assert_close(worse - loss.detach(), squared_error)
    weighted = ambiguity_loss(logits.detach(), target, wrong_iou, iou_weight=10.0)
    torch.testing.assert_close(weighted - loss.detach(), 10 * squared_error)


def test_seeded_alternatives_start_close_to_the_single_mask_but_differ(data):
    model = tiny_model()
    seed_multimask_outputs(model.mask_decoder, torch.Generator().manual_seed(0))
    sample = make_sample(data.case(data.targets[0]), data.targets[0], np.random.default_rng(0), flip=False)
    with torch.no_grad():
        embedding = model.image_encoder(sample.image)
        sparse, dense = model.prompt_encoder(
            points=(torch.tensor([[[64.0, 64.0, 64.0]]]), torch.tensor([[1.0]])), boxes=None, masks=None
        )
        masks, _ = model.mask_decoder.predict_masks(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense)
    single, alternatives = masks[0, 0].flatten(), masks[0, 1:].flatten(1)
    for alternative in alternatives:
        assert not torch.equal(alternative, single)
        assert torch.corrcoef(torch.stack([alternative, single]))[0, 1] > 0.9


def test_multimask_training_trains_the_iou_head_and_marks_the_checkpoint(data, tmp_path):
    model = tiny_model()
    iou_head = [value.clone() for value in model.mask_decoder.iou_prediction_head.parameters()]
    trainer = Trainer(model, data, tiny_options(first_click_multimask=True), tmp_path / "multi.pth")
    trainer.run()
    changed = [
        not torch.equal(before, after)
        for before, after in zip(iou_head, model.mask_decoder.iou_prediction_head.parameters())
    ]
    assert all(changed)
    assert load_model(tmp_path / "multi.pth").first_click_multimask
    resumed = model_for_training(resume=tmp_path / "multi.pth")
    assert resumed.first_click_multimask
    continued = Trainer(resumed, data, tiny_options(steps=3), tmp_path / "more.pth")
    assert continued.options.first_click_multimask  # a model answering with alternatives keeps training them


def test_a_run_resumed_with_alternative_masks_asked_for_goes_on_without_them_as_it_started(data, tmp_path):
    run = tmp_path / "single.pth"
    Trainer(tiny_model(), data, tiny_options(steps=1), run).run()
    trainer = Trainer(model_for_training(resume=run), data, tiny_options(first_click_multimask=True), run)
    trainer.resume(run)
    assert not trainer.options.first_click_multimask and not trainer.model.first_click_multimask
    saved = read_training_checkpoint(run)["model_state_dict"]
    for name, value in trainer.model.state_dict().items():  # the alternatives seeded for the given options undone
        assert torch.equal(saved[name], value), name


@pytest.mark.parametrize("multimask, iou_loss_weight", [(False, 1.0), (True, 0.0)])
def test_without_an_iou_loss_the_iou_head_is_left_alone(data, tmp_path, multimask, iou_loss_weight):
    model = tiny_model()
    iou_head = [value.clone() for value in model.mask_decoder.iou_prediction_head.parameters()]
    options = tiny_options(weight_decay=0.0, first_click_multimask=multimask, iou_loss_weight=iou_loss_weight)
    Trainer(model, data, options, tmp_path / "trained.pth").run()
    assert all(torch.equal(b, a) for b, a in zip(iou_head, model.mask_decoder.iou_prediction_head.parameters()))
    assert load_model(tmp_path / "trained.pth").first_click_multimask == multimask


# ---------------------------------------------------------------------------------- checkpoints


def test_checkpoints_have_the_official_layout_and_load(data, tmp_path):
    out = tmp_path / "run.pth"
    trainer = Trainer(tiny_model(), data, tiny_options(), out)
    state = trainer.run()
    assert state.step == 2 and len(state.losses) == 2
    content = torch.load(out, map_location="cpu", weights_only=True)
    for key in ("model_state_dict", "optimizer_state_dict", "lr_scheduler_state_dict", "epoch", "losses", "dices"):
        assert key in content
    assert content["step"] == 2 and np.isfinite(content["best_loss"])
    loaded = load_model(out)
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_uses_mixed_precision_and_writes_a_cpu_loadable_checkpoint(data, tmp_path):
    options = tiny_options(device="cuda", first_click_multimask=True)
    trainer = Trainer(tiny_model(), data, options, tmp_path / "cuda.pth")
    assert trainer.use_amp
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}  # after multimask seeding
    state = trainer.run()
    assert all(np.isfinite(loss) for loss in state.losses)
    loaded = load_model(tmp_path / "cuda.pth")  # onto the CPU
    assert any(not torch.equal(loaded.state_dict()[name], value) for name, value in before.items())
    assert read_training_checkpoint(tmp_path / "cuda.pth")[GRAD_SCALER_KEY] == trainer.scaler.state_dict()
    resumed = Trainer(
        model_for_training(resume=tmp_path / "cuda.pth"), data, tiny_options(device="cuda"), tmp_path / "r.pth"
    )
    resumed.resume(tmp_path / "cuda.pth")
    assert resumed.scaler.state_dict() == trainer.scaler.state_dict()


def test_resume_continues_where_the_run_stopped(data, tmp_path):
    straight = Trainer(tiny_model(), data, tiny_options(steps=3), tmp_path / "straight.pth")
    straight.run()

    first = Trainer(tiny_model(), data, tiny_options(steps=3), tmp_path / "part.pth")
    first.train_step()
    first.train_step()
    first.save(tmp_path / "part.pth")
    resumed = Trainer(model_for_training(resume=tmp_path / "part.pth"), data, tiny_options(steps=3), tmp_path / "r.pth")
    resumed.resume(tmp_path / "part.pth")
    assert resumed.state.step == 2 and resumed.scheduler.last_epoch == 2
    saved = first.optimizer.state_dict()["state"]
    for index, entry in resumed.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(entry["exp_avg"], saved[index]["exp_avg"])
    resumed.run()
    assert resumed.state.step == 3 and len(resumed.state.losses) == 3
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value)


def test_the_mixed_precision_loss_scale_is_saved_and_resumed(data, tmp_path):
    # The scaler runs on CUDA only; a CPU one (its scale grows every step) stands in for it here.
    run = tmp_path / "run.pth"
    first = Trainer(tiny_model(), data, tiny_options(steps=3), run)
    first.scaler = torch.amp.GradScaler("cpu", growth_interval=1)
    first.train_step()
    first.train_step()
    first.save(run)
    assert read_training_checkpoint(run)[GRAD_SCALER_KEY] == first.scaler.state_dict()
    resumed = Trainer(model_for_training(resume=run), data, tiny_options(steps=3), run)
    resumed.scaler = torch.amp.GradScaler("cpu", growth_interval=1)
    resumed.resume(run)
    assert resumed.scaler.state_dict() == first.scaler.state_dict()
    assert resumed.scaler.get_scale() == 4 * 2.0**16  # grown twice from the initial scale


def test_a_step_whose_scaled_gradients_overflowed_is_done_again_not_counted(data, tmp_path, monkeypatch):
    """The loss scaler skips an update with infinite gradients: counting it lost warm-up steps and moved the
    schedule for weights that never changed (a CPU scaler stands in for the CUDA one)."""
    real_interact, calls = training.interact, []

    def overflowing_once(*args, **kwargs):
        loss, dice = real_interact(*args, **kwargs)
        calls.append(loss)
        return (loss * 1e38 if len(calls) == 1 else loss), dice  # times the scale 2^16: infinite gradients

    monkeypatch.setattr(training, "interact", overflowing_once)
    trainer = Trainer(tiny_model(), data, tiny_options(steps=2), tmp_path / "run.pth")
    trainer.scaler = torch.amp.GradScaler("cpu")
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    trainer.train_step()
    assert len(calls) == 2 and trainer.scaler.get_scale() == 2.0**15  # one try skipped, the scale halved
    assert trainer.state.step == 1 and trainer.scheduler.last_epoch == 1 and len(trainer.state.losses) == 1
    assert any(not torch.equal(trainer.model.state_dict()[name], value) for name, value in before.items())


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_a_step_with_a_nan_loss_is_skipped_as_before_and_endless_overflow_stops_saying_so(data, tmp_path, monkeypatch):
    """The same samples would give the same NaN again: that step is counted as skipped, and training goes on."""
    real_interact = training.interact
    factor = [float("nan")]

    def scaled_loss(*args, **kwargs):
        loss, dice = real_interact(*args, **kwargs)
        return loss * factor[0], dice

    monkeypatch.setattr(training, "interact", scaled_loss)
    trainer = Trainer(tiny_model(), data, tiny_options(steps=2), tmp_path / "run.pth")
    trainer.scaler = torch.amp.GradScaler("cpu")
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    trainer.train_step()
    assert trainer.state.step == 1 and all(torch.equal(trainer.model.state_dict()[n], v) for n, v in before.items())
    factor[0] = 1e38  # finite, but infinite once scaled: each try halves the scale
    monkeypatch.setattr(training, "MAX_OVERFLOWED_TRIES", 3)
    with pytest.raises(SAMMed3DError, match="Step 2: the gradients overflowed 3 times in a row although the loss"):
        trainer.train_step()
    assert trainer.state.step == 1


def official_optimizer(model: torch.nn.Module, lr: float = 8e-4) -> torch.optim.AdamW:
    """The official train.py's AdamW: image encoder, prompt encoder and mask decoder at a tenth of the rate."""
    return torch.optim.AdamW(
        [
            {"params": model.image_encoder.parameters()},
            {"params": model.prompt_encoder.parameters(), "lr": lr * 0.1},
            {"params": model.mask_decoder.parameters(), "lr": lr * 0.1},
        ],
        lr=lr,
        betas=(0.9, 0.999),
        weight_decay=0.1,
    )


def test_the_optimiser_has_the_official_groups_so_the_official_script_resumes_it(data, tmp_path):
    trainer = Trainer(tiny_model(), data, tiny_options(lr_encoder=8e-4, lr_decoder=8e-5), tmp_path / "run.pth")
    trainer.run()
    saved = read_training_checkpoint(tmp_path / "run.pth")["optimizer_state_dict"]
    official = official_optimizer(tiny_model())
    assert [group["initial_lr"] for group in saved["param_groups"]] == [8e-4, 8e-5, 8e-5]
    assert [len(group["params"]) for group in saved["param_groups"]] == [
        len(group["params"]) for group in official.state_dict()["param_groups"]
    ]
    official.load_state_dict(saved)  # what the official --resume does


def with_two_groups(trainer: Trainer) -> Trainer:
    """The trainer with the optimiser this tool used to make: image encoder; prompt encoder and mask decoder."""
    model, options = trainer.model, trainer.options
    decoder = [*model.prompt_encoder.parameters(), *model.mask_decoder.parameters()]
    groups = [{"params": list(model.image_encoder.parameters()), "lr": options.lr_encoder}]
    groups.append({"params": decoder, "lr": options.lr_decoder})
    trainer.optimizer = torch.optim.AdamW(groups, weight_decay=options.weight_decay)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, learning_rate_factor(options))
    return trainer


def test_a_checkpoint_with_the_earlier_two_groups_resumes_exactly(data, tmp_path):
    straight = with_two_groups(Trainer(tiny_model(), data, tiny_options(steps=3), tmp_path / "straight.pth"))
    straight.run()
    first = with_two_groups(Trainer(tiny_model(), data, tiny_options(steps=3), tmp_path / "part.pth"))
    first.train_step()
    first.train_step()
    first.save(tmp_path / "part.pth")
    assert len(read_training_checkpoint(tmp_path / "part.pth")["optimizer_state_dict"]["param_groups"]) == 2
    resumed = Trainer(model_for_training(resume=tmp_path / "part.pth"), data, tiny_options(), tmp_path / "part.pth")
    resumed.resume(tmp_path / "part.pth")
    assert [group["lr"] for group in resumed.optimizer.param_groups] == [
        group["lr"] for group in (first.optimizer.param_groups[0], *[first.optimizer.param_groups[1]] * 2)
    ]
    resumed.run()
    assert resumed.state.step == 3
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value)


def test_fine_tuning_starts_from_the_checkpoint_weights(data, tmp_path):
    source = tiny_model(seed=5)
    Trainer(source, data, tiny_options(steps=1), tmp_path / "source.pth").save(tmp_path / "source.pth")
    model = model_for_training(checkpoint=tmp_path / "source.pth")
    for name, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)


def test_resuming_needs_a_training_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "weights.pth", tiny_model())
    with pytest.raises(CheckpointError, match="fine-tuning"):
        read_training_checkpoint(tmp_path / "weights.pth")


def test_a_truncated_resume_file_is_a_checkpoint_error_naming_it(data, tmp_path):
    path = tmp_path / "run.pth"
    Trainer(tiny_model(), data, tiny_options(), path).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + " is truncated or corrupt"):
        read_training_checkpoint(path)


# --------------------------------------------------------------------------------------- commands


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser()
    train_command.register(root.add_subparsers(dest="command", required=True))
    return root


def test_the_commands_parse(tmp_path):
    args = parser().parse_args(["train", "cases", "--out", "m.pth", "--steps", "5", "--config", "small"])
    assert args.func is train_command.run and args.steps == 5 and args.checkpoint is None
    assert train_command.read_config(args.config) == train_command.CONFIGS["small"]
    args = parser().parse_args(["finetune", "cases", "--out", "m.pth", "--checkpoint", "c.pth", "--epochs", "2"])
    assert args.epochs == 2 and args.config is None
    options = train_command.options_from_args(args)
    assert options.lr_decoder == 8e-5 and options.lr_encoder == 8e-4
    assert steps_for_epochs(args.epochs, 10, options) == 20
    assert steps_for_epochs(2, 10, replace(options, batch_size=2, accumulation=2)) == 5
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "cases", "--out", "m.pth", "--steps", "5", "--epochs", "1"])
    args = parser().parse_args(["train", "cases", "--out", "m.pth", "--click-centre-probability", "0.5"])
    options = train_command.options_from_args(args)
    assert options.click_centre_probability == 0.5 and not options.first_click_multimask
    args = parser().parse_args(["finetune", "cases", "--out", "m.pth", "--checkpoint", "c", "--first-click-multimask"])
    options = train_command.options_from_args(args)
    assert options.first_click_multimask and options.iou_loss_weight == 1.0
    args.iou_loss_weight = 10.0
    assert train_command.options_from_args(args).iou_loss_weight == 10.0
    assert options.loss == "dicece"
    args = parser().parse_args(["train", "cases", "--out", "m.pth", "--loss", "dice"])
    assert train_command.options_from_args(args).loss == "dice"
    args.epochs = 0.0
    with pytest.raises(InputError, match="--epochs is 0.0; give a number of passes above 0"):
        train_command.options_from_args(args)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"iou_loss_weight": -1.0}, r"iou_loss_weight \(--iou-loss-weight\) is -1.0; give a value of 0 or more"),
        ({"loss": "focal"}, r"loss \(--loss\) is 'focal'; give one of dicece, dice"),
        ({"click_centre_probability": 1.5}, r"--click-centre-probability\) is 1.5; give a value from 0 to 1"),
        ({"clicks_per_sample": 1}, r"--clicks-per-sample\) is 1; give a value of 2 or more"),
        ({"steps": 0}, r"--steps\) is 0"),
        ({"batch_size": 0}, r"--batch-size\) is 0"),
        ({"lr_encoder": -1e-4}, r"--lr-encoder\) is -0.0001"),
    ],
)
def test_a_meaningless_option_is_refused_with_its_name_and_range(change, message):
    with pytest.raises(InputError, match=message):
        tiny_options(**change)


def test_a_bad_option_fails_before_any_case_is_read(tmp_path, capsys):
    argv = ["train", str(tmp_path / "no_cases_here"), "--out", str(tmp_path / "m.pth"), "--clicks-per-sample", "0"]
    args = parser().parse_args(argv)
    with pytest.raises(InputError, match="--clicks-per-sample"):
        args.func(args)
    assert "Preparing" not in capsys.readouterr().out


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY.to_dict()))
    return path


def command_line(command: str, cases_dir, data, out, *options: str) -> int:
    """`train` or `finetune` on the phantom with `options` alone, on one CPU thread, sharing the cache of `data`."""
    argv = [command, str(cases_dir), "--out", str(out), "--cache", str(data.cache.folder)]
    args = parser().parse_args([*argv, "--threads", "1", "--device", "cpu", *options])
    return args.func(args)


def run_command(command: str, cases_dir, data, out, *options: str) -> int:
    """One tiny `train` or `finetune` on the phantom, sharing the prepared-case cache of `data`."""
    tiny = ["--steps", "1", "--min-voxels", "20", "--clicks-per-sample", "2"]
    return command_line(command, cases_dir, data, out, *tiny, *options)


def test_the_train_command_trains_and_writes_a_checkpoint(cases_dir, data, tmp_path, tiny_config):
    out = tmp_path / "model.pth"
    assert run_command("train", cases_dir, data, out, "--config", str(tiny_config)) == 0
    assert load_model(out).image_encoder.pos_embed.shape[-1] == TINY.encoder_embed_dim


def test_prepared_cases_go_to_a_private_folder_of_the_per_user_cache(cases_dir, tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("SAMMED3D_CACHE_DIR", str(tmp_path / "user-cache"))
    argv = ["train", str(cases_dir), "--out", str(tmp_path / "m.pth"), "--steps", "1", "--config", str(tiny_config)]
    argv += ["--min-voxels", "20", "--clicks-per-sample", "2", "--threads", "1", "--device", "cpu"]
    args = parser().parse_args(argv)
    assert args.func(args) == 0
    folder = tmp_path / "user-cache" / train_command.PREPARED_CASES_FOLDER
    assert len(list(folder.glob("*.npz"))) == len(find_cases(cases_dir))
    if os.name == "posix":  # the cases are copies of the user's scans
        assert folder.stat().st_mode & 0o077 == 0


def test_fine_tuning_starts_from_the_demo_model_when_no_checkpoint_is_given(tmp_path):
    finetune = parser().parse_args(["finetune", "cases", "--out", "m.pth"])
    assert train_command.starting_checkpoint(finetune) == DEMO_CHECKPOINT
    given = tmp_path / "mine.pth"
    save_checkpoint(given, tiny_model())
    finetune.checkpoint = str(given)
    assert train_command.starting_checkpoint(finetune) == given
    finetune.checkpoint = "no-such-model"
    with pytest.raises(CheckpointError, match="published names: turbo"):
        train_command.starting_checkpoint(finetune)
    assert train_command.starting_checkpoint(parser().parse_args(["train", "cases", "--out", "m.pth"])) is None


def test_the_same_seed_trains_the_same_model(cases_dir, data, tmp_path, tiny_config):
    states = {}
    for name, seed in [("first", "0"), ("again", "0"), ("other", "1")]:
        run_command("train", cases_dir, data, tmp_path / f"{name}.pth", "--config", str(tiny_config), "--seed", seed)
        states[name] = torch.load(tmp_path / f"{name}.pth", map_location="cpu", weights_only=True)
    assert states["first"]["losses"] == states["again"]["losses"]
    for key, value in states["first"]["model_state_dict"].items():
        assert torch.equal(value, states["again"]["model_state_dict"][key]), key
    assert states["first"]["losses"] != states["other"]["losses"]


def test_an_unusable_out_is_refused_before_any_case_is_prepared(cases_dir, data, tmp_path, tiny_config, capsys):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(InputError, match="afile is a file, not a folder"):
        run_command("train", cases_dir, data, tmp_path / "afile" / "model.pth", "--config", str(tiny_config))
    finished = tmp_path / "finished.pth"
    finished.write_bytes(b"a finished model")
    with pytest.raises(InputError, match="already exists.*--overwrite"):
        run_command("train", cases_dir, data, finished, "--config", str(tiny_config))
    assert finished.read_bytes() == b"a finished model"
    assert "Preparing" not in capsys.readouterr().out


def test_overwrite_replaces_an_existing_out(cases_dir, data, tmp_path, tiny_config):
    out = tmp_path / "model.pth"
    out.write_bytes(b"an old model")
    assert run_command("train", cases_dir, data, out, "--config", str(tiny_config), "--overwrite") == 0
    assert load_model(out).image_encoder.pos_embed.shape[-1] == TINY.encoder_embed_dim


def test_fine_tuning_never_writes_over_its_starting_checkpoint_or_its_data(cases_dir, data, tmp_path):
    source = tmp_path / "source.pth"
    Trainer(tiny_model(), data, tiny_options(), source).save(source)
    original = source.read_bytes()
    for extra in ([], ["--overwrite"]):
        with pytest.raises(InputError, match="one of the input files"):
            run_command("finetune", cases_dir, data, source, "--checkpoint", str(source), *extra)
    assert source.read_bytes() == original
    image = sorted(cases_dir.glob("*/image.nii.gz"))[0]
    image_bytes = image.read_bytes()
    for command, options in (("train", []), ("finetune", ["--checkpoint", str(source)])):
        with pytest.raises(InputError, match="one of the input files"):
            run_command(command, cases_dir, data, image, *options, "--overwrite")
    assert image.read_bytes() == image_bytes


@pytest.mark.parametrize(
    "out, options, message",
    [
        ("model.nii.gz", [], "is a checkpoint: give it a .pth or .pt name"),
        ("model.pth", ["--threads", "0"], "--threads"),
    ],
)
def test_a_checkpoint_name_or_thread_count_that_makes_no_sense_is_refused(
    cases_dir, data, tmp_path, out, options, message
):
    with pytest.raises(InputError, match=re.escape(message)):
        run_command("train", cases_dir, data, tmp_path / out, *options)
    assert not (tmp_path / out).exists()


def test_an_image_as_training_data_or_as_cache_folder_is_refused_saying_what_is_wanted(cases_dir, data, tmp_path):
    image = sorted(cases_dir.glob("*/image.nii.gz"))[0]
    with pytest.raises(InputError, match="is a file but not a .csv or .json manifest"):
        find_cases(image)
    args = parser().parse_args(["train", str(cases_dir), "--out", str(tmp_path / "m.pth"), "--cache", str(image)])
    with pytest.raises(InputError, match="is a file, not a folder"):
        args.func(args)
    assert not (tmp_path / "m.pth").exists()


def test_resuming_a_finished_run_writes_it_to_the_new_out_and_resumes_in_place(cases_dir, data, tmp_path, capsys):
    finished = tmp_path / "finished.pth"
    trainer = Trainer(tiny_model(), data, tiny_options(steps=1), finished)
    trainer.run()
    new = tmp_path / "new.pth"
    assert command_line("train", cases_dir, data, new, "--resume", str(finished)) == 0
    assert "has done all 1 of its steps: nothing to train (give a larger --steps" in capsys.readouterr().out
    with pytest.raises(InputError, match="the resumed checkpoint fixes the architecture"):
        run_command("train", cases_dir, data, tmp_path / "other.pth", "--resume", str(finished), "--config", "small")
    message = "--checkpoint base.pth with --resume: the resumed checkpoint holds the weights to go on from"
    with pytest.raises(InputError, match=re.escape(message)):
        command_line("finetune", cases_dir, data, new, "--resume", str(finished), "--checkpoint", "base.pth")
    assert "Preparing" not in capsys.readouterr().out
    assert read_training_checkpoint(new)["step"] == 1
    written = load_model(new).state_dict()
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(written[name], value)
    assert run_command("train", cases_dir, data, finished, "--resume", str(finished), "--steps", "2") == 0
    assert read_training_checkpoint(finished)["step"] == 2  # in place: no --overwrite needed


def test_a_malformed_or_misspelt_config_file_is_refused_before_any_case_is_prepared(cases_dir, data, tmp_path, capsys):
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"encoder_depth": 2,')
    with pytest.raises(InputError, match=re.escape(f"--config {malformed} cannot be read as JSON")):
        train_command.read_config(str(malformed))
    misspelt = tmp_path / "misspelt.json"
    misspelt.write_text(json.dumps({**TINY.to_dict(), "encoder_dept": 2}))
    with pytest.raises(InputError, match=f"{re.escape(str(misspelt))} has unknown keys encoder_dept;.*encoder_depth"):
        run_command("train", cases_dir, data, tmp_path / "model.pth", "--config", str(misspelt))
    assert "Preparing" not in capsys.readouterr().out
    assert not (tmp_path / "model.pth").exists()


def test_a_resumed_run_refuses_typed_options_that_differ_from_its_own(cases_dir, data, tmp_path, capsys):
    run = tmp_path / "run.pth"
    Trainer(tiny_model(), data, tiny_options(steps=1), run).run()
    written = run.read_bytes()
    changed = ["--lr-encoder", "0.01", "--seed", "3", "--first-click-multimask", "--min-voxels", "20"]
    with pytest.raises(InputError) as error:
        command_line("train", cases_dir, data, run, "--resume", str(run), "--steps", "2", *changed)
    message = str(error.value)
    for change in ("--lr-encoder 0.01 (run.pth: 0.001)", "--seed 3 (run.pth: 0)", "--first-click-multimask True"):
        assert change in message
    assert "--min-voxels" not in message  # the same value as the run's is no change
    assert f"fine-tune from {run} as a new run" in message
    assert run.read_bytes() == written and "Preparing" not in capsys.readouterr().out
    same = ["--lr-encoder", "0.001", "--clicks-per-sample", "2"]
    assert command_line("train", cases_dir, data, run, "--resume", str(run), "--steps", "2", *same) == 0
    content = read_training_checkpoint(run)
    assert content["step"] == 2 and content["training_options"]["lr_encoder"] == 1e-3


def test_a_resumed_run_may_split_its_regions_per_step_otherwise_but_not_change_their_number(cases_dir, data, tmp_path):
    """After running out of memory: --batch-size 1 --accumulation 2 takes a step's two regions one at a time."""
    run = tmp_path / "run.pth"
    Trainer(tiny_model(), data, tiny_options(steps=1, batch_size=2), run).run()
    with pytest.raises(InputError, match=r"--batch-size 1 \(run.pth: 2\)"):
        command_line("train", cases_dir, data, run, "--resume", str(run), "--steps", "2", "--batch-size", "1")
    split = ["--batch-size", "1", "--accumulation", "2"]
    assert command_line("train", cases_dir, data, run, "--resume", str(run), "--steps", "2", *split) == 0
    options = read_training_checkpoint(run)["training_options"]
    assert (options["batch_size"], options["accumulation"], read_training_checkpoint(run)["step"]) == (1, 2, 2)


def test_a_resumed_run_goes_on_with_the_recipe_it_was_started_with(cases_dir, data, tmp_path, tiny_config, monkeypatch):
    recipe = ["--config", str(tiny_config), "--steps", "3", "--seed", "7", "--loss", "dice", "--jitter", "4"]
    recipe += ["--clicks-per-sample", "3", "--click-centre-probability", "0.5", "--warmup-steps", "1"]
    recipe += ["--min-voxels", "20", "--lr-encoder", "1e-3"]
    straight, part = tmp_path / "straight.pth", tmp_path / "part.pth"
    assert command_line("train", cases_dir, data, straight, *recipe) == 0
    finished = Trainer.train_step

    def interrupted_after_two_steps(self):
        if self.state.step == 2:
            raise KeyboardInterrupt
        return finished(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted_after_two_steps)
    assert command_line("train", cases_dir, data, part, *recipe) == 130
    monkeypatch.undo()
    assert command_line("train", cases_dir, data, part, "--resume", str(part)) == 0  # as the message says
    expected, resumed = read_training_checkpoint(straight), read_training_checkpoint(part)
    assert resumed["training_options"] == expected["training_options"]
    assert resumed["step"] == 3 and resumed["losses"] == pytest.approx(expected["losses"])
    for name, value in expected["model_state_dict"].items():
        torch.testing.assert_close(resumed["model_state_dict"][name], value)


def test_resuming_with_steps_done_already_is_refused_before_any_work(cases_dir, data, tmp_path, capsys):
    run = tmp_path / "run.pth"
    trainer = Trainer(tiny_model(), data, tiny_options(steps=10), run)
    for _ in range(3):
        trainer.train_step()
    trainer.save(run)
    written = run.read_bytes()
    for steps in ("2", "3"):
        message = (
            "--steps is the run's total; run.pth has done 3 of its 10 steps; give more than 3, or leave --steps out"
        )
        with pytest.raises(InputError, match=re.escape(message)):
            command_line("train", cases_dir, data, run, "--resume", str(run), "--steps", steps)
    assert "Preparing" not in capsys.readouterr().out
    with pytest.raises(InputError, match=r"--epochs 0.01 makes 1 steps in all; run.pth has done 3 of its 10 steps"):
        command_line("train", cases_dir, data, run, "--resume", str(run), "--epochs", "0.01")
    assert run.read_bytes() == written


# Warm-up 1 step, base rate 1e-3; of 4 steps, step 4 trains at cosine 0.25 or at 0.1 (past 60 %); spread over
# 7 steps, step 5 is halfway: cosine 0.5, and multistep back to the full rate.
@pytest.mark.parametrize(
    "schedule, last_rate, next_rate", [("cosine", "2.50e-04", "5.00e-04"), ("multistep", "1.00e-04", "1.00e-03")]
)
def test_a_longer_resumed_run_spreads_its_schedule_and_says_how_the_rate_changes(
    cases_dir, data, tmp_path, capsys, schedule, last_rate, next_rate
):
    run = tmp_path / "run.pth"
    rates = []
    Trainer(tiny_model(), data, tiny_options(steps=4, schedule=schedule), run).run(lambda *shown: rates.append(shown))
    assert f"{rates[-1][3]:.2e}" == last_rate  # as the progress line showed step 4
    assert command_line("train", cases_dir, data, tmp_path / "longer.pth", "--resume", str(run), "--steps", "7") == 0
    assert (
        "The learning-rate schedule of run.pth is spread over 7 steps instead of 4: step 4 trained at a learning "
        f"rate of {last_rate}, step 5 trains at {next_rate}."
    ) in capsys.readouterr().out
    longer = Trainer(model_for_training(resume=run), data, tiny_options(), tmp_path / "longer.pth")
    longer.resume(run, steps=7)
    assert [group["lr"] for group in longer.optimizer.param_groups] == pytest.approx([float(next_rate)] * 3)


def test_a_damaged_cached_case_is_prepared_again(cases_dir, tmp_path):
    cache = CaseCache(tmp_path / "cache")
    (files,) = find_cases(cases_dir)
    prepared = cache.summary(files)
    cache.path_for(files).write_bytes(b"cut off")
    again = CaseCache(tmp_path / "cache").load(files)
    np.testing.assert_array_equal(again.targets, prepared.targets)
    np.testing.assert_array_equal(again.raw, prepared.raw)


def test_a_cached_case_scrambled_inside_its_compressed_data_is_prepared_again(cases_dir, tmp_path):
    cache = CaseCache(tmp_path / "cache")
    (files,) = find_cases(cases_dir)
    prepared = cache.summary(files)
    path = cache.path_for(files)
    with zipfile.ZipFile(path) as archive:
        member = archive.getinfo("raw.npy")
    scrambled = bytearray(path.read_bytes())
    header = member.header_offset
    name_length, extra_length = np.frombuffer(bytes(scrambled[header + 26 : header + 30]), dtype="<u2")
    scrambled[header + 30 + name_length + extra_length] = 0xFF  # a deflate block of the reserved type: zlib.error
    path.write_bytes(bytes(scrambled))
    again = CaseCache(tmp_path / "cache").load(files)
    np.testing.assert_array_equal(again.raw, prepared.raw)


def failing_after(trainer: Trainer, steps: int, error: BaseException):
    """The trainer's train_step, raising `error` instead of the step after `steps` finished steps."""
    finished = trainer.train_step

    def step_or_fail():
        if trainer.state.step == steps:
            raise error
        return finished()

    return step_or_fail


def test_an_interrupted_run_saves_its_last_step(data, tmp_path, monkeypatch):
    trainer = Trainer(tiny_model(), data, tiny_options(steps=5, checkpoint_every=100), tmp_path / "run.pth")
    monkeypatch.setattr(trainer, "train_step", failing_after(trainer, 2, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert read_training_checkpoint(tmp_path / "run.pth")["step"] == 2


def test_a_ctrl_c_during_the_update_lands_after_it_and_saves_that_step(data, tmp_path, monkeypatch):
    trainer = Trainer(tiny_model(), data, tiny_options(steps=5, checkpoint_every=100), tmp_path / "run.pth")
    scaler_update = trainer.scaler.update

    def interrupted_mid_update():  # the weights have changed; the schedule and the step count not yet
        signal.raise_signal(signal.SIGINT)
        scaler_update()

    monkeypatch.setattr(trainer.scaler, "update", interrupted_mid_update)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    saved = read_training_checkpoint(tmp_path / "run.pth")
    assert saved["step"] == trainer.state.step == 1 and len(saved["losses"]) == 1
    assert saved["lr_scheduler_state_dict"]["last_epoch"] == 1
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(saved["model_state_dict"][name], value), name
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_during_the_save_waits_for_it_and_the_message_names_the_step_written(
    cases_dir, data, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run.pth"
    finished, save_checkpoint_whole = Trainer.train_step, training.save_checkpoint

    def first_ctrl_c_at_step_4(self):
        if self.state.step == 3:
            signal.raise_signal(signal.SIGINT)
        return finished(self)

    def second_ctrl_c_while_saving_step_3(path, model, **state):
        if state["step"] == 3:
            signal.raise_signal(signal.SIGINT)
        return save_checkpoint_whole(path, model, **state)

    monkeypatch.setattr(Trainer, "train_step", first_ctrl_c_at_step_4)
    monkeypatch.setattr(training, "save_checkpoint", second_ctrl_c_while_saving_step_3)
    assert run_command("train", cases_dir, data, run, "--steps", "10", "--checkpoint-every", "2") == 130
    assert read_training_checkpoint(run)["step"] == 3
    assert f"Interrupted: step 3 is saved in {run}" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 16777216 bytes"),
    ],
)
def test_out_of_memory_says_what_the_checkpoint_holds_and_what_to_change(data, tmp_path, monkeypatch, error):
    trainer = Trainer(tiny_model(), data, tiny_options(steps=5), tmp_path / "run.pth")
    monkeypatch.setattr(trainer, "train_step", failing_after(trainer, 1, error))  # out of memory in step 2
    message = (
        f"Out of memory in step 2 on cpu ({tmp_path / 'run.pth'} holds step 1): give a lower --batch-size with a "
        "higher --accumulation (the same regions per step), or fewer --clicks-per-sample."
    )
    with pytest.raises(SAMMed3DError, match=re.escape(message)):
        trainer.run()

    def a_bug():
        raise RuntimeError("a bug")

    monkeypatch.setattr(trainer, "train_step", a_bug)
    with pytest.raises(RuntimeError, match="a bug"):  # any other error is left as it is
        trainer.run()


def test_interrupts_are_not_held_off_the_main_thread():
    def off_main_thread():
        with interrupts_deferred():
            outcome.append(signal.getsignal(signal.SIGINT))

    outcome = []
    worker = threading.Thread(target=off_main_thread)
    worker.start()
    worker.join()
    assert outcome == [signal.default_int_handler]


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as the progress line draws differently there."""

    def isatty(self) -> bool:
        return True


def test_the_progress_line_on_a_terminal_leaves_nothing_of_a_longer_line_before_it():
    stream = Terminal()
    progress = ProgressLine(100, stream=stream)
    progress.started = time.monotonic() - 10.5
    progress(60, 1.2345, 0.5, 4e-4)  # "... 10.50 s/step  0.2 min"
    progress.started = time.monotonic() - 19.0
    progress(61, 1.2345, 0.5, 4e-4)  # "... 9.50 s/step  0.3 min": one character shorter
    screen = ""
    for line in stream.getvalue().split("\r")[1:]:  # what a terminal shows after each carriage return
        screen = line + screen[len(line) :]
    assert screen.rstrip() == "step 61/100  loss 1.2345  dice 0.500  lr 4.00e-04  9.50 s/step  0.3 min"


def test_epochs_of_a_resumed_run_are_counted_with_the_batch_it_keeps(data, tmp_path):
    run = tmp_path / "run.pth"
    Trainer(tiny_model(), data, tiny_options(steps=1, batch_size=1), run).save(run)
    resumed = Trainer(tiny_model(), data, tiny_options(steps=1, batch_size=4), tmp_path / "next.pth")
    resumed.resume(run, epochs=2)
    assert resumed.options.batch_size == 1 and resumed.options.steps == 2 * len(data.targets)


def test_resuming_without_steps_goes_on_to_the_runs_own_end(cases_dir, data, tmp_path):
    run = tmp_path / "run.pth"
    trainer = Trainer(tiny_model(), data, tiny_options(steps=3), run)
    trainer.train_step()
    trainer.save(run)
    arguments = ["train", str(cases_dir), "--out", str(run), "--resume", str(run), "--cache", str(data.cache.folder)]
    args = parser().parse_args([*arguments, "--min-voxels", "20", "--clicks-per-sample", "2", "--threads", "1"])
    assert args.func(args) == 0
    assert read_training_checkpoint(run)["step"] == 3  # not the default 1,000


# ------------------------------------------------------------------------------------------- review


@pytest.fixture(autouse=True)
def _itk_threads_restored():
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)  # the commands set it from --threads


def test_a_resumed_run_shows_and_records_what_the_uninterrupted_run_does(data, tmp_path):
    straight, shown_straight = Trainer(tiny_model(), data, tiny_options(steps=5), tmp_path / "s.pth"), []
    straight.run(lambda *shown: shown_straight.append(shown))
    part = Trainer(tiny_model(), data, tiny_options(steps=5), tmp_path / "p.pth")
    part.train_step = failing_after(part, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        part.run()
    resumed, shown_resumed = Trainer(tiny_model(), data, tiny_options(steps=5), tmp_path / "p.pth"), []
    resumed.resume(tmp_path / "p.pth")
    resumed.run(lambda *shown: shown_resumed.append(shown))
    assert shown_resumed == shown_straight[3:]  # the smoothed loss and Dice go on, not start again
    expected, written = read_training_checkpoint(tmp_path / "s.pth"), read_training_checkpoint(tmp_path / "p.pth")
    assert written["losses"] == expected["losses"]
    assert (written["best_loss"], written["best_dice"]) == (expected["best_loss"], expected["best_dice"])


def test_a_resumed_run_keeps_its_checkpoint_interval_unless_given_another(cases_dir, data, tmp_path, tiny_config):
    run = tmp_path / "run.pth"
    assert run_command("train", cases_dir, data, run, "--config", str(tiny_config), "--checkpoint-every", "7") == 0
    assert command_line("train", cases_dir, data, run, "--resume", str(run), "--steps", "2") == 0
    assert read_training_checkpoint(run)["training_options"]["checkpoint_every"] == 7  # not the default 100
    given = ["--steps", "3", "--checkpoint-every", "5"]
    assert command_line("train", cases_dir, data, run, "--resume", str(run), *given) == 0
    assert read_training_checkpoint(run)["training_options"]["checkpoint_every"] == 5


def test_fine_tuning_never_writes_over_the_demo_model_or_a_downloaded_checkpoint(
    cases_dir, data, tmp_path, monkeypatch
):
    from SAMMed3DLib import published

    demo = tmp_path / "demo" / "sammed3d_demo.pth"  # a stand-in: the test must not risk the real one
    demo.parent.mkdir()
    save_checkpoint(demo, tiny_model())
    monkeypatch.setattr(published, "DEMO_CHECKPOINT", demo)
    monkeypatch.setenv("SAMMED3D_CACHE_DIR", str(tmp_path / "downloads"))
    downloaded = tmp_path / "downloads" / published.PUBLISHED_CHECKPOINTS["turbo"].filename
    downloaded.parent.mkdir()
    save_checkpoint(downloaded, tiny_model(1))
    for out, options in ((demo, []), (downloaded, ["--checkpoint", "turbo"])):
        written = out.read_bytes()
        with pytest.raises(InputError, match="one of the input files"):
            run_command("finetune", cases_dir, data, out, *options, "--overwrite")
        assert out.read_bytes() == written


def test_threads_default_to_the_usable_cpus_and_limit_the_case_preparation_too(
    cases_dir, data, tmp_path, tiny_config, monkeypatch
):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # a cluster job's 2 of 64
    assert parser().parse_args(["train", "cases", "--out", "m.pth"]).threads == 2
    monkeypatch.undo()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    assert run_command("train", cases_dir, data, tmp_path / "m.pth", "--config", str(tiny_config)) == 0
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1  # --threads 1, as SimpleITK resamples


def test_a_case_folder_in_another_format_is_refused_not_left_out(cases_dir, tmp_path):
    (files,) = find_cases(cases_dir)
    for name, suffix in (("a", ".nii.gz"), ("b", ".nii")):
        (tmp_path / name).mkdir()
        for source, stem in ((files.image, "image"), (files.label, "label")):
            sitk.WriteImage(sitk.ReadImage(str(source)), str(tmp_path / name / f"{stem}{suffix}"))
    with pytest.raises(InputError, match=r"b has image.nii, label.nii, but a case folder holds image.nii.gz"):
        find_cases(tmp_path)


def test_the_progress_line_on_a_terminal_adds_no_blank_line_when_nothing_was_trained():
    stream = Terminal()
    progress = ProgressLine(3, stream=stream)
    progress.finish()  # a resumed run that had done all its steps
    assert stream.getvalue() == ""
    progress(3, 1.0, 0.5, 1e-4)
    progress.finish()
    assert stream.getvalue().startswith("\rstep 3/3") and stream.getvalue().endswith(" min\n")
