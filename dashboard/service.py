"""The running dashboard: one MQTT link feeding a `FleetView`, and the web app serving it, in
the caller's event loop.

What it owns: `Dashboard` (start/stop or `run()`, for `fleetlearn dashboard` and for the
demo, which runs it beside its own fleet) and `serve()`, the same until cancelled.

Rules:
- It connects as the read-only `dashboard` user (its password from the fleet directory) and
  subscribes to `shared.topics.dashboard_filters`: the JSON topics and the devices' statuses,
  never round traffic. The link reconnects by itself with jittered backoff (transport.mqtt);
  the broker then replays the retained messages, which the view takes as replays.
- The web server is uvicorn, run on a socket bound here first: a taken port is one clear
  error before anything starts, and port 0 picks a free one (`url` tells which). uvicorn's
  own signal handlers are left out: the process that runs the dashboard owns Ctrl-C.
- One `TaskGroup` holds the named loops (http, mqtt, link state); when one fails (the broker
  refused the credentials) the others stop and its error is raised alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

from fleetlearn.dashboard.app import LOOPBACK_HOSTS, Feed, create_app
from fleetlearn.dashboard.payloads import DashboardError
from fleetlearn.dashboard.prom import registry_for
from fleetlearn.dashboard.view import FleetView
from fleetlearn.shared import fleetdir, topics
from fleetlearn.shared.errors import FleetlearnError
from fleetlearn.transport import BrokerAddress, Connector, Endpoint, Incoming, Transport

log = logging.getLogger("fleetlearn.dashboard")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050
LINK_POLL_SECONDS = 0.5
GRACEFUL_SHUTDOWN_SECONDS = 3


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers (it installs them in `capture_signals`,
    and re-raises a caught signal when it stops): the CLI and the demo handle Ctrl-C
    themselves and stop the server through `should_exit`.

    Private API: uvicorn's documentation shows running it in an existing loop as
    `Server(config)` and `await server.serve()`; what this class relies on beyond that is
    uvicorn's implementation: the `capture_signals` context manager (since 0.29.0,
    "cooperative signal handling"), `startup(sockets=...)` and the `should_exit` flag. It was
    tested with uvicorn 0.55.0 only; pyproject.toml should hold uvicorn to the versions
    tested. tests/test_dashboard_web.py checks that serving leaves the process's
    signal handlers alone, so a uvicorn that renames the hook fails there, not at a user's
    Ctrl-C."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()  # uvicorn itself only sets a flag (`started`)


class WebServer:
    """uvicorn serving an ASGI app in the caller's event loop, on a socket bound when this is
    made (so `url` is known, and a taken port is an error, before anything runs).

    `serve()` runs until `stop()`; it is meant for a task group. uvicorn stops cleanly only
    through `should_exit` (a cancelled `serve()` leaves its connections open), so uvicorn runs
    in a task of its own that a cancellation of `serve()` turns into a clean stop."""

    def __init__(
        self, app: ASGIApp, host: str, port: int, *, on_stop: Callable[[], None] | None = None
    ) -> None:
        self.sock = _bind(host, port)
        self.url = _url(host, self.sock.getsockname()[1])
        self._on_stop = on_stop
        self.server = _Server(
            uvicorn.Config(
                app,
                lifespan="off",
                log_config=None,  # leave the process's logging alone
                access_log=False,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            )
        )

    async def serve(self) -> None:
        task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="uvicorn")
        try:
            await asyncio.shield(task)
        finally:
            self.stop()
            await task

    async def wait_started(self, serving: asyncio.Task[None]) -> None:
        """Until the server accepts connections (or `serving`, its task, ended)."""
        listening = asyncio.create_task(self.server.listening.wait())
        try:
            await asyncio.wait({serving, listening}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()

    def stop(self) -> None:
        """Stop serving: open event streams end first (`on_stop`), or uvicorn would wait
        for them."""
        if self._on_stop is not None:
            self._on_stop()
        self.server.should_exit = True

    def close(self) -> None:
        self.sock.close()


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def loopback_names(host: str) -> tuple[str, ...]:
    """The Host names a dashboard listening on loopback `host` answers to: the loopback names,
    and `host` itself (127.0.0.2 is loopback too, and the URL printed names it)."""
    name = host.strip().lower()
    return LOOPBACK_HOSTS if name in LOOPBACK_HOSTS else (*LOOPBACK_HOSTS, name)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise DashboardError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def _one_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to raise for a failed task group: the first deliberate one, when there is
    one (the CLI prints it as one line), else the group."""
    for member in group.exceptions:
        exc = _one_error(member) if isinstance(member, BaseExceptionGroup) else member
        if isinstance(exc, FleetlearnError):
            return exc
    return group


class Dashboard:
    """The dashboard in the caller's event loop.

    `url = await start()` binds and connects and returns the page's address (give `port=0`
    for any free port); `await stop()` ends it; `async with` is start/stop. `run()` serves in
    the calling task until `request_stop()`, for a process that serves nothing else (the
    CLI). One use per object."""

    def __init__(
        self,
        *,
        broker: str | BrokerAddress,
        fleet: str,
        fleet_dir: Path | str,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        allowed_hosts: Sequence[str] | None = (),
        ca_file: str | None = None,
        connector: Connector | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`allowed_hosts`: Host header names the app accepts; `()` (default): the loopback
        names and `host` when `host` is loopback, else any; None: any. `connector`: how to reach the
        broker (default: MQTT to `broker`; tests may pass an in-memory one)."""
        self.address = broker if isinstance(broker, BrokerAddress) else BrokerAddress.parse(broker)
        self.fleet = topics.check_id(fleet, "fleet id")
        self.password = fleetdir.dashboard_password(fleet_dir)
        self.host = host
        self.port = port
        if allowed_hosts == ():
            allowed_hosts = loopback_names(host) if is_loopback(host) else None
        self.view = FleetView(self.fleet)
        self.feed = Feed(self.view)
        self.registry = registry_for(self.view)
        self.app = create_app(
            self.view, feed=self.feed, registry=self.registry, allowed_hosts=allowed_hosts
        )
        if connector is None:
            from fleetlearn.transport.mqtt import connector as mqtt_connector

            connector = mqtt_connector(self.address, ca_file=ca_file)
        self._connector = connector
        self._clock = clock
        self.url = ""
        self.link: Transport | None = None
        self._stop = asyncio.Event()
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._internal_errors = 0

    # ---------------------------------------------------------------------------- control

    async def start(self) -> str:
        """Bind, connect and serve in a background task; return the page's URL once it can
        be loaded. Raises what stopped it from starting (a taken port: DashboardError)."""
        self._task = asyncio.create_task(self.run(), name="dashboard")
        listening = asyncio.create_task(self._listening.wait())
        try:
            await asyncio.wait({self._task, listening}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()
        if self._task.done():
            self._task.result()  # raises its error
            raise DashboardError("the dashboard stopped before it listened")
        return self.url

    def request_stop(self) -> None:
        """Ask `run()` to end (from a signal handler, say); `stop()` also waits for it."""
        self._stop.set()

    async def stop(self) -> None:
        """End the dashboard started by `start()` and wait until it has; raises the error
        that had ended it early, if one did (the broker refused the credentials, say)."""
        self.request_stop()
        await self.wait()

    async def wait(self) -> None:
        """Wait until the dashboard started by `start()` ends (by `stop()`, or by itself on an
        error, which this raises)."""
        task = self._task
        if task is not None:
            await asyncio.wait({task})
            if not task.cancelled():
                task.result()

    @property
    def failed(self) -> BaseException | None:
        """The error that ended a started dashboard early (None while it runs)."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    async def __aenter__(self) -> Dashboard:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def run(self, on_listening: Callable[[str], None] | None = None) -> None:
        """Serve until `request_stop()` (or cancellation); `on_listening(url)` once the page
        can be loaded. Raises the error that ended it, e.g. LinkAuthError."""
        web = WebServer(self.app, self.host, self.port, on_stop=self.feed.close)
        self.url = web.url
        link = self._connector(
            Endpoint(
                client_id=fleetdir.DASHBOARD_USER,  # brokers bind it to the username anyway
                username=fleetdir.DASHBOARD_USER,
                password=self.password,
                subscriptions=topics.dashboard_filters(self.fleet),
                persistent=False,  # on reconnect the retained messages are the state
                on_message=self._on_message,
            )
        )
        self.link = link
        try:
            async with asyncio.TaskGroup() as tasks:
                http = tasks.create_task(web.serve(), name="dashboard-http")
                mqtt = tasks.create_task(link.run(), name="dashboard-mqtt")
                state = tasks.create_task(self._watch_link(link), name="dashboard-link")
                await web.wait_started(http)
                self._listening.set()
                log.info("dashboard for fleet %s at %s reads %s", self.fleet, self.url, link.peer)
                if on_listening is not None:
                    on_listening(self.url)
                await self._stop.wait()
                web.stop()
                await link.close()
                mqtt.cancel()
                state.cancel()
        except BaseExceptionGroup as group:
            raise _one_error(group) from None
        finally:
            web.close()

    # ---------------------------------------------------------------------------- loops

    async def _watch_link(self, link: Transport) -> None:
        """Tell the pages whether the broker connection is up (the link has no callback for
        a lost connection; a poll twice a second is cheap)."""
        while True:
            self.feed.set_broker_connected(link.connected.is_set())
            await asyncio.sleep(LINK_POLL_SECONDS)

    def _on_message(self, msg: Incoming) -> None:
        updates = self.view.ingest(msg.topic, msg.payload, self._clock(), retained=msg.retain)
        self.feed.publish(updates)
        errors = self.view.rejected["internal_error"]
        if errors != self._internal_errors:
            self._internal_errors = errors
            log.warning(
                "dashboard: dropped a message on %s: %s", msg.topic, self.view.last_internal_error
            )


async def serve(
    *,
    broker: str,
    fleet: str,
    fleet_dir: Path | str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    ca_file: str | None = None,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Run a dashboard until cancelled; `on_listening(url)` once the page can be loaded."""
    dashboard = Dashboard(
        broker=broker, fleet=fleet, fleet_dir=fleet_dir, host=host, port=port, ca_file=ca_file
    )
    await dashboard.run(on_listening=on_listening)
