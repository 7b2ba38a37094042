"""Paths as users type them, where no shell has expanded '~' (manifests, environment variables, quoted or GUI text)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def user_path(text: Union[str, os.PathLike]) -> Path:
    """`text` as a path, with '~' and '~/...' in the home folder. A name such as '~scan.nii.gz' stays a file's
    name: expanding it would look for the home folder of a user named 'scan.nii.gz' and fail."""
    path = Path(text)
    name = os.fspath(text)
    if name == "~" or name.startswith(("~/", f"~{os.sep}")):
        return path.expanduser()
    return path
