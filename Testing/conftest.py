"""Shared test fixtures: the reference material in ../shared, skipped cleanly where it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from SAMMed3DLib.config import ModelConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# A network small enough to run a region in a fraction of a second (random weights).
TINY = ModelConfig(
    encoder_embed_dim=48,
    encoder_depth=2,
    encoder_num_heads=1,
    encoder_global_attn_indexes=(1,),
    prompt_embed_dim=48,
    decoder_mlp_dim=64,
)


def shared_path(relative: str) -> Path:
    """Path inside ../shared, or skip the test saying what is missing."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"reference material {path} is absent (CI and developers have ../shared beside the checkout)")
    return path
