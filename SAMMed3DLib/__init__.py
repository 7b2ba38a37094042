"""SAMMed3D engine: SAM-Med3D promptable 3D segmentation with torch, numpy and SimpleITK (never `slicer`).

Entry points: `load_model` (a checkpoint file -> network), `load_predictor` (a file, a published name or
the demo model -> a ready region predictor), `Volume` and `PreparedVolume` (an image and its cached
1.5 mm canonical resampling), `InteractiveSession` and `Click` (clicks -> a mask on the image's grid).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Where each public name lives. They are imported on first use: importing the package (as the command line does
# before it can catch a Ctrl+C) does not load PyTorch.
_PUBLIC = {
    "load_model": "checkpoint",
    "RegionPredictor": "predictor",
    "load_predictor": "predictor",
    "PreparedVolume": "preprocess",
    "Click": "session",
    "InteractiveSession": "session",
    "SessionResult": "session",
    "Volume": "volume",
}

__all__ = [
    "Click",
    "InteractiveSession",
    "PreparedVolume",
    "RegionPredictor",
    "SessionResult",
    "Volume",
    "load_model",
    "load_predictor",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
