"""The minimum PyTorch version check."""

from __future__ import annotations

import re

import pytest
import torch

from SAMMed3DLib.errors import SAMMed3DError
from SAMMed3DLib.torch_version import parse_version, require_supported_torch


@pytest.mark.parametrize(
    "text, expected",
    [("2.13.0+cpu", (2, 13)), ("2.4.1+cu121", (2, 4)), ("2.6.0a0+git1234", (2, 6)), ("3.0", (3, 0))],
)
def test_versions_are_read_as_major_and_minor(text, expected):
    assert parse_version(text) == expected


def test_an_unreadable_version_is_refused():
    with pytest.raises(ValueError, match="not a PyTorch version"):
        parse_version("nightly")


def test_an_old_torch_is_a_clear_error_naming_the_fix():
    with pytest.raises(SAMMed3DError, match=r"PyTorch 2\.4\.1\+cu121 is too old.*2\.6 or newer.*pip install --upgrade"):
        require_supported_torch("2.4.1+cu121")


def test_the_installed_torch_and_newer_ones_pass():
    require_supported_torch()
    require_supported_torch(torch.__version__)
    require_supported_torch("2.6.0")
    require_supported_torch("10.0.0")


@pytest.mark.parametrize("version", ["2.5.0", "2.5.1+cu124"])
def test_a_torch_whose_weights_only_loading_can_be_bypassed_is_refused(version):
    """CVE-2025-32434: up to 2.5.1 a crafted checkpoint runs code even under torch.load(weights_only=True)."""
    with pytest.raises(SAMMed3DError, match=rf"PyTorch {re.escape(version)} is too old.*2\.6 or newer"):
        require_supported_torch(version)
