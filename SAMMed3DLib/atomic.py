"""Writing files whole or not at all: write beside the target, then rename it into place."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextmanager
def atomic_destination(target: PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `target` (ending in `suffix`, so writers that go by the extension pick the
    right format); it replaces `target` when the block ends normally and is removed otherwise."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The writer creates the file itself, so it gets the usual permissions (a mkstemp file would be 0600).
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write a text file whole or not at all."""
    with atomic_destination(path) as temporary:
        temporary.write_text(text, encoding=encoding)
    return Path(path)
