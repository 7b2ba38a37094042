"""Writing files whole or not at all (write beside the target, then rename it into place), and only where a
write destroys nothing the user did not ask to replace."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Union

from .errors import InputError

PathLike = Union[str, "os.PathLike[str]"]
_NAME_CHARACTERS_KEPT = 40  # of the target's name in its temporary file's name


@contextmanager
def atomic_destination(target: PathLike, suffix: str = "", replace: bool = True) -> Iterator[Path]:
    """A temporary path beside `target` (ending in `suffix`, so writers that go by the extension pick the
    right format); it replaces `target` when the block ends normally and is removed otherwise. With
    `replace` False a `target` that came into being meanwhile (checked absent when the work began) is kept
    and the write refused: a long run must not replace a file saved while it ran."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The writer creates the file itself, so it gets the usual permissions (a mkstemp file would be 0600). The
    # name is cut short: a target name near the file system's 255-byte limit would leave no room for the rest.
    temporary = target.with_name(f".{target.name[:_NAME_CHARACTERS_KEPT]}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        yield temporary
        if replace:
            os.replace(temporary, target)
        else:
            _place_without_replacing(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _place_without_replacing(temporary: Path, target: Path) -> None:
    """Give `temporary` the name `target` unless `target` exists: a hard link does both at once."""
    try:
        os.link(temporary, target)
        return
    except FileExistsError:
        pass
    except (OSError, NotImplementedError):  # no hard links on this file system (FAT, some network shares)
        if not os.path.lexists(target):
            os.replace(temporary, target)
            return
    raise InputError(
        f"{target} was created by something else while this ran; it was kept and nothing was written. "
        "Choose another output path, or pass --overwrite to replace it."
    )


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write a text file whole or not at all."""
    with atomic_destination(path) as temporary:
        temporary.write_text(text, encoding=encoding)
    return Path(path)


def check_output_path(path: PathLike, inputs: Iterable[PathLike] = (), overwrite: bool = False) -> Path:
    """`path`, once it is known that writing it loses nothing: it is none of `inputs`, it does not exist
    unless `overwrite`, and no file stands where its folder should be. Checked before any work starts."""
    path = Path(path)
    resolved = path.resolve()
    if any(resolved == Path(source).resolve() or _same_file(path, source) for source in inputs):
        raise InputError(f"The output {path} is one of the input files; choose another output path.")
    if path.is_dir():
        raise InputError(f"The output {path} is a folder; give a file name inside it.")
    if os.path.lexists(path) and not overwrite:  # lexists: a link to nothing is there too, and would be replaced
        raise InputError(f"{path} already exists; choose another output path, or pass --overwrite to replace it.")
    check_output_folder(path.parent)
    return path


def _same_file(path: Path, source: PathLike) -> bool:
    """One file under two names that resolve apart: a hard link, or another spelling on a case-insensitive disk."""
    try:
        return os.path.samefile(path, source)
    except OSError:  # one of them does not exist (yet)
        return False


def check_output_folder(folder: PathLike) -> Path:
    """`folder`, once it is known that it is, or can be made, a writable folder: no file stands where it or
    one of its parents should be, and the nearest existing one is writable."""
    folder = Path(folder)
    resolved = folder.resolve()
    for existing in (resolved, *resolved.parents):
        if existing.exists():
            if not existing.is_dir():
                raise InputError(f"Cannot write into {folder}: {existing} is a file, not a folder.")
            if not os.access(existing, os.W_OK):
                raise InputError(f"Cannot write into {folder}: the folder {existing} is not writable.")
            break
    return folder
