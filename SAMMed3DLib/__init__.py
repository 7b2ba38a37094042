"""SAMMed3D engine: SAM-Med3D promptable 3D segmentation with torch, numpy and SimpleITK (never `slicer`).

Entry points: `load_model` (a checkpoint file -> network), `load_predictor` (a file, a published name or
the demo model -> a ready region predictor), `Volume` and `PreparedVolume` (an image and its cached
1.5 mm canonical resampling), `InteractiveSession` and `Click` (clicks -> a mask on the image's grid).
"""

from .checkpoint import load_model
from .predictor import RegionPredictor, load_predictor
from .preprocess import PreparedVolume
from .session import Click, InteractiveSession, SessionResult
from .volume import Volume

__version__ = "0.1.0"

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
