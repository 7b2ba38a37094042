"""Manifests listing cases: a JSON list of objects (or {"cases": [...]}), or a CSV file with a header row."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from .errors import InputError
from .paths import user_path


def manifest_path(folder: Path, text: str) -> Path:
    """A path written in a manifest: relative to the manifest's `folder`, '~' and '~/...' in the home folder."""
    return folder / user_path(text)


class ManifestRow(NamedTuple):
    """One entry of a manifest as read, and where it is: 'line 5' of a CSV file (the header is line 1, as a
    spreadsheet numbers its rows), 'entry 3' of a JSON list."""

    where: str
    fields: object


def manifest_rows(
    path: Path, columns: Sequence[str] = (), optional: Optional[Sequence[str]] = None
) -> list[ManifestRow]:
    """The rows of a manifest as read: JSON when the name ends in .json, else CSV (one dict per row) whose header
    must name every one of `columns` and, when `optional` is given, nothing but those and `optional` (where a
    misspelt column would be ignored silently; a JSON object {"cases": [...]} then holds nothing else either).
    Header names are read without case or surrounding spaces; a column without a name is dropped when it is empty
    (a trailing comma) and refused when it holds something. Cells are read without surrounding spaces, and rows of
    empty cells are skipped. A file that cannot be read as a whole (among them a column or JSON key named twice) is
    an InputError; the rows themselves are not checked, so that one bad row can be reported on its own."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often start a UTF-8 file with a BOM
    except UnicodeDecodeError as error:
        raise InputError(f"Manifest {path} is not UTF-8 text (byte {error.start}); save it as UTF-8.") from error
    except OSError as error:
        raise InputError(f"Manifest {path} cannot be read ({error.strerror}); check the file.") from error
    if path.suffix.lower() == ".json":
        rows = _json_rows(path, text, refuse_unknown=optional is not None)
        return [ManifestRow(f"entry {number}", row) for number, row in enumerate(rows, start=1)]
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


def _csv_rows(path: Path, text: str, columns: Sequence[str], optional: Optional[Sequence[str]]) -> list[ManifestRow]:
    lines = text.splitlines(keepends=True)  # line ends kept, so that a quote left open shows as a line break
    try:
        # skipinitialspace: in 'a.nii.gz, "1,2,3"' the quote after ', ' opens a quoted cell.
        reader = csv.reader(lines, skipinitialspace=True)
        header = [name.strip().lower() for name in next(reader, [])]
        _check_header(path, header, lines[0].strip() if lines else "", columns, optional)
        known = ", ".join((*columns, *(optional or ())))
        rows: list[ManifestRow] = []
        first_line = reader.line_num + 1
        for cells in reader:
            where = f"line {first_line}"
            first_line = reader.line_num + 1
            if any("\n" in cell or "\r" in cell for cell in cells):
                raise InputError(
                    f"Manifest {path} {where} has a quote that is not closed, which joins the lines below to it; "
                    "close the quote."
                )
            if any(cell.strip() for cell in cells):  # a row of empty cells (',,') is how spreadsheets write a blank row
                rows.append(ManifestRow(where, _named_cells(f"Manifest {path} {where}", header, cells, known)))
        return rows
    except csv.Error as error:
        raise InputError(f"Manifest {path} is not a valid CSV file ({error}); fix it.") from error


def _check_header(
    path: Path, header: list[str], first: str, columns: Sequence[str], optional: Optional[Sequence[str]]
) -> None:
    missing = [column for column in columns if column not in header]
    if missing:
        raise InputError(
            f"Manifest {path} lacks the column(s) {', '.join(missing)} in its first row ('{first}'); "
            f"start it with a header row naming {', '.join(columns)}, separated by commas."
        )
    repeated = sorted({name for name in header if name and header.count(name) > 1})
    if repeated:  # a dict of the row would keep the last of them silently
        raise InputError(f"Manifest {path} names the column(s) {', '.join(repeated)} twice; keep one.")
    unknown = [name for name in header if name and name not in (*columns, *(optional or ()))]
    if optional is not None and unknown:
        raise InputError(
            f"Manifest {path} has the column(s) {', '.join(unknown)}, which SAMMed3D does not read; "
            f"the columns are {', '.join((*columns, *optional))}."
        )


def _named_cells(where: str, header: list[str], cells: list[str], known: str) -> dict:
    """A row's cells by column name; cells beyond the header, if not blank (trailing commas), under None."""
    named = {}
    for number, (name, cell) in enumerate(zip(header, cells), start=1):
        if name:
            named[name] = cell.strip()
        elif cell.strip():  # a column whose header cell was left blank: its values would be dropped unread
            raise InputError(
                f"{where} has '{cell.strip()}' in column {number}, whose header cell is empty; "
                f"name the column in the first row ({known}), or delete it."
            )
    beyond = [cell for cell in cells[len(header) :] if cell.strip()]
    if beyond:
        named[None] = beyond  # for the row's own problem
    for name in header[len(cells) :]:
        if name:
            named[name] = None  # a short row: as csv.DictReader leaves its missing cells
    return named
