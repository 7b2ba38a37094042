"""The `sammed3d` command: one sub-command per module in `SAMMed3DLib.commands`."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from .errors import SAMMed3DError

# Each command module defines `register(subparsers)` that adds its parser and sets `func`.
COMMAND_MODULES: tuple[str, ...] = ("demo", "segment", "batch", "evaluate", "phantom", "train")

# Options whose value may start with '-': a point whose first coordinate is negative, a list of label values.
SIGNED_VALUE_OPTIONS = ("--pos", "--neg", "--labels")

# A cluster's time limit (SIGTERM) and a closed terminal (SIGHUP) stop a command as Ctrl+C does, so that temporary
# files are removed and training saves its last step.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sammed3d", description="SAM-Med3D promptable 3D segmentation.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.commands.{name}").register(subparsers)
    return parser


def attach_signed_values(argv: Sequence[str]) -> list[str]:
    """'--pos -86,-203,382' as '--pos=-86,-203,382': argparse would read the value for an unknown option."""
    joined: list[str] = []
    for token in argv:
        if joined and joined[-1] in SIGNED_VALUE_OPTIONS and token.startswith("-") and not token.startswith("--"):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def _terminal_closed(signum: int, frame: object) -> None:
    """SIGHUP: the terminal is gone and writing to it would fail (EIO) where the command reports how it stopped, so
    output goes nowhere from now on; then stop as Ctrl+C does."""
    nowhere = os.open(os.devnull, os.O_WRONLY)
    for descriptor in (1, 2):
        os.dup2(nowhere, descriptor)
    os.close(nowhere)
    raise KeyboardInterrupt


# Marks a handler that stops as Ctrl+C does, for training's `interrupts_deferred` to hold it like Ctrl+C.
_terminal_closed.raises_keyboard_interrupt = True  # type: ignore[attr-defined]


@contextmanager
def stop_signals_as_interrupts() -> Iterator[None]:
    """Within the block, STOP_SIGNALS raise KeyboardInterrupt where they would end the process outright (their
    default action, in the main thread: an embedding program's own handlers are left alone)."""
    changed = {}
    if threading.current_thread() is threading.main_thread():
        for number in STOP_SIGNALS:
            if signal.getsignal(number) is signal.SIG_DFL:
                handler = _terminal_closed if number == getattr(signal, "SIGHUP", None) else signal.default_int_handler
                changed[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, handler in changed.items():
            signal.signal(number, handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    with stop_signals_as_interrupts():
        return _run(argv)


def _run(argv: Optional[Sequence[str]]) -> int:
    try:
        parser = build_parser()  # imports the commands, and with them PyTorch: a second or so a Ctrl+C may land in
        args = parser.parse_args(attach_signed_values(sys.argv[1:] if argv is None else argv))  # points checked here
        return int(args.func(args) or 0)
    except SAMMed3DError as error:
        print(f"sammed3d: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C: a line, not a traceback; every file is written whole or not at all
        print("sammed3d: interrupted; files already written are whole, nothing was left half-written.", file=sys.stderr)
        return 130
    except OSError as error:  # a disk that filled up, a folder that went away: no traceback, the reason
        print(f"sammed3d: error: {error}; check the path, its permissions and the free space.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
