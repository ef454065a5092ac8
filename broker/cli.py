"""`fleetlearn broker` and `fleetlearn provision`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from fleetlearn.broker import provision as prov
from fleetlearn.broker.runner import (
    DEFAULT_PORT,
    BrokerProcess,
    BrokerSettings,
    Mode,
    choose_mode,
    find_mosquitto,
    start_broker,
)
from fleetlearn.shared import cliargs
from fleetlearn.shared.errors import ConfigError
from fleetlearn.shared.ids import id_problem
from fleetlearn.transport import listen_host

DEFAULT_FLEET = "plant-7"
DEFAULT_FLEET_DIR = Path("fleet")
DEFAULT_STATE_DIR = Path("broker-state")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= prov.MAX_DEVICES:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..{prov.MAX_DEVICES}")
    return value


def _owner(text: str) -> tuple[int, int]:
    uid, sep, gid = text.partition(":")
    if not (uid.isascii() and uid.isdigit() and (not sep or (gid.isascii() and gid.isdigit()))):
        raise argparse.ArgumentTypeError(f"{text!r} is not UID or UID:GID")
    owner = int(uid), int(gid or uid)
    if not all(value < prov.MAX_ID for value in owner):
        raise argparse.ArgumentTypeError(f"{text!r}: ids must be below {prov.MAX_ID}")
    return owner


def register(sub: Any) -> None:
    b = sub.add_parser(
        "broker",
        help="run a local MQTT broker (mosquitto, or the embedded one when it is absent)",
        description=(
            "Start mosquitto with a generated config on a loopback port and keep it running "
            "until Ctrl-C. Without mosquitto installed, runs the embedded amqtt broker "
            "(MQTT 3.1.1) instead and says so."
        ),
    )
    b.add_argument(
        "--host",
        type=listen_host,
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1)",
    )
    b.add_argument(
        "--port", type=cliargs.port, default=DEFAULT_PORT, help="TCP port (default 1883)"
    )
    b.add_argument(
        "--fleet-dir",
        type=Path,
        help="provisioned fleet directory: enables password auth and the ACL from it",
    )
    b.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="config, log and persisted messages; kept across restarts (default ./broker-state)",
    )
    b.add_argument(
        "--persistence",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep retained messages and sessions across restarts (default on)",
    )
    which = b.add_mutually_exclusive_group()
    which.add_argument("--embedded", action="store_true", help="use the embedded amqtt broker")
    which.add_argument("--mosquitto", action="store_true", help="require mosquitto")
    b.set_defaults(handler=run_broker)

    p = sub.add_parser(
        "provision",
        help="write broker credentials, the ACL and identity keys for a fleet",
        description=(
            "Create or extend a fleet directory: mosquitto password and ACL files, the "
            "aggregator's signing key, and per-device credentials and Ed25519 identity keys. "
            "Re-running adds devices and keeps existing keys unless --rotate is given."
        ),
    )
    p.add_argument("--fleet", type=cliargs.fleet_id, default=DEFAULT_FLEET, help="fleet id")
    p.add_argument(
        "--devices", type=_count, default=0, help="number of devices (ids PREFIX-0001...)"
    )
    p.add_argument("--prefix", default="dev", help="device id prefix (default dev)")
    p.add_argument("--ids", default="", help="comma-separated device ids, in addition to --devices")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_FLEET_DIR, help="fleet directory (default ./fleet)"
    )
    p.add_argument("--rotate", action="store_true", help="replace every key and password")
    p.add_argument(
        "--broker-owner",
        type=_owner,
        help="UID:GID to own passwd and acl (the broker's user, e.g. 1883:1883 in docker)",
    )
    p.set_defaults(handler=run_provision)


def run_provision(args: argparse.Namespace) -> int:
    ids = prov.device_ids(args.devices, args.prefix)
    ids += [x.strip() for x in args.ids.split(",") if x.strip()]
    for dev in ids:
        problem = id_problem(dev)
        if problem:
            raise ConfigError("--ids/--prefix", f"device id {problem}")
    report = prov.provision(
        args.out, args.fleet, ids, rotate=args.rotate, broker_owner=args.broker_owner
    )
    total = len(report.added) + len(report.kept)
    verb = "rotated" if report.rotated else "added"
    print(
        f"fleet {report.fleet!r} in {report.directory}: {total} devices "
        f"({len(report.added)} {verb}, {len(report.kept)} kept)"
    )
    print(f"  broker files: {report.directory / 'passwd'}, {report.directory / 'acl'}")
    print(f"  aggregator:   {report.directory / 'aggregator'}")
    print(f"  devices:      {report.directory / 'devices'}/<id>/  (copy one to each gateway)")
    return 0


def run_broker(args: argparse.Namespace) -> int:
    mode: Mode = "embedded" if args.embedded else "mosquitto" if args.mosquitto else "auto"
    chosen = choose_mode(mode)
    if chosen == "embedded" and not args.embedded:
        print(
            "mosquitto not found: running the embedded amqtt broker instead "
            "(MQTT 3.1.1 only, about half as fast; apt-get install mosquitto for production)",
            file=sys.stderr,
        )
    settings = BrokerSettings(
        host=args.host,
        port=args.port,
        fleet_dir=args.fleet_dir,
        state_dir=args.state_dir,
        persistence=args.persistence,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _STOP_SIGNALS}
    try:
        return _serve(start_broker(settings, chosen), chosen, args, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(
    broker: BrokerProcess, chosen: str, args: argparse.Namespace, stop: threading.Event
) -> int:
    """Keep the broker running until a stop signal, then stop it."""
    try:
        auth = f"auth+ACL from {args.fleet_dir}" if args.fleet_dir else "anonymous, no ACL"
        binary = find_mosquitto() if chosen == "mosquitto" else "amqtt"
        kept = (
            f"state in {broker.state_dir}"
            if chosen == "mosquitto" and args.persistence
            else "nothing kept across restarts"
        )
        print(
            f"{chosen} ({binary}) listening on {broker.url} ({auth}; {kept}); Ctrl-C to stop",
            flush=True,
        )
        while not stop.wait(0.5):
            if not broker.running():
                print(f"{chosen} stopped unexpectedly:\n{broker.log_tail()}", file=sys.stderr)
                return 1
    finally:
        broker.close()
    print("broker stopped", flush=True)
    return 0
