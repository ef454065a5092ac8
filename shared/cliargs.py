"""Flag value types the commands share (argparse `type=`): each bad value gets the same one-line
message whichever command takes it.

Each raises `argparse.ArgumentTypeError`, which argparse turns into the one-line usage error
of `fleetlearn.cli` (exit status 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fleetlearn.shared.ids import id_problem


def whole(lo: int, hi: int) -> Callable[[str], int]:
    """A whole number in lo..hi."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
        return value

    return parse


def port(text: str) -> int:
    """A TCP port, 0 (any free one) included."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..65535")
    return value


def fleet_id(text: str) -> str:
    problem = id_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"fleet id {problem}")
    return text
