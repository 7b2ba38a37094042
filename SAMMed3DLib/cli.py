"""The `sammed3d` command: one sub-command per module in `SAMMed3DLib.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .errors import SAMMed3DError

# Each command module defines `register(subparsers)` that adds its parser and sets `func`.
COMMAND_MODULES: tuple[str, ...] = ("demo", "segment", "batch", "evaluate", "phantom", "train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sammed3d", description="SAM-Med3D promptable 3D segmentation.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.commands.{name}").register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # point options are parsed, and checked, here
        return int(args.func(args) or 0)
    except SAMMed3DError as error:
        print(f"sammed3d: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
