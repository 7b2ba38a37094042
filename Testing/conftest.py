"""Shared test fixtures: the reference material in ../shared, skipped cleanly where it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(relative: str) -> Path:
    """Path inside ../shared, or skip the test saying what is missing."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"reference material {path} is absent (CI and developers have ../shared beside the checkout)")
    return path
