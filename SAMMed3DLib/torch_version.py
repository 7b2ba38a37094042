"""The oldest PyTorch the engine runs on, and a clear error for an older one.

Safe checkpoint loading needs `torch.serialization.get_unsafe_globals_in_checkpoint` and `safe_globals`,
which came with PyTorch 2.5, and a `torch.load(weights_only=True)` that cannot be tricked into running code,
which came with 2.6 (CVE-2025-32434: up to 2.5.1 a crafted checkpoint could run code all the same).
"""

from __future__ import annotations

import re
from typing import Optional

from .errors import SAMMed3DError

MINIMUM_TORCH_VERSION = (2, 6)


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a PyTorch version string such as '2.4.1+cu121' or '2.6.0a0+git1234'."""
    match = re.match(r"\s*(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"not a PyTorch version: {text!r}")
    return int(match.group(1)), int(match.group(2))


def require_supported_torch(version: Optional[str] = None) -> None:
    """Raise a SAMMed3DError naming the fix when `version` (default: the installed torch) is too old."""
    if version is None:
        import torch

        version = torch.__version__
    if parse_version(version) < MINIMUM_TORCH_VERSION:
        minimum = ".".join(str(part) for part in MINIMUM_TORCH_VERSION)
        raise SAMMed3DError(
            f"PyTorch {version} is too old: SAM-Med3D needs PyTorch {minimum} or newer (older ones can be made to run "
            "code hidden in a checkpoint file). Update it (in 3D Slicer with the PyTorch Utils module; elsewhere with "
            "pip install --upgrade torch)."
        )
