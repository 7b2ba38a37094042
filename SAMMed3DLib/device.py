"""Choosing where the network runs: the CUDA GPU when there is one, else the CPU."""

from __future__ import annotations

import torch

from .errors import SAMMed3DError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` fails clearly when there is no CUDA device."""
    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SAMMed3DError(
                "CUDA was requested but this PyTorch sees no CUDA GPU: use --device cpu (or auto), "
                "or install a CUDA build of PyTorch."
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise SAMMed3DError(f"Unknown device '{name}': choose one of {', '.join(DEVICE_CHOICES)}.")
