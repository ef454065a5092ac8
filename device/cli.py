"""`fleetlearn device`: run one real gateway's participant until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from fleetlearn.shared.cost import (
    DEFAULT_JOULES_PER_CPU_SECOND,
    DEFAULT_MICROJOULES_PER_BYTE_DOWN,
    DEFAULT_MICROJOULES_PER_BYTE_UP,
)

log = logging.getLogger("fleetlearn.device")


def register(sub: Any) -> None:
    d = sub.add_parser(
        "device",
        help="run one device: train on local data, join rounds, report health",
        description=(
            "Connect to the fleet's broker with this device's credentials, load each verified "
            "model release, train on the local data for the rounds it is selected for, and "
            "publish status and health. Runs until Ctrl-C."
        ),
    )
    d.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    d.add_argument(
        "--keys",
        type=Path,
        required=True,
        help="this device's provisioned directory (fleet/devices/<id>)",
    )
    d.add_argument("--id", help="device id; must match the one in --keys (a safety check)")
    d.add_argument(
        "--data",
        type=Path,
        required=True,
        help="local examples, .npz or .csv (docs/data.md); without labels the device runs "
        "inference only and never trains",
    )
    d.add_argument(
        "--registry",
        type=Path,
        help="fleet.json with every device's public key (default: <keys>/../../fleet.json)",
    )
    d.add_argument(
        "--state-dir",
        type=Path,
        help=(
            "keeps the error-feedback residual and the last loaded release across restarts, "
            "so the device never rolls back to an older release (default: <keys>/state)"
        ),
    )
    d.add_argument("--protocol", choices=["auto", "5", "3.1.1"], default="auto")
    # This device's own privacy floor: no announcement can lower it (docs/secagg.md).
    d.add_argument(
        "--min-cohort", type=int, default=3, help="refuse secure rounds with fewer devices (3)"
    )
    d.add_argument(
        "--min-survivors",
        type=int,
        default=3,
        help="refuse to go on, or to unmask, for fewer devices (3)",
    )
    d.add_argument(
        "--min-advertised-fraction",
        type=float,
        default=0.8,
        help="refuse to deal shares when fewer of the cohort advertised keys (0.8)",
    )
    d.add_argument(
        "--min-noise",
        type=float,
        default=0.0,
        help="refuse rounds whose differential-privacy noise multiplier, as this device can "
        "check it, is below this (0: no demand; docs/privacy.md)",
    )
    d.add_argument(
        "--joules-per-cpu-second",
        type=float,
        default=DEFAULT_JOULES_PER_CPU_SECOND,
        help="this device's energy per CPU second of training, for the cost it reports "
        f"({DEFAULT_JOULES_PER_CPU_SECOND:g}; docs/dashboard.md)",
    )
    d.add_argument(
        "--microjoules-per-byte-up",
        type=float,
        default=DEFAULT_MICROJOULES_PER_BYTE_UP,
        help=f"energy per payload byte sent ({DEFAULT_MICROJOULES_PER_BYTE_UP:g})",
    )
    d.add_argument(
        "--microjoules-per-byte-down",
        type=float,
        default=DEFAULT_MICROJOULES_PER_BYTE_DOWN,
        help=f"energy per payload byte received ({DEFAULT_MICROJOULES_PER_BYTE_DOWN:g})",
    )
    d.add_argument("--ca-file", help="CA certificate for mqtts:// brokers")
    d.set_defaults(handler=run_device)


def run_device(args: argparse.Namespace) -> int:
    from fleetlearn.device.agent import ArrayData, DeviceAgent
    from fleetlearn.device.participant import Participant
    from fleetlearn.shared import fleetdir as prov
    from fleetlearn.shared.cost import EnergyModel
    from fleetlearn.shared.errors import ConfigError
    from fleetlearn.shared.secagg.config import PrivacyFloor
    from fleetlearn.shared.secagg.errors import SecAggConfigError
    from fleetlearn.shared.settings import writable_dir
    from fleetlearn.transport import BrokerAddress, check_ca_file

    # Every flag and file is checked here, before the agent connects: each problem is one line.
    try:
        floor = PrivacyFloor(
            min_cohort=args.min_cohort,
            min_survivors=args.min_survivors,
            min_advertised_fraction=args.min_advertised_fraction,
            min_noise=args.min_noise,
        )
    except SecAggConfigError as exc:
        flag = "--" + exc.key.removeprefix("floor.").replace("_", "-")
        raise ConfigError(flag, exc.problem) from None
    try:
        energy = EnergyModel(
            joules_per_cpu_second=args.joules_per_cpu_second,
            microjoules_per_byte_up=args.microjoules_per_byte_up,
            microjoules_per_byte_down=args.microjoules_per_byte_down,
        )
    except ConfigError as exc:
        flag = "--" + exc.key.removeprefix("cost.").replace("_", "-")
        raise ConfigError(flag, exc.problem) from None
    address = BrokerAddress.parse(args.broker)
    if args.ca_file is not None:
        if not address.tls:
            raise ConfigError("--ca-file", "is only used with an mqtts:// --broker")
        check_ca_file(args.ca_file, "--ca-file")
    if args.state_dir is not None:
        writable_dir(args.state_dir, "--state-dir")
    creds = prov.load_device(args.keys)
    if args.id is not None and args.id != creds.device_id:
        raise ConfigError("--id", f"{args.id!r} but {args.keys} holds {creds.device_id!r}")
    registry_path = args.registry or args.keys.resolve().parent.parent / "fleet.json"
    registry = prov.load_registry(
        registry_path.parent if registry_path.name == "fleet.json" else registry_path
    )
    if registry.fleet != creds.fleet:
        raise ConfigError(
            "--registry", f"is for fleet {registry.fleet!r}, device is in {creds.fleet!r}"
        )
    data = ArrayData.load(args.data, require_labels=False)  # unlabelled: inference only
    participant = Participant(
        fleet=creds.fleet,
        device_id=creds.device_id,
        identity=creds.identity,
        aggregator_key=creds.aggregator_key,
        registry={d: bytes(k) for d, k in registry.device_keys.items()},
        random=os.urandom,
        floor=floor,
        energy=energy,
    )
    agent = DeviceAgent(
        participant=participant,
        address=address,
        password=creds.password,
        data=data,
        protocol=args.protocol,
        state_dir=args.state_dir or args.keys / "state",
        ca_file=args.ca_file,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(agent.run())
        role = (
            ""
            if data.labelled
            else " (no labels in --data: trains only an autoencoder, else runs inference only)"
        )
        print(
            f"device {creds.device_id} of fleet {creds.fleet} -> {address}{role}; Ctrl-C to stop",
            flush=True,
        )
        done, _ = await asyncio.wait(
            {task, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            task.result()  # raises LinkAuthError etc.
        await agent.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    print(f"device {creds.device_id} stopped", flush=True)
    return 0
