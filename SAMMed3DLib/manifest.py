"""Manifests listing cases: a JSON list of objects (or {"cases": [...]}), or a CSV file with a header row."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

from .errors import InputError


def manifest_rows(path: Path, columns: Sequence[str] = (), optional: Optional[Sequence[str]] = None) -> list:
    """The rows of a manifest as read: JSON when the name ends in .json, else CSV (one dict per row) whose header
    must name every one of `columns` and, when `optional` is given, nothing but those and `optional` (where a
    misspelt column would be ignored silently); header names are read without case or surrounding spaces, and
    empty ones (a trailing comma) are dropped. A file that cannot be read as a whole is an InputError; the rows
    themselves are not checked, so that one bad row can be reported on its own."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often start a UTF-8 file with a BOM
    except UnicodeDecodeError as error:
        raise InputError(f"Manifest {path} is not UTF-8 text (byte {error.start}); save it as UTF-8.") from error
    except OSError as error:
        raise InputError(f"Manifest {path} cannot be read ({error.strerror}); check the file.") from error
    if path.suffix.lower() == ".json":
        return _json_rows(path, text)
    return _csv_rows(path, text, columns, optional)


def _json_rows(path: Path, text: str) -> list:
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"Manifest {path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); fix it."
        ) from error
    rows = content.get("cases") if isinstance(content, dict) else content
    if not isinstance(rows, list):
        raise InputError(f'Manifest {path} must hold a JSON list of cases, or an object {{"cases": [...]}}.')
    return rows


def _csv_rows(path: Path, text: str, columns: Sequence[str], optional: Optional[Sequence[str]]) -> list:
    try:
        reader = csv.DictReader(text.splitlines())
        header = [name.strip().lower() for name in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [column for column in columns if column not in header]
        if missing:
            raise InputError(
                f"Manifest {path} lacks the column(s) {', '.join(missing)}; "
                f"start it with a header row naming {', '.join(columns)}."
            )
        unknown = [name for name in header if name and name not in (*columns, *(optional or ()))]
        if optional is not None and unknown:
            raise InputError(
                f"Manifest {path} has the column(s) {', '.join(unknown)}, which SAMMed3D does not read; "
                f"the columns are {', '.join((*columns, *optional))}."
            )
        return [{name: value for name, value in row.items() if name != ""} for row in reader]
    except csv.Error as error:
        raise InputError(f"Manifest {path} is not a valid CSV file ({error}); fix it.") from error
