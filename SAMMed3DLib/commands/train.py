"""`sammed3d train` (from scratch) and `sammed3d finetune` (from a checkpoint): the official training recipe."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import SimpleITK as sitk
import torch

from .. import published
from ..atomic import check_output_folder, check_output_path
from ..checkpoint import model_from_checkpoint
from ..config import ModelConfig
from ..device import DEVICE_CHOICES, resolve_device
from ..errors import InputError, SAMMed3DError
from ..published import CACHE_DIR_VARIABLE, PUBLISHED_CHECKPOINTS, cache_dir, resolve_checkpoint
from ..training import (
    LOSSES,
    CaseCache,
    CaseFiles,
    ProgressLine,
    Trainer,
    TrainingData,
    TrainingOptions,
    check_resumed_total,
    find_cases,
    model_for_training,
    read_training_checkpoint,
    resumed_options,
    steps_for_epochs,
)
from .common import add_overwrite_option, download_progress, seed_argument

CHECKPOINT_SUFFIXES = (".pth", ".pt")
# Named architectures for training from scratch; "small" is the built-in demo model's.
CONFIGS = {
    "default": ModelConfig(),
    "small": ModelConfig(
        encoder_embed_dim=128,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3),
        window_size=4,
        prompt_embed_dim=96,
        decoder_mlp_dim=512,
    ),
}
# Steps between checkpoints of a new run (a resumed run keeps its own unless --checkpoint-every is given).
CHECKPOINT_EVERY = 100
# Under the per-user cache (not a shared temporary folder): prepared cases are copies of the user's scans.
PREPARED_CASES_FOLDER = "prepared-cases"
# Options of the training recipe (TrainingOptions fields). They default to None, so that a resumed run can tell
# the typed ones from the rest; options_from_args fills in the defaults.
RECIPE_OPTIONS = (
    "lr_encoder",
    "lr_decoder",
    "weight_decay",
    "schedule",
    "warmup_steps",
    "batch_size",
    "accumulation",
    "clicks_per_sample",
    "min_voxels",
    "jitter",
    "click_centre_probability",
    "first_click_multimask",
    "iou_loss_weight",
    "loss",
    "seed",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a SAM-Med3D model from scratch on your cases",
        description="Train from scratch with the official recipe (simulated clicks, DiceCE loss, AdamW). The default "
        "learning rates (4e-4 for both groups) are those the small demo model was trained with; the official "
        "ones are 8e-4 (encoder) and 8e-5 (decoder).",
    )
    _add_common_options(train, lr_encoder=4e-4, lr_decoder=4e-4)
    train.add_argument(
        "--config",
        help=f"architecture: {', '.join(CONFIGS)} or a JSON file of ModelConfig fields (default small; a resumed "
        "run keeps its own)",
    )
    train.set_defaults(func=run, checkpoint=None)

    finetune = subparsers.add_parser(
        "finetune",
        help="fine-tune a SAM-Med3D checkpoint on your cases",
        description="Continue training a checkpoint's weights with the official recipe on your own data. The default "
        "learning rates are the official ones (8e-4 encoder, 8e-5 decoder), which go with 240 regions per "
        "optimiser step (batch 12 x accumulation 20); with far fewer, as on one GPU or a CPU, the step is much "
        "noisier: raise --accumulation or lower the learning rates to keep the starting weights' skill.",
    )
    _add_common_options(finetune, lr_encoder=8e-4, lr_decoder=8e-5)
    finetune.add_argument(
        "--checkpoint",
        help=f"checkpoint file or published name ({', '.join(PUBLISHED_CHECKPOINTS)}) to start from; "
        "default: the built-in demo model",
    )
    finetune.set_defaults(func=run, config=None)


def _add_common_options(parser: argparse.ArgumentParser, lr_encoder: float, lr_decoder: float) -> None:
    parser.add_argument("data", type=Path, help="folder of cases (*/image.nii.gz, */label.nii.gz) or CSV/JSON manifest")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint file to write (rewritten as it trains)")
    add_overwrite_option(parser)
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=int, help="optimiser steps in all (default 1000; a resumed run: the total it was started with)"
    )
    length.add_argument("--epochs", type=float, help="passes over all targets, instead of --steps")
    # The defaults in the help are filled in by options_from_args (see RECIPE_OPTIONS).
    parser.set_defaults(recipe_defaults={"lr_encoder": lr_encoder, "lr_decoder": lr_decoder})
    parser.add_argument("--lr-encoder", type=float, help=f"image-encoder learning rate ({lr_encoder:g})")
    parser.add_argument("--lr-decoder", type=float, help=f"prompt-encoder and decoder learning rate ({lr_decoder:g})")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.1)")
    parser.add_argument("--schedule", choices=("cosine", "multistep"), help="learning-rate decay (cosine)")
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up steps (50)")
    parser.add_argument("--batch-size", type=int, help="regions per forward pass (1)")
    parser.add_argument("--accumulation", type=int, help="forward passes per optimiser step (1)")
    parser.add_argument(
        "--clicks-per-sample", type=int, help="interaction steps per region, 2 or more (6; official 11)"
    )
    parser.add_argument(
        "--min-voxels", type=int, help="smallest target at 1.5 mm, in voxels (1001; official: more than 1000)"
    )
    parser.add_argument("--jitter", type=int, help="random shift of the region centre, voxels (16)")
    parser.add_argument(
        "--click-centre-probability",
        type=float,
        help="fraction of regions centred on their first click, as interactive sessions centre them "
        "(not in the official recipe; 0)",
    )
    parser.add_argument(
        "--first-click-multimask",
        action="store_true",
        default=None,
        help="train SAM's three alternative masks for a lone first click; at inference the image's evidence "
        "picks one, or the predicted IoU where the image is not at hand (not in the official recipe; the "
        "checkpoint records it)",
    )
    parser.add_argument(
        "--iou-loss-weight",
        type=float,
        help="weight of the alternative masks' IoU-prediction error in the loss (1; SAM: 1)",
    )
    parser.add_argument(
        "--loss",
        choices=tuple(LOSSES),
        help="dicece (default): squared-prediction Dice plus BCE, as the official script computes with MONAI 1.3 or "
        "later; dice: the Dice term alone, what the 2023 official training computed (MONAI 1.2.0)",
    )
    parser.add_argument("--seed", type=seed_argument, help="random seed (0)")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        help=f"write the checkpoint every N steps ({CHECKPOINT_EVERY}; a resumed run: its own)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help=f"prepared-case cache folder (default: {PREPARED_CASES_FOLDER} in the per-user cache, "
        f"${CACHE_DIR_VARIABLE}, else $XDG_CACHE_HOME/sammed3d or ~/.cache/sammed3d; yours alone, safe to delete)",
    )
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="where to train")
    parser.add_argument(
        "--resume",
        type=Path,
        help="continue a run from the checkpoint it wrote, with the options it was started with (a larger --steps "
        "lengthens it)",
    )
    parser.add_argument(
        "--threads", type=int, default=usable_cpus(), help="CPU threads (default: all; fewer on a busy machine)"
    )


def usable_cpus() -> int:
    """The CPUs this process may run on: a cluster job's share of the machine, not all of the machine's CPUs
    (os.cpu_count), which would oversubscribe them."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def read_config(name: str) -> ModelConfig:
    if name in CONFIGS:
        return CONFIGS[name]
    path = Path(name)
    if not path.is_file():
        raise InputError(f"--config {name} is neither {' nor '.join(CONFIGS)} nor a JSON file; fix the option.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        raise InputError(f"--config {path} cannot be read as JSON ({error}); fix the file.") from error
    return ModelConfig.from_dict(data, source=f"--config {path}")


def check_outputs(args: argparse.Namespace, cases: list[CaseFiles]) -> None:
    """Refuse an --out whose writing would lose data, before any work: never the data (manifest, images,
    labels) nor the checkpoint fine-tuning starts from; an existing file needs --overwrite, except the --resume
    file itself, since resuming in place is the normal use. The --cache folder must be one it can write."""
    inputs = [args.data, *(case.image for case in cases), *(case.label for case in cases)]
    if args.command == "finetune":  # found without downloading it
        inputs.append(published.checkpoint_file(args.checkpoint))
    resuming_in_place = args.resume is not None and args.out.resolve() == args.resume.resolve()
    check_output_path(args.out, inputs=inputs, overwrite=args.overwrite or resuming_in_place)
    check_output_folder(args.cache)
    if args.out.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise InputError(f"--out {args.out} is a checkpoint: give it a {' or '.join(CHECKPOINT_SUFFIXES)} name.")


def refuse_a_new_model_with_resume(args: argparse.Namespace) -> None:
    """--config and --checkpoint choose the model of a new run; a resumed run goes on with its own."""
    if args.resume is None:
        return
    if args.config:
        raise InputError(
            f"--config {args.config} with --resume: the resumed checkpoint fixes the architecture; drop --config."
        )
    if args.checkpoint:
        raise InputError(
            f"--checkpoint {args.checkpoint} with --resume: the resumed checkpoint holds the weights to go on from; "
            "drop --checkpoint, or drop --resume to fine-tune from it as a new run."
        )


def starting_checkpoint(args: argparse.Namespace) -> Path | None:
    """The weights fine-tuning starts from: a file, a published name (downloaded once) or, left out, the demo
    model; None when training from scratch."""
    if args.command != "finetune":
        return None
    with download_progress(args.checkpoint) as progress:
        return resolve_checkpoint(args.checkpoint, progress=progress)


def typed_recipe(args: argparse.Namespace) -> dict[str, object]:
    """The recipe options given on the command line, by TrainingOptions name."""
    return {name: getattr(args, name) for name in RECIPE_OPTIONS if getattr(args, name) is not None}


def options_from_args(args: argparse.Namespace) -> TrainingOptions:
    """Training options from the command line, checked before any case is read (--epochs sets steps later)."""
    if args.epochs is not None and args.epochs <= 0:
        raise InputError(f"--epochs is {args.epochs}; give a number of passes above 0.")
    if args.threads < 1:
        raise InputError(f"--threads is {args.threads}; give 1 or more CPU threads.")
    return TrainingOptions(
        steps=args.steps if args.steps is not None else 1000,
        checkpoint_every=args.checkpoint_every if args.checkpoint_every is not None else CHECKPOINT_EVERY,
        device=str(resolve_device(args.device)),
        **{**args.recipe_defaults, **typed_recipe(args)},
    )


def options_to_resume(args: argparse.Namespace, options: TrainingOptions, content: dict) -> TrainingOptions:
    """The options of the run --resume names; refused, before any work, when a typed option differs from them
    or --steps asks for no more than the steps done."""
    stored = content.get("training_options") or {}
    name = args.resume.name
    resumed = resumed_options(options, stored)
    changed = [
        f"--{option.replace('_', '-')} {value} ({name}: {getattr(resumed, option)})"
        for option, value in typed_recipe(args).items()
        if value != getattr(resumed, option)
    ]
    if changed:
        raise InputError(
            f"--resume {name} goes on with the options its run was started with, and these differ from them: "
            f"{', '.join(changed)}. Leave them out to resume, or fine-tune from {args.resume} as a new run "
            f"(finetune --checkpoint {args.resume}) to train with them."
        )
    if args.steps is not None:
        check_resumed_total(args.resume, int(content["step"]), int(stored.get("steps", args.steps)), args.steps)
    if args.checkpoint_every is None and "checkpoint_every" in stored:  # not typed: the run's own, not the default
        resumed = replace(resumed, checkpoint_every=int(stored["checkpoint_every"]))
    return resumed


def interruption_message(saved_step: int | None, out: Path) -> str:
    """What an interrupted run left in `out`: what was written, not what was meant to be."""
    if saved_step is None:
        return f"Interrupted before this run wrote {out}."
    return f"Interrupted: step {saved_step} is saved in {out}; go on with --resume {out}."


def run(args: argparse.Namespace) -> int:
    refuse_a_new_model_with_resume(args)
    options = options_from_args(args)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)  # preparing the cases resamples with ITK
    cases = find_cases(args.data)
    if args.cache is None:
        args.cache = cache_dir() / PREPARED_CASES_FOLDER
    check_outputs(args, cases)
    # Model before data: a bad --config, checkpoint or resumed option fails before the (slow) preparation of the cases.
    content = None
    if args.resume is not None:
        content = read_training_checkpoint(args.resume)
        options = options_to_resume(args, options, content)
        model = model_from_checkpoint(content, args.resume)
    else:
        config = read_config(args.config or "small") if args.command == "train" else None
        model = model_for_training(config=config, checkpoint=starting_checkpoint(args), seed=options.seed)
    print(f"Preparing {len(cases)} case(s) (cached in {args.cache}) ...", flush=True)
    data = TrainingData(cases, CaseCache(args.cache), min_voxels=options.min_voxels)
    if args.epochs is not None and content is None:
        options = replace(options, steps=steps_for_epochs(args.epochs, len(data.targets), options))
    trainer = Trainer(model, data, options, args.out)
    if content is not None:
        schedule_note = trainer.resume(args.resume, steps=args.steps, epochs=args.epochs, content=content)
        if schedule_note:
            print(schedule_note, flush=True)
        options = trainer.options
        if trainer.state.step >= options.steps:
            print(
                f"{args.resume} has done all {options.steps} of its steps: nothing to train (give a larger --steps "
                "to go on).",
                flush=True,
            )
    print(
        f"{len(data.targets)} targets; training {options.steps} steps on {options.device} "
        f"from step {trainer.state.step}; checkpoint: {args.out}",
        flush=True,
    )
    progress = ProgressLine(options.steps)
    try:
        trainer.run(progress)
    except KeyboardInterrupt:
        progress.finish()
        print(interruption_message(trainer.saved_step, args.out))
        return 130
    except SAMMed3DError:
        progress.finish()  # the error goes on a line of its own
        raise
    progress.finish()
    print(f"Done: {args.out}")
    return 0
