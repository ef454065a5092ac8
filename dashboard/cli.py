"""`fleetlearn dashboard`: the fleet's web page and Prometheus endpoint, until Ctrl-C.

Every flag is checked before anything starts (each problem is one line, exit status 2): the
broker URL, the fleet id, the fleet directory (the `dashboard` user's password, and that it is
this fleet's), the address and port to listen on. It binds to 127.0.0.1 unless told otherwise;
the page has no authentication, so another address gets a warning on how to expose it safely.
The web stack is imported in the handler, so `fleetlearn --help` works without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleetlearn.shared import cliargs
from fleetlearn.shared.errors import ConfigError, require_modules
from fleetlearn.transport import listen_host

EXPOSE_ADVICE = (
    "the dashboard has no authentication: anyone who can reach {host}:{port} sees the fleet's "
    "figures and device list. Keep it on 127.0.0.1 and expose it through a reverse proxy with "
    "TLS and authentication (pass its public name with --allowed-host), or reach it through an "
    "SSH tunnel: ssh -L {port}:127.0.0.1:{port} THIS_HOST"
)


def _host_name(text: str) -> str:
    name = text.strip().lower()
    if not name or (any(c in name for c in "/ :@[]") and not _is_ip(name)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name (give it without a port)")
    return name


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def register(sub: Any) -> None:
    d = sub.add_parser(
        "dashboard",
        help="serve the fleet's web dashboard and Prometheus /metrics (read-only)",
        description=(
            "Read the fleet's round summaries, events, device statuses and health reports as "
            "the read-only `dashboard` user, and serve a live web page (rounds, accuracy, "
            "stages, devices, events) and Prometheus series on /metrics. Listens on "
            "127.0.0.1 unless --host says otherwise. Runs until Ctrl-C. See docs/dashboard.md."
        ),
    )
    d.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    d.add_argument("--fleet", type=cliargs.fleet_id, required=True, help="fleet id, e.g. plant-7")
    d.add_argument(
        "--fleet-dir",
        type=Path,
        required=True,
        help="the provisioned fleet directory (reads dashboard/password and fleet.json)",
    )
    d.add_argument(
        "--host",
        type=listen_host,
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; the page has no authentication)",
    )
    d.add_argument(
        "--port", type=cliargs.port, default=8050, help="TCP port (default 8050; 0: any free port)"
    )
    d.add_argument(
        "--allowed-host",
        type=_host_name,
        action="append",
        metavar="NAME",
        help="a Host name the page may be requested by, e.g. a reverse proxy's public name "
        "(repeatable; default: the loopback names and --host when listening on loopback, "
        "else any)",
    )
    d.add_argument("--ca-file", help="CA certificate for mqtts:// brokers")
    d.set_defaults(handler=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    require_modules(
        "fleetlearn dashboard", ("starlette", "uvicorn", "prometheus_client"), "dashboard"
    )
    from fleetlearn.dashboard.service import Dashboard, is_loopback, loopback_names
    from fleetlearn.shared import fleetdir
    from fleetlearn.transport import BrokerAddress, check_ca_file

    address = BrokerAddress.parse(args.broker)
    if args.ca_file is not None:
        if not address.tls:
            raise ConfigError("--ca-file", "is only used with an mqtts:// --broker")
        check_ca_file(args.ca_file, "--ca-file")
    registry = fleetdir.load_registry(args.fleet_dir)
    if registry.fleet != args.fleet:
        raise ConfigError(
            "--fleet", f"{args.fleet!r}, but {args.fleet_dir} is fleet {registry.fleet!r}"
        )
    loopback = is_loopback(args.host)
    # Default (): the loopback names (and --host) when listening on loopback, else any name.
    allowed: Sequence[str] = args.allowed_host or ()
    if args.allowed_host and loopback:  # a reverse proxy on this machine, and local use
        allowed = [*args.allowed_host, *loopback_names(args.host)]
    dashboard = Dashboard(
        broker=address,
        fleet=args.fleet,
        fleet_dir=args.fleet_dir,
        host=args.host,
        port=args.port,
        allowed_hosts=allowed,
        ca_file=args.ca_file,
    )
    if not loopback:
        advice = EXPOSE_ADVICE.format(host=args.host, port=args.port)
        print(f"fleetlearn dashboard: warning: --host {args.host} is not loopback; {advice}",
              file=sys.stderr, flush=True)  # fmt: skip

    def listening(url: str) -> None:
        print(
            f"dashboard for fleet {args.fleet} at {url} (metrics: {url}metrics), "
            f"reading {address} as `dashboard`; Ctrl-C to stop",
            flush=True,
        )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, dashboard.request_stop)
        await dashboard.run(on_listening=listening)

    asyncio.run(main())
    print("dashboard stopped", flush=True)
    return 0
