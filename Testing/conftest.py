"""Shared test fixtures: the reference material in ../shared, skipped cleanly where it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from SAMMed3DLib.checkpoint import save_checkpoint
from SAMMed3DLib.config import ModelConfig, build_model

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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint file of the TINY network (seeded random weights), for the commands that load one."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("model") / "tiny.pth"
    save_checkpoint(path, build_model(TINY))
    return path


def shared_path(relative: str) -> Path:
    """Path inside ../shared, or skip the test saying what is missing."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"reference material {path} is absent (CI and developers have ../shared beside the checkout)")
    return path
