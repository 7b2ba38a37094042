"""Manifests listing cases: a JSON list of objects (or {"cases": [...]}), or a CSV file with a header row."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def manifest_rows(path: Path) -> list:
    """The rows of a manifest as read: JSON when the name ends in .json, else CSV (one dict per row)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        rows = json.loads(text)
        return rows.get("cases", []) if isinstance(rows, dict) else rows
    return list(csv.DictReader(text.splitlines()))
