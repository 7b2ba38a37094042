"""Loading SAM-Med3D checkpoints safely and strictly.

Accepted layouts: the official training-checkpoint dict (weights under `model_state_dict`), a bare
state dict, and either with every key prefixed by `module.` (saved from a DataParallel wrapper).
Files are read with `torch.load(weights_only=True)`; the few harmless classes that official files
pickle beside the weights are allowed by name, and nothing else is ever unpickled.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pickle
import re
import zipfile
import zlib
from pathlib import Path
from typing import Mapping, Union

import torch

from .atomic import atomic_destination
from .config import build_model, config_from_state_dict
from .errors import CheckpointError
from .modeling import Sam3D
from .torch_version import require_supported_torch

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# Objects that official or common training scripts pickle next to the weights (the `args` namespace,
# NumPy scalars such as a best Dice). They carry data only; anything else is refused.
ALLOWED_GLOBALS = (
    "argparse.Namespace",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
)
ALLOWED_DTYPE_MODULE = "numpy.dtypes."

# What a pickled NumPy array asks for. Refused all the same (not on the allow-list), but named with the way out.
NUMPY_ARRAY_GLOBALS = frozenset(
    {"numpy.ndarray", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
)

# CVPR-2025 checkpoints add box-corner embeddings that the main model does not use.
TOLERATED_EXTRA_KEYS = ("prompt_encoder.point_embeddings.2.weight", "prompt_encoder.point_embeddings.3.weight")

# Top-level flag of checkpoints trained with alternative masks for a lone first click (see Sam3D); other
# SAM-Med3D tools read only `model_state_dict` and ignore it.
FIRST_CLICK_MULTIMASK_KEY = "first_click_multimask"

# How a Git LFS pointer file begins: what a repository cloned without Git LFS holds in place of the weights.
GIT_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu") -> Sam3D:
    """Build the network described by a checkpoint file, load its weights strictly, eval mode."""
    return model_from_checkpoint(read_checkpoint_file(path), path).to(device)


def model_from_checkpoint(content: object, path: PathLike) -> Sam3D:
    """The network of a checkpoint file's loaded content, with the alternative-masks flag it records."""
    model = model_from_state_dict(_state_dict_of(content, Path(path)), source=str(path))
    model.first_click_multimask = isinstance(content, Mapping) and content.get(FIRST_CLICK_MULTIMASK_KEY) is True
    return model


def model_from_state_dict(state: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> Sam3D:
    """A model whose configuration is read from `state`, with `state` loaded strictly."""
    state = dict(state)
    extras = [key for key in TOLERATED_EXTRA_KEYS if key in state]
    if extras:
        log.info("Ignoring box-prompt embeddings %s of %s (boxes are not used).", ", ".join(extras), source)
        for key in extras:
            del state[key]
    config = config_from_state_dict(state)
    model = build_model(config)
    _check_keys(model, state, source)
    model.load_state_dict(state, strict=True)
    return model.eval()


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint file, whichever accepted layout it has."""
    return _state_dict_of(read_checkpoint_file(path), Path(path))


def read_checkpoint_file(path: PathLike) -> object:
    """What a checkpoint file holds, unpickled weights-only (no code runs); a broken file is a CheckpointError."""
    require_supported_torch()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} does not exist: check the path or pick another file.")
    _check_record_checksums(path)
    return _safe_torch_load(path)


def _check_record_checksums(path: Path) -> None:
    """Refuse a zip checkpoint whose records fail their CRC-32: torch.load does not check them, so a flipped
    bit in the weights would load silently (about 0.2 s per 400 MB). A zip that torch.save did not write (the
    archive a checkpoint was packed into, encrypted or compressed in ways PyTorch never uses) is named as such."""
    if not zipfile.is_zipfile(path):  # the legacy pickle format carries no checksums; torch.load judges it
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):  # a broken archive is reported by torch.load's own error
        return
    except NotImplementedError as error:  # e.g. Deflate64 (Windows zips big files so); a RuntimeError, so first
        raise _packed_archive(path, f"a zip archive packed in a way PyTorch never writes ({error})") from error
    except RuntimeError as error:  # zipfile's word for an encrypted record
        raise _packed_archive(path, "a password-protected zip archive") from error
    except zlib.error as error:
        raise CheckpointError(
            f"{path} is damaged: a compressed record in it cannot be unpacked ({error}); use a whole copy "
            "(download or copy it again)."
        ) from error
    if damaged is not None:
        raise CheckpointError(
            f"{path} is damaged: its record {damaged} fails its checksum (changed on disk or in a copy); "
            "use a whole copy (download or copy it again)."
        )
    if not any(name.endswith("/data.pkl") for name in names):  # what every zip torch.save writes holds
        raise _packed_archive(path, "a zip archive")


def _packed_archive(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is {what}, not a PyTorch checkpoint: extract the .pth file from it and use that.")


def _state_dict_of(content: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(content, Mapping) and "model_state_dict" in content:
        content = content["model_state_dict"]
    if (
        not isinstance(content, Mapping)
        or not content
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items())
    ):
        raise CheckpointError(
            f"{path} holds no model weights (expected a state dict or a dict with 'model_state_dict'): "
            "use a SAM-Med3D checkpoint file."
        )
    return _strip_module_prefix(dict(content))


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "module."
    if all(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _safe_torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a global beyond tensors: allowed ones are listed and loaded, others refused
        return _load_with_allowed_globals(path)
    except Exception as error:  # the weights-only unpickler fails in many ways on a broken file
        raise _unreadable(path, error) from error


def _load_with_allowed_globals(path: Path) -> object:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # only zip checkpoints can be listed: an older pickle file, or no checkpoint at all
        allowed = _every_allowed_global()
    else:
        refused = [name for name in names if not _is_allowed(name)]
        if refused:
            raise _refusal(path, refused)
        allowed = [_resolve_global(name) for name in names]
        if "numpy.dtype" in names:
            allowed += _numpy_dtype_classes()
    with torch.serialization.safe_globals(allowed):  # still weights-only: nothing else can be built
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            refused = re.findall(r"\bGLOBAL ([\w.]+)", str(error))  # how PyTorch names a global it would not build
            raise (_refusal(path, refused) if refused else _unreadable(path, error)) from error


def _refusal(path: Path, refused: list[str]) -> CheckpointError:
    if set(refused) <= NUMPY_ARRAY_GLOBALS:
        return CheckpointError(
            f"{path} was refused: it holds NumPy arrays beside the weights ({', '.join(refused)}), which are "
            "not loaded, as rebuilding them could run code. If the file is your own, re-save only the weights in a "
            f"Python you trust: ckpt = torch.load({str(path)!r}, weights_only=False); "
            "torch.save({'model_state_dict': ckpt['model_state_dict']}, 'clean.pth'); then use clean.pth."
        )
    return CheckpointError(
        f"{path} was refused: it asks to run or build {', '.join(refused)} while loading, which a weights "
        "file never needs; only use checkpoints from a source you trust."
    )


def _every_allowed_global() -> list:
    found = []
    for name in ALLOWED_GLOBALS:
        try:
            found.append(_resolve_global(name))
        except (ImportError, AttributeError):  # e.g. numpy.core's scalar under another NumPy version
            continue
    return found + _numpy_dtype_classes()


def _is_allowed(name: str) -> bool:
    """An allowed name, or one of NumPy's real dtype classes (a made-up name is refused, not looked up)."""
    module, _, attribute = name.rpartition(".")
    return name in ALLOWED_GLOBALS or (
        module + "." == ALLOWED_DTYPE_MODULE and attribute in {cls.__name__ for cls in _numpy_dtype_classes()}
    )


def _resolve_global(name: str) -> object:
    if name == "argparse.Namespace":
        return argparse.Namespace
    module_name, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def _numpy_dtype_classes() -> list:
    # A pickled NumPy dtype is rebuilt through its concrete class (e.g. numpy.dtypes.Float64DType).
    import numpy.dtypes

    return [getattr(numpy.dtypes, name) for name in dir(numpy.dtypes) if name.endswith("DType")]


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    stand_in = _stand_in_error(path)
    if stand_in is not None:
        return stand_in
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "central directory" in text or "unexpected EOF" in text or isinstance(error, EOFError):
        return CheckpointError(
            f"{path} is truncated or corrupt ({text}): it was not written or copied whole; use a whole copy."
        )
    if text.startswith("Weights only load failed"):  # PyTorch's own advice there is to load unsafely: not given
        return CheckpointError(
            f"{path} is not a PyTorch checkpoint (not a file torch.save wrote: an image, or another file?); "
            "check the path."
        )
    return CheckpointError(f"{path} is not a PyTorch checkpoint that can be read ({text}): check the file.")


def _stand_in_error(path: Path) -> CheckpointError | None:
    """The error for the two files most often taken for a checkpoint: what a clone without Git LFS holds, and the
    web page of the file saved instead of the file. None for anything else."""
    try:
        with open(path, "rb") as file:
            start = file.read(256)
    except OSError:
        return None
    if start.startswith(GIT_LFS_POINTER):
        return CheckpointError(
            f"{path} is a Git LFS pointer, not the checkpoint itself (the repository was cloned without Git LFS): "
            "run git lfs pull in that clone, or download the file itself."
        )
    if start.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return CheckpointError(
            f"{path} is a saved web page, not a checkpoint: download the file itself from its resolve URL (the "
            "download link, .../resolve/...), not the web page that shows it."
        )
    return None


def _check_keys(model: Sam3D, state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} {list(state[key].shape)} (expected {list(value.shape)})"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {', '.join(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"{source} does not match a SAM-Med3D network ({'; '.join(problems)}): "
            "use an official SAM-Med3D checkpoint or a complete fine-tune of one."
        )


def save_checkpoint(path: PathLike, model: Sam3D, **training_state: object) -> None:
    """Write a checkpoint in the official training layout, whole or not at all."""
    content = {"model_state_dict": model.state_dict(), **training_state}
    if model.first_click_multimask:
        content[FIRST_CLICK_MULTIMASK_KEY] = True
    with atomic_destination(path) as temporary:
        torch.save(content, temporary)
