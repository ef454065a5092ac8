"""The `fleetlearn` command: one dispatcher over the packages' own command modules.

Each package that offers commands has a `cli.py` with `register(subparsers)`; this file only
lists them. A command appears in `fleetlearn --help` once it works, so unfinished ones are not
listed here. Command modules import their heavy dependencies (TensorFlow, LiteRT, aiomqtt)
inside the handler, so `fleetlearn --help` stays fast and works on a bare install.

Errors meant for the user derive from `shared.errors.FleetlearnError`: they are printed as one
line on stderr with exit status 2, never as a traceback. So are argparse's own complaints about
flags (`Parser.error`), without the usage block argparse prints by default. Each command turns
every problem with its flags and files into such an error before it starts any work.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

# (module, what it adds). Order is the order shown in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "fleetlearn.broker.cli",
    "fleetlearn.aggregator.cli",
    "fleetlearn.device.cli",
    "fleetlearn.firmware_sim.cli",
    "fleetlearn.dashboard.cli",
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors; subcommand parsers are made of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fleetlearn",
        description="Federated learning for industrial IoT fleets over MQTT.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fleetlearn.shared.errors import FleetlearnError

    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result: int = args.handler(args)
    except FleetlearnError as exc:
        # One line, whatever the message holds (a broker's log line, a file's bytes).
        message = " ".join(str(exc).split())
        print(f"fleetlearn {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fleetlearn {args.command}: interrupted", file=sys.stderr)
        return 130
    return result
