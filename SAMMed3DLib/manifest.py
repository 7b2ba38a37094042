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
    misspelt column would be ignored silently; a JSON object {"cases": [...]} then holds nothing else either).
    Header names are read without case or surrounding spaces, and empty ones (a trailing comma) are dropped;
    cells are read without surrounding spaces, and rows of empty cells are skipped. A file that cannot be read as
    a whole (among them a column or JSON key named twice) is an InputError; the rows themselves are not checked,
    so that one bad row can be reported on its own."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often start a UTF-8 file with a BOM
    except UnicodeDecodeError as error:
        raise InputError(f"Manifest {path} is not UTF-8 text (byte {error.start}); save it as UTF-8.") from error
    except OSError as error:
        raise InputError(f"Manifest {path} cannot be read ({error.strerror}); check the file.") from error
    if path.suffix.lower() == ".json":
        return _json_rows(path, text, refuse_unknown=optional is not None)
    return _csv_rows(path, text, columns, optional)


def _json_rows(path: Path, text: str, refuse_unknown: bool) -> list:
    try:
        content = json.loads(text, object_pairs_hook=lambda pairs: _json_object(path, pairs))
    except json.JSONDecodeError as error:
        raise InputError(
            f"Manifest {path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); fix it."
        ) from error
    rows = content.get("cases") if isinstance(content, dict) else content
    if not isinstance(rows, list):
        raise InputError(f'Manifest {path} must hold a JSON list of cases, or an object {{"cases": [...]}}.')
    beside = [key for key in content if key != "cases"] if isinstance(content, dict) and refuse_unknown else []
    if beside:  # a "space" here would look as if it applied to every case
        raise InputError(
            f'Manifest {path} has the key(s) {", ".join(beside)} beside "cases", which SAMMed3D does not read; '
            "move them into each case, or remove them."
        )
    return rows


def _json_object(path: Path, pairs: list) -> dict:
    """A JSON object, refused where it names a key twice: json keeps the last silently."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise InputError(f"Manifest {path} names the key(s) {', '.join(repeated)} twice in one object; keep one.")
    return dict(pairs)


def _csv_rows(path: Path, text: str, columns: Sequence[str], optional: Optional[Sequence[str]]) -> list:
    lines = text.splitlines(keepends=True)  # line ends kept, so that a quote left open shows as a line break
    try:
        # skipinitialspace: in 'a.nii.gz, "1,2,3"' the quote after ', ' opens a quoted cell.
        reader = csv.DictReader(lines, skipinitialspace=True)
        header = [name.strip().lower() for name in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [column for column in columns if column not in header]
        if missing:
            first = lines[0].strip() if lines else ""
            raise InputError(
                f"Manifest {path} lacks the column(s) {', '.join(missing)} in its first row ('{first}'); "
                f"start it with a header row naming {', '.join(columns)}, separated by commas."
            )
        repeated = sorted({name for name in header if name and header.count(name) > 1})
        if repeated:  # csv keeps the last of them silently
            raise InputError(f"Manifest {path} names the column(s) {', '.join(repeated)} twice; keep one.")
        unknown = [name for name in header if name and name not in (*columns, *(optional or ()))]
        if optional is not None and unknown:
            raise InputError(
                f"Manifest {path} has the column(s) {', '.join(unknown)}, which SAMMed3D does not read; "
                f"the columns are {', '.join((*columns, *optional))}."
            )
        rows: list = []
        for row in reader:
            beyond = [cell for cell in row.pop(None, None) or () if cell.strip()]  # blank ones: trailing commas
            cells = {name: value.strip() if value else value for name, value in row.items() if name != ""}
            if beyond:
                cells[None] = beyond  # where csv puts them, for the row's own problem
            if any(isinstance(value, str) and ("\n" in value or "\r" in value) for value in cells.values()):
                raise InputError(
                    f"Manifest {path} row {len(rows) + 1} has a quote that is not closed, which joins the rows below "
                    "to it; close the quote."
                )
            if any(cells.values()):  # a row of empty cells (',,') is how spreadsheets write a blank row
                rows.append(cells)
        return rows
    except csv.Error as error:
        raise InputError(f"Manifest {path} is not a valid CSV file ({error}); fix it.") from error
