"""`fleetlearn sim` (a simulated fleet against any broker) and `fleetlearn demo` (everything)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fleetlearn.shared import cliargs
from fleetlearn.shared.errors import ConfigError, FleetlearnError, require_modules
from fleetlearn.shared.ids import id_problem

MAX_PROCS = 64
MAX_DEMO_DEVICES = 10_000  # what one machine simulates (docs/simulation.md)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


_positive = cliargs.whole(1, 1_000_000)


def register(sub: Any) -> None:
    s = sub.add_parser(
        "sim",
        help="simulate N devices of a provisioned fleet against a broker",
        description=(
            "Run N simulated devices (each its own MQTT connection and credentials) over P "
            "processes, with heterogeneity and failures from a scenario file. Shows live "
            "progress and a row per finished round (read from the metrics topic as the "
            "read-only simulator user). Stops on Ctrl-C, after --rounds rounds, or after "
            "--duration s."
        ),
    )
    s.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    s.add_argument(
        "--fleet", type=cliargs.fleet_id, default="plant-7", help="fleet id (default plant-7)"
    )
    s.add_argument(
        "--fleet-dir", type=Path, default=Path("fleet"), help="provisioned fleet directory"
    )
    s.add_argument(
        "--devices",
        type=cliargs.whole(1, 100_000),
        required=True,
        help="how many devices to simulate",
    )
    s.add_argument(
        "--procs", type=cliargs.whole(1, MAX_PROCS), default=1, help="worker processes (default 1)"
    )
    s.add_argument("--scenario", type=Path, help="scenario TOML (see docs/simulation.md)")
    s.add_argument(
        "--rounds",
        type=cliargs.whole(0, 1_000_000),
        default=0,
        help="stop after this many rounds (0: never)",
    )
    s.add_argument(
        "--duration", type=_seconds, default=0.0, help="stop after this many seconds (0: never)"
    )
    s.add_argument("--protocol", choices=["auto", "5", "3.1.1"], default="auto")
    s.add_argument("--state-dir", type=Path, help="per-device residuals survive restarts here")
    s.add_argument(
        "--data",
        type=Path,
        help=(
            "directory of per-device files (dev-0001.npz, ... from `fleetlearn partition`) "
            "to train on instead of generated machine data"
        ),
    )
    s.set_defaults(handler=run_sim)

    d = sub.add_parser(
        "demo",
        help="broker + aggregator + 200 simulated devices, 10 secure rounds, a report",
        description=(
            "Start a broker (mosquitto if installed, else the embedded one), provision a "
            "fleet, load the default model, run the aggregator and simulated devices until "
            "--rounds secure rounds closed (an aborted round is reported and retried with a "
            "fresh cohort; 3 aborted in a row stop the demo), print the per-round table, "
            "write report.json and report.png, stop everything it started and exit: 0 when "
            "--rounds rounds closed."
        ),
    )
    d.add_argument("--devices", type=cliargs.whole(3, MAX_DEMO_DEVICES), default=200)
    d.add_argument(
        "--rounds", type=cliargs.whole(1, 10_000), default=10, help="rounds to close (default 10)"
    )
    d.add_argument("--cohort", type=_positive, default=50, help="devices per round (default 50)")
    d.add_argument("--procs", type=cliargs.whole(1, MAX_PROCS), default=2)
    d.add_argument(
        "--mode",
        choices=["secure", "plain", "async", "async-secure"],
        default="secure",
        help=(
            "round mode (default secure); async and async-secure: FedBuff, a release every "
            "--cohort/4 updates with --cohort devices training at once"
        ),
    )
    d.add_argument("--out", type=Path, default=Path("demo-report"), help="report directory")
    d.add_argument(
        "--scenario", type=Path, help="scenario TOML (default: 10%% vanish before masking)"
    )
    which = d.add_mutually_exclusive_group()
    which.add_argument("--embedded", action="store_true", help="use the embedded broker")
    which.add_argument("--mosquitto", action="store_true", help="require mosquitto")
    d.add_argument("--build", action="store_true", help="build the model with TensorFlow first")
    d.add_argument(
        "--dashboard",
        action="store_true",
        help="serve the live dashboard (docs/dashboard.md) on 127.0.0.1 while the demo runs, "
        "and print its URL",
    )
    d.add_argument(
        "--dashboard-port",
        type=cliargs.whole(0, 65_535),
        default=8050,
        help="the dashboard's port with --dashboard (default 8050; 0: any free port)",
    )
    d.add_argument(
        "--data",
        type=Path,
        help=(
            "your dataset (.npz or .csv, docs/data.md): split over the devices instead of "
            "generated machine data; a model of its shape is built when the packaged one "
            "(16 features, 4 classes) does not fit (needs TensorFlow)"
        ),
    )
    d.add_argument(
        "--partition",
        choices=["iid", "dirichlet", "group"],
        default="iid",
        help="how --data is split over the devices (default iid; see fleetlearn partition)",
    )
    d.add_argument("--alpha", type=float, default=0.3, help="Dirichlet alpha for --partition")
    d.add_argument("--label", default="label", help="CSV label column of --data")
    d.add_argument("--group-column", help="CSV column of --data naming sites (--partition group)")
    d.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an aggregator setting over the demo's, e.g. --set stages.collect=8 (repeatable)",
    )
    d.set_defaults(handler=run_demo)

    p = sub.add_parser(
        "partition",
        help="split one dataset (.npz or .csv) into per-device files",
        description=(
            "Split a dataset into one .npz per device (dev-0001.npz, ... like provisioned "
            "ids): iid, label skew by Dirichlet(alpha), or whole groups (sites, machines) per "
            "device. Writes partition.json with each device's label counts. The data format "
            "is in docs/data.md."
        ),
    )
    p.add_argument("--data", type=Path, required=True, help="the dataset: .npz or .csv")
    p.add_argument("--devices", type=int, required=True, help="number of device files")
    p.add_argument("--out", type=Path, required=True, help="directory for the device files")
    p.add_argument("--scheme", choices=["iid", "dirichlet", "group"], default="iid")
    p.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration (default 0.3)")
    p.add_argument("--label", default="label", help="CSV label column (default label)")
    p.add_argument("--group-column", help="CSV column naming each row's site or machine")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--prefix", default="dev", help="device id prefix (default dev)")
    p.add_argument(
        "--min-rows", type=int, default=1, help="fewest rows any device gets (default 1)"
    )
    p.set_defaults(handler=run_partition)


# --------------------------------------------------------------------------------------- sim


def _scenario(path: Path | None, default: str = "") -> Any:
    from fleetlearn.firmware_sim.scenario import Scenario

    if path is not None:
        return Scenario.load(path)
    return Scenario.parse(default) if default else Scenario()


async def _watch_metrics(
    url: str, fleet: str, password: str, rows: list[dict[str, Any]], seen: asyncio.Event
) -> None:
    """Read round summaries as the simulator user; append each new one to `rows`."""
    from fleetlearn.broker.provision import SIMULATOR_USER
    from fleetlearn.shared import topics
    from fleetlearn.transport.mqtt import BrokerAddress, Incoming, Link

    def on_message(msg: Incoming) -> None:
        if msg.retain:
            return  # a summary from before this run
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(data, dict) and "round" in data:
            rows.append(data)
            seen.set()

    link = Link(
        BrokerAddress.parse(url),
        client_id=SIMULATOR_USER,  # its own identity, so a dashboard can watch alongside
        username=SIMULATOR_USER,
        password=password,
        subscriptions=(topics.metrics(fleet),),
        persistent=False,
        on_message=on_message,
    )
    try:
        await link.run()
    finally:
        await link.close()


def run_partition(args: argparse.Namespace) -> int:
    import statistics

    from fleetlearn.firmware_sim import partition as part
    from fleetlearn.shared import dataset
    from fleetlearn.shared.settings import writable_dir

    if id_problem(args.prefix) is not None:
        raise ConfigError("--prefix", str(id_problem(args.prefix)))
    group = args.group_column
    if args.scheme == "group" and group is None and args.data.suffix.lower() == ".csv":
        raise ConfigError("--group-column", "the group scheme on a .csv needs --group-column")
    data = dataset.load(args.data, label=args.label, group=group)
    parts = part.partition(
        data,
        args.devices,
        scheme=args.scheme,
        alpha=args.alpha,
        seed=args.seed,
        min_rows=args.min_rows,
    )
    writable_dir(args.out, "--out")
    summary: dict[str, object] = {
        "source": str(args.data),
        "scheme": args.scheme,
        "seed": args.seed,
    }
    if args.scheme == "dirichlet":
        summary["alpha"] = args.alpha
    paths = part.write(args.out, data, parts, prefix=args.prefix, summary=summary)
    sizes = [int(p.size) for p in parts]
    print(
        f"{len(data)} rows, {data.x.shape[1]} features, {data.classes} classes -> "
        f"{len(paths)} files in {args.out} (rows per device: min {min(sizes)}, "
        f"median {int(statistics.median(sizes))}, max {max(sizes)}); "
        f"see {args.out / 'partition.json'}"
    )
    return 0


def _check_device_files(directory: Path, devices: tuple[str, ...]) -> None:
    """Every simulated device's data file exists, loads, has labels and the same number of
    features as the others: one line naming the first file that does not."""
    from fleetlearn.device.agent import ArrayData
    from fleetlearn.firmware_sim.fleet import device_data_file

    if not directory.is_dir():
        raise ConfigError("--data", f"{directory} is not a directory of device files")
    width = None
    for dev in devices:
        path = device_data_file(directory, dev)
        if not path.exists():
            raise ConfigError(
                "--data", f"{path} is missing (one file per device: fleetlearn partition)"
            )
        data = ArrayData.load(path)
        if width is None:
            width = data.x.shape[1]
        elif data.x.shape[1] != width:
            raise ConfigError(
                "--data", f"{path} has {data.x.shape[1]} features, the others {width}"
            )


def run_sim(args: argparse.Namespace) -> int:
    require_modules("fleetlearn sim", ("rich", "ai_edge_litert"), "sim")
    from rich.console import Console
    from rich.live import Live

    from fleetlearn.broker import provision as prov
    from fleetlearn.firmware_sim.fleet import SimSpec, Simulator
    from fleetlearn.firmware_sim.report import class_recall_line, round_table
    from fleetlearn.shared.settings import writable_dir
    from fleetlearn.transport import BrokerAddress

    # Every flag and file is checked before the first worker starts: one line per problem.
    BrokerAddress.parse(args.broker)
    if args.state_dir is not None:
        writable_dir(args.state_dir, "--state-dir")
    registry = prov.load_registry(args.fleet_dir)
    if registry.fleet != args.fleet:
        raise ConfigError(
            "--fleet", f"{args.fleet!r} but {args.fleet_dir} holds {registry.fleet!r}"
        )
    devices = sorted(registry.device_keys)
    if len(devices) < args.devices:
        raise ConfigError(
            "--devices",
            f"{args.devices} requested but {args.fleet_dir} has {len(devices)}; "
            f"run `fleetlearn provision --devices {args.devices}`",
        )
    prov.simulator_password(args.fleet_dir)  # its progress view's credentials are there
    chosen = tuple(devices[: args.devices])
    if args.data is not None:
        _check_device_files(args.data, chosen)
    spec = SimSpec(
        broker=args.broker,
        fleet=args.fleet,
        fleet_dir=str(args.fleet_dir),
        devices=chosen,
        scenario=_scenario(args.scenario),
        protocol=args.protocol,
        state_dir=str(args.state_dir) if args.state_dir else None,
        data_dir=str(args.data) if args.data is not None else None,
    )
    console = Console(width=None if sys.stdout.isatty() else 110)
    rows: list[dict[str, Any]] = []
    sim = Simulator(spec, args.procs)
    started = time.monotonic()

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        seen = asyncio.Event()
        watcher = asyncio.create_task(
            _watch_metrics(
                args.broker, args.fleet, prov.simulator_password(args.fleet_dir), rows, seen
            )
        )
        sim.start()
        printed = 0
        with Live(console=console, refresh_per_second=2, transient=True) as live:
            while not stop.is_set():
                total = await asyncio.to_thread(sim.poll)
                live.update(_status_line(total, len(rows), time.monotonic() - started))
                while printed < len(rows):
                    console.print(
                        round_table([rows[printed]], title=None)
                        if printed == 0
                        else _row_line(rows[printed])
                    )
                    printed += 1
                if args.rounds and len(rows) >= args.rounds:
                    break
                if args.duration and time.monotonic() - started >= args.duration:
                    break
                if total["alive"] == 0 and sim.stats:
                    break
                await asyncio.sleep(0.5)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
        return 0

    try:
        code = asyncio.run(main())
    finally:
        total = sim.stop()
    console.print(
        f"stopped {spec.devices.__len__()} devices after {time.monotonic() - started:.0f} s: "
        f"{total.get('rounds_trained', 0)} local trainings, models {total.get('models', {})}"
    )
    if rows:
        console.print(round_table(rows, title=f"{len(rows)} rounds seen"))
        recall = class_recall_line(rows)
        if recall is not None:
            console.print(recall)
    return code


def _status_line(total: dict[str, Any], rounds: int, elapsed: float) -> str:
    models = ", ".join(f"v{v}: {n}" for v, n in total.get("models", {}).items()) or "none yet"
    return (
        f"[bold]{total.get('connected', 0)}/{total.get('devices', 0)}[/] connected · "
        f"models {models} · {total.get('rounds_trained', 0)} trainings · "
        f"{rounds} rounds · {elapsed:.0f} s"
    )


def _row_line(metrics: dict[str, Any]) -> str:
    from fleetlearn.firmware_sim.report import COLUMNS, cell

    return "  ".join(f"{header}={cell(metrics, key)}" for key, header in COLUMNS)


# -------------------------------------------------------------------------------------- demo

DEMO_SCENARIO = """
[fleet]
seed = 7
samples = 300

[dropout]
collect = 0.1       # one device in ten vanishes after sharing its keys, before its masked update
"""
DEMO_MAX_ABORTS = 3  # aborted rounds in a row after which the demo stops


PACKAGED_FEATURES, PACKAGED_CLASSES = 16, 4  # aggregator/models/pdm_default.toml


DEMO_TEST_FRACTION = 0.2  # of --data's rows, kept as the aggregator's test set (eval.data)


def _demo_data(args: argparse.Namespace) -> tuple[Any, list[Any], Any]:
    """`--data` loaded, a fifth of it kept as the aggregator's test set and the rest split
    over the demo's devices, or one line saying why not; and, when the packaged model does
    not fit it, TensorFlow present to build one. Returns (device rows, parts, test set)."""
    import numpy as np

    from fleetlearn.firmware_sim import partition as part
    from fleetlearn.shared import dataset

    loaded = dataset.load(args.data, label=args.label, group=args.group_column)
    if loaded.y is None:
        raise ConfigError(
            "--data", f"{args.data} has no labels (column {args.label!r}); the demo trains"
        )
    if loaded.targets:
        raise ConfigError(
            "--data", f"{args.data} holds float targets; the demo trains a classifier on labels"
        )
    test_rows = dataset.holdout_rows(len(loaded), DEMO_TEST_FRACTION)
    data = loaded.take(np.flatnonzero(~test_rows))
    test = loaded.take(np.flatnonzero(test_rows))
    parts = part.partition(
        data, args.devices, scheme=args.partition, alpha=args.alpha, seed=0, min_rows=1
    )
    if data.x.shape[1] != PACKAGED_FEATURES or loaded.classes > PACKAGED_CLASSES:
        require_modules(
            f"fleetlearn demo --data with {data.x.shape[1]} features and {data.classes} "
            "classes (a model of that shape is built)",
            ("tensorflow",),
            "build",
        )
    return data, parts, test


def _check_port_free(port: int) -> None:
    """Refuse a dashboard port another program listens on, before the demo starts anything
    (binding as uvicorn will: SO_REUSEADDR, so a port in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ConfigError(
                "--dashboard-port",
                f"127.0.0.1:{port} is taken ({exc.strerror or exc}); pick another port, or 0 "
                "for any free one",
            ) from None


def run_demo(args: argparse.Namespace) -> int:
    require_modules("fleetlearn demo", ("rich", "matplotlib", "ai_edge_litert"), "sim")
    if args.dashboard:
        require_modules(
            "fleetlearn demo --dashboard",
            ("starlette", "uvicorn", "prometheus_client"),
            "dashboard",
        )
    from rich.console import Console

    from fleetlearn.aggregator.config import AggregatorSettings
    from fleetlearn.aggregator.service import AggregatorService, RoundsAbortedError, RoundSummary
    from fleetlearn.broker import provision as prov
    from fleetlearn.broker.runner import BrokerSettings, choose_mode, free_port, start_broker
    from fleetlearn.firmware_sim.fleet import SimSpec, Simulator
    from fleetlearn.firmware_sim.report import (
        class_recall_line,
        cost_line,
        round_table,
        write_plot,
        write_report,
    )
    from fleetlearn.shared import settings

    console = Console(width=None if sys.stdout.isatty() else 110)
    started = time.monotonic()
    gave_up = ""
    mode = choose_mode("embedded" if args.embedded else "mosquitto" if args.mosquitto else "auto")
    scenario = _scenario(args.scenario, DEMO_SCENARIO)
    if args.dashboard and args.dashboard_port:
        _check_port_free(args.dashboard_port)  # before the broker and the devices start
    if args.cohort < 3 or args.cohort > args.devices:
        raise ConfigError("--cohort", f"must be in 3..{args.devices} (the number of devices)")
    settings.writable_dir(args.out, "--out")  # before the run, not after it
    overrides = settings.parse_sets(args.set)
    settings.load(AggregatorSettings, sets=overrides)  # unknown keys, bad values: stop now
    user_data = _demo_data(args) if args.data is not None else None
    work = Path(tempfile.mkdtemp(prefix="fleetlearn-demo-"))
    fleet_dir, state_dir = work / "fleet", work / "state"
    devices = prov.device_ids(args.devices)
    prov.provision(fleet_dir, "demo", devices)
    console.print(f"provisioned fleet [bold]demo[/] with {len(devices)} devices in {fleet_dir}")
    data_dir = None
    if user_data is not None:
        from fleetlearn.firmware_sim import partition as part
        from fleetlearn.shared import dataset

        data, parts, test = user_data
        data_dir = work / "data"
        part.write(
            data_dir,
            data,
            parts,
            summary={"source": str(args.data), "scheme": args.partition, "seed": 0},
        )
        test_path = work / "test.npz"
        dataset.save_npz(test_path, test)
        console.print(
            f"{args.data}: {len(data) + len(test)} examples, {data.x.shape[1]} features, "
            f"{data.classes} classes; {len(test)} kept as the aggregator's test set, the rest "
            f"split {args.partition} over {len(parts)} devices"
        )

    model_path = ""
    fits_packaged = user_data is None or (
        user_data[0].x.shape[1] == PACKAGED_FEATURES
        and max(user_data[0].classes, user_data[2].classes) <= PACKAGED_CLASSES
    )
    if args.build or not fits_packaged:
        from dataclasses import replace

        from fleetlearn.aggregator import model_build

        model_spec = model_build.load_spec(None)
        if not fits_packaged and user_data is not None:
            data = user_data[0]
            classes = max(data.classes, user_data[2].classes)  # the test split may hold the top
            model_spec = replace(
                model_spec,
                model_id="demo-data",
                input_width=int(data.x.shape[1]),
                labels=tuple(f"class-{i}" for i in range(max(2, classes))),
            )
        model_path = str(work / "model.tflite")
        model_build.build_to_file(model_spec, Path(model_path))
        console.print(
            f"built a model with TensorFlow ({model_spec.input_width} features, "
            f"{len(model_spec.labels)} classes): {model_path}"
        )
    else:
        console.print("using the packaged default model (pdm-default, 1,140 parameters)")

    # The runner's own state directory: mosquitto, dropping root privileges, could not enter
    # the 0700 work directory. The demo's broker lives for one run: nothing to persist.
    broker = start_broker(
        BrokerSettings(port=free_port(), fleet_dir=fleet_dir, persistence=False), mode
    )
    if mode == "embedded" and not args.embedded:
        console.print(
            "[yellow]mosquitto not found: using the embedded amqtt broker (MQTT 3.1.1)[/]"
        )
    console.print(f"{broker.kind} broker on {broker.url}")
    spec = SimSpec(
        broker=broker.url,
        fleet="demo",
        fleet_dir=str(fleet_dir),
        devices=tuple(devices),
        scenario=scenario,
        protocol="3.1.1" if broker.kind == "embedded" else "auto",
        data_dir=None if data_dir is None else str(data_dir),
    )
    sim = Simulator(spec, args.procs)
    rows: list[dict[str, Any]] = []
    try:
        sim.start()
        total = sim.wait_connected(len(devices), timeout=180)
        console.print(
            f"{total['connected']} simulated devices connected over {sim.procs} processes"
        )
        sets = {
            "broker.url": broker.url,
            "broker.protocol": "3.1.1" if broker.kind == "embedded" else "auto",
            "fleet.id": "demo",
            "fleet.dir": str(fleet_dir),
            "state.dir": str(state_dir),
            "model.initial": model_path,
            "eval.data": str(work / "test.npz") if user_data is not None else "",
            "rounds.count": str(args.rounds),
            "rounds.mode": args.mode,
            "rounds.cohort": str(args.cohort),
            "rounds.wait_for_devices": "60",
            "rounds.settle": "1.5",
            "rounds.max_aborts": str(DEMO_MAX_ABORTS),
            # Durations per stage (docs/simulation.md). Some device almost always vanishes at
            # COLLECT, so that stage closes at its soft limit once 80% sent their masked
            # input; the other stages close as soon as everyone answered. The hard limits
            # leave a loaded 2-core machine many times what 60 devices need.
            "stages.advertise": "5",
            "stages.share": "5",
            "stages.collect": "5",
            "stages.unmask": "5",
            "stages.advertise_hard": "30",
            "stages.share_hard": "30",
            "stages.collect_hard": "60",
            "stages.unmask_hard": "30",
            "training.max_samples": "256",
            # The shipped training defaults (docs/learning.md); plain rounds show top-k, which
            # needs error feedback.
            **(
                {"compression.sparsity": "top_k", "training.error_feedback": "true"}
                if args.mode == "plain"
                else {}
            ),
            # Asynchronous modes: --cohort devices train at once, a release every quarter.
            **(
                {
                    "fedbuff.concurrency": str(args.cohort),
                    "fedbuff.buffer": str(max(3, args.cohort // 4)),
                    # Secure groups of 1.5 x the buffer: 10% vanishing rarely leaves fewer.
                    "rounds.over_select": "1.5",
                }
                if args.mode in ("async", "async-secure")
                else {}
            ),
            # 10% vanish at COLLECT: size the neighbour graph so bad luck cannot abort a round.
            "secagg.expected_dropout": "0.1",
            **overrides,
        }
        loaded = settings.load(AggregatorSettings, sets=sets)

        def on_round(summary: RoundSummary) -> None:
            rows.append(summary.metrics)
            m = summary.metrics
            acc = m.get("accuracy")
            if summary.state != "closed":
                console.print(
                    f"[yellow]round {summary.round_id:>2}: aborted ({m.get('reason', '')})[/]",
                    soft_wrap=True,
                )
                return
            console.print(
                f"round {summary.round_id:>2}: {summary.state:<7} {m.get('survivors', 0):>3}/"
                f"{m.get('cohort', 0)} devices in the sum, "
                f"{m.get('dropouts_recovered', 0)} dropouts recovered, "
                f"{m.get('uplink_bytes_per_device', 0):,} B up/device, accuracy "
                + (f"{acc:.3f}" if isinstance(acc, float) else "-")
            )

        service = AggregatorService(
            loaded,
            prov.load_aggregator(fleet_dir),
            prov.load_registry(fleet_dir),
            on_round=on_round,
        )

        async def serve() -> None:
            if not args.dashboard:
                await service.run()
                return
            from fleetlearn.dashboard.service import Dashboard

            # The demo's fleet as the read-only dashboard user: the same page
            # `fleetlearn dashboard` serves, in this process for as long as the rounds run.
            dashboard = Dashboard(
                broker=broker.url,
                fleet="demo",
                fleet_dir=fleet_dir,
                port=args.dashboard_port,
            )
            url = await dashboard.start()
            console.print(
                f"dashboard: [bold]{url}[/] (open it in a browser; it stops with the demo)"
            )
            try:
                await service.run()
            finally:
                try:
                    await dashboard.stop()
                except FleetlearnError as exc:  # the page failed; the rounds' outcome stands
                    console.print(f"[yellow]dashboard stopped: {exc}[/]", soft_wrap=True)

        try:
            asyncio.run(serve())
        except RoundsAbortedError as exc:
            gave_up = str(exc)
    finally:
        sim_total = sim.stop()
        broker.close()
    elapsed = time.monotonic() - started
    closed = sum(1 for m in rows if m.get("state") == "closed")
    aborted = len(rows) - closed
    console.print(
        round_table(rows, title=f"{args.mode} rounds, {args.devices} devices, {broker.kind} broker")
    )
    recall = class_recall_line(rows)
    if recall is not None:
        console.print(recall)
    spent = cost_line(rows)
    if spent is not None:
        console.print(spent)
    report = {
        "fleet": "demo",
        "devices": args.devices,
        "cohort": args.cohort,
        "mode": args.mode,
        "broker": broker.kind,
        "processes": sim.procs,
        "data": None if args.data is None else {"file": str(args.data), "split": args.partition},
        "scenario": {
            "dropout": scenario.dropout,
            "samples": scenario.samples,
            "seed": scenario.seed,
        },
        "rounds": rows,
        "rounds_closed": closed,
        "rounds_aborted": aborted,
        "stopped": gave_up,
        "simulator": sim_total,
        "seconds": round(elapsed, 1),
        "command": " ".join(["fleetlearn", *sys.argv[1:]]) if sys.argv else "fleetlearn demo",
    }
    write_report(args.out / "report.json", report)
    write_plot(
        args.out / "report.png",
        rows,
        f"fleetlearn demo: {args.devices} devices, {args.mode}, {broker.kind}",
    )
    console.print(
        f"{closed} of {args.rounds} rounds closed, {aborted} aborted in {elapsed:.0f} s; "
        f"wrote {args.out / 'report.json'} and {args.out / 'report.png'}"
    )
    if gave_up:
        console.print(f"[red]demo stopped: {gave_up}[/]", soft_wrap=True)
    return 0 if closed == args.rounds else 1
