"""The dashboard's web side: a read-only Starlette app over a `FleetView`, and the `Feed` that
pushes the view's updates to every open page as server-sent events.

Routes (GET and HEAD only; anything else is 405):

    /              the page (static/index.html; its script and styles are static files)
    /static/...    the page's own JS and CSS, and the vendored uPlot
    /api/state     the view's snapshot as JSON (at most SNAPSHOT_DEVICES devices)
    /api/stream    server-sent events: `snapshot` first, then `update` batches
    /metrics       Prometheus text format (dashboard.prom)
    /healthz       liveness, and whether the broker connection is up

Rules:
- Read-only: no route changes anything, and the app holds no credentials to leak.
- Every response carries a Content-Security-Policy that allows only this origin's own files
  (`default-src 'self'`, so no inline script, no CDN, no framing), `nosniff`, and no referrer.
  The page writes every payload string with textContent, never as HTML: devices write them.
- With `allowed_hosts` set (the CLI sets the loopback names when it binds to loopback), a
  request naming another Host is refused: a web page elsewhere cannot rebind its own domain
  name to 127.0.0.1 and read the dashboard from the user's browser.
- A request for `/api/...` or `/metrics` that a browser marks as coming from a page of
  another site (`Sec-Fetch-Site: cross-site` or `same-site`) is refused (403): such a page
  must not make the server do the work (it could not read the answer anyway). Prometheus and
  curl send no such header; the page's own requests are `same-origin`.
- Handlers are coroutines, so they read the view on the event loop's thread, never from a
  worker thread while `ingest` changes it. The loop is also the caller's (the demo runs its
  aggregator in it), so what a client costs it is bounded: a snapshot holds at most
  SNAPSHOT_DEVICES devices and is encoded in a worker thread (the view never changes a record
  it handed out), at most MAX_PAGES streams are open (more are told 503, Retry-After), and
  an update batch holds at most BATCH_DEVICES devices (the rest go in the next batches).
- One slow page cannot hold memory or the others back: each page's queue is bounded, and a
  page that falls behind is dropped (its browser reconnects and starts from a new snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetlearn.dashboard.payloads import DashboardError
from fleetlearn.dashboard.prom import registry_for
from fleetlearn.dashboard.view import FleetView, Update

STATIC = Path(__file__).resolve().parent / "static"
SECURITY_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
BATCH_SECONDS = 0.1
QUEUE_BATCHES = 64
KEEPALIVE_SECONDS = 15.0
RECONNECT_MS = 2000  # what the browser waits before reconnecting a dropped stream
SNAPSHOT_DEVICES = 5000  # devices in a snapshot, by id (counts still tell the total)
BATCH_DEVICES = 5000  # devices in one update batch (the rest wait for the next batches)
MAX_PAGES = 32  # open event streams
PAGES_RETRY_AFTER_S = 5  # what a stream refused for MAX_PAGES is told to wait (the page does)
# Routes whose answers cost the server work (a snapshot, a scrape, a stream).
COSTLY_PATHS = ("/api/", "/metrics")
# Sec-Fetch-Site values of a request a page of another origin made the browser send.
FOREIGN_SITES = (b"cross-site", b"same-site")


def _json(data: object) -> bytes:
    # allow_nan=False: the view keeps every number finite; if a bug broke that, the request
    # fails rather than sending JSON that browsers refuse to parse.
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


def _sse(kind: str, data: object) -> bytes:
    # json.dumps escapes every line break and non-ASCII character, so the data is one line.
    return b"event: " + kind.encode() + b"\ndata: " + _json(data) + b"\n\n"


class PageLimitError(DashboardError):
    """MAX_PAGES streams are open already; the browser is told to try again later."""


class Page:
    """One open stream: its snapshot (taken when it opened, encoded by the stream, off the
    event loop) and then a bounded queue of encoded update batches."""

    def __init__(self, snapshot: dict[str, Any], size: int) -> None:
        self.snapshot: dict[str, Any] | None = snapshot
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(size)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)  # wakes a stream waiting on an empty queue


class Feed:
    """Fans the view's updates out to the open pages, in batches.

    Updates are gathered for `batch_s` and sent as one `update` event: a fleet's statuses
    change in bursts (every device after each release), and an event per change would wake
    every page thousands of times. Within a batch a later update of the same round or device
    replaces the earlier one; events keep their order (each has a `seq`, so a page that got an
    event in its snapshot skips it in the next batch). A batch holds at most `batch_devices`
    devices, the first changed first; the others stay for the next batch, which follows after
    `batch_s` (there are at most as many as the view keeps devices). At most `max_pages`
    streams are open. Call `publish` on the loop's thread."""

    def __init__(
        self,
        view: FleetView,
        *,
        batch_s: float = BATCH_SECONDS,
        queue_batches: int = QUEUE_BATCHES,
        snapshot_devices: int = SNAPSHOT_DEVICES,
        batch_devices: int = BATCH_DEVICES,
        max_pages: int = MAX_PAGES,
    ) -> None:
        self.view = view
        self.batch_s = batch_s
        self.queue_batches = queue_batches
        self.snapshot_devices = snapshot_devices
        self.batch_devices = batch_devices
        self.max_pages = max_pages
        self.pages: set[Page] = set()
        self.dropped_pages = 0
        self.broker_connected = False
        self._rounds: dict[int, dict[str, Any]] = {}
        self._devices: dict[str, dict[str, Any]] = {}
        # Bounded like the view's own list: a page needs no more than the view keeps.
        self._events: deque[dict[str, Any]] = deque(maxlen=view.max_events)
        self._flush_at: asyncio.TimerHandle | None = None

    def publish(self, updates: Iterable[Update]) -> None:
        for update in updates:
            kind = update["type"]
            if kind == "round":
                self._rounds[update["round"]["round"]] = update["round"]
            elif kind == "device":
                self._devices[update["device"]["device_id"]] = update["device"]
            elif kind == "event":
                self._events.append(update["event"])
        self._schedule()

    def set_broker_connected(self, connected: bool) -> None:
        if connected != self.broker_connected:
            self.broker_connected = connected
            self._schedule()

    def _schedule(self) -> None:
        if self._flush_at is None and self.pages:
            self._flush_at = asyncio.get_running_loop().call_later(self.batch_s, self.flush)
        elif not self.pages:
            self._clear()

    def _clear(self) -> None:
        self._rounds, self._devices = {}, {}
        self._events.clear()

    def flush(self) -> None:
        """Send what was gathered to every page; drop the pages that cannot take it."""
        if self._flush_at is not None:
            self._flush_at.cancel()  # called directly: the timer would send an empty batch
        self._flush_at = None
        devices = dict(itertools.islice(self._devices.items(), self.batch_devices))
        batch = {
            "rounds": sorted(self._rounds.values(), key=lambda r: r["round"]),
            "devices": list(devices.values()),
            "events": list(self._events),
            **self._header(),
        }
        left = {d: row for d, row in self._devices.items() if d not in devices}
        self._clear()
        if left:
            self._devices = left
            self._schedule()  # the next batch takes them
        data = _sse("update", batch)
        for page in list(self.pages):
            try:
                page.queue.put_nowait(data)
            except asyncio.QueueFull:
                self.dropped_pages += 1
                self.pages.discard(page)
                page.closed = True  # it has events queued, so it is not waiting: it will see

    def _header(self) -> dict[str, Any]:
        return {
            "counts": self.view.summary_counts(),
            "model_version": self.view.model_version(),
            "broker_connected": self.broker_connected,
        }

    def open_page(self) -> Page:
        """A new page's stream: its first event is the snapshot, taken now, so that nothing
        the view takes in afterwards is missed. Raises PageLimitError when `max_pages` are
        open."""
        if len(self.pages) >= self.max_pages:
            raise PageLimitError(f"{len(self.pages)} event streams are open already")
        snapshot = {**self.view.snapshot(device_limit=self.snapshot_devices), **self._header()}
        page = Page(snapshot, self.queue_batches)
        self.pages.add(page)
        return page

    def close_page(self, page: Page) -> None:
        self.pages.discard(page)
        page.close()

    def close(self) -> None:
        """End every stream (the server is stopping)."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        for page in list(self.pages):
            self.close_page(page)


class EventStream:
    """`/api/stream`, as a plain ASGI app: it must notice a closed connection while it waits
    for updates, and unregister the page whatever ends the stream."""

    def __init__(self, feed: Feed, keepalive_s: float = KEEPALIVE_SECONDS) -> None:
        self.feed = feed
        self.keepalive_s = keepalive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            page = self.feed.open_page()
        except PageLimitError:
            busy = PlainTextResponse(
                "too many open event streams; try again later\n",
                status_code=503,
                headers={"retry-after": str(PAGES_RETRY_AFTER_S), "cache-control": "no-store"},
            )
            await busy(scope, receive, send)
            return
        watcher = asyncio.create_task(self._watch_disconnect(receive, page))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-store"),
                        (b"x-accel-buffering", b"no"),  # a reverse proxy must not buffer it
                    ],
                }
            )
            more = scope["method"] != "HEAD"
            await self._body(send, f"retry: {RECONNECT_MS}\n\n".encode(), more)
            snapshot, page.snapshot = page.snapshot, None
            if more:
                await self._body(send, await asyncio.to_thread(_sse, "snapshot", snapshot), True)
            while more and not page.closed:
                try:
                    async with asyncio.timeout(self.keepalive_s):
                        chunk = await page.queue.get()
                except TimeoutError:
                    chunk = b": keep-alive\n\n"  # also finds out when the peer is gone
                if chunk is None or page.closed:
                    break
                await self._body(send, chunk, True)
            if more:
                await self._body(send, b"", False)
        except OSError:
            pass  # the connection is gone (uvicorn raises an OSError subclass on send)
        finally:
            watcher.cancel()
            self.feed.close_page(page)

    @staticmethod
    async def _body(send: Send, chunk: bytes, more: bool) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": more})

    @staticmethod
    async def _watch_disconnect(receive: Receive, page: Page) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                page.close()
                return


class Guard:
    """Adds the security headers to every response, refuses unknown Host names, and refuses
    the costly routes to requests another site's page made."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        if self.allowed is not None and _host_name(scope) not in self.allowed:
            refusal = PlainTextResponse("unknown Host header\n", status_code=421)
            await refusal(scope, receive, secured)
            return
        site = _header(scope, b"sec-fetch-site").strip().lower()
        if site in FOREIGN_SITES and scope["path"].startswith(COSTLY_PATHS):
            refusal = PlainTextResponse("not for pages of other sites\n", status_code=403)
            await refusal(scope, receive, secured)
            return
        await self.app(scope, receive, secured)


def _header(scope: Scope, wanted: bytes) -> bytes:
    """The first header of that (lowercase) name, or b""."""
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return bytes(value)
    return b""


def _host_name(scope: Scope) -> str:
    """The Host header without its port (and without an IPv6 address's brackets)."""
    host = _header(scope, b"host").decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(
    view: FleetView,
    *,
    feed: Feed | None = None,
    registry: CollectorRegistry | None = None,
    allowed_hosts: Sequence[str] | None = None,
    broker_connected: Callable[[], bool] | None = None,
    keepalive_s: float = KEEPALIVE_SECONDS,
) -> Starlette:
    """The dashboard's ASGI app over `view`. `feed`: the one `ingest`'s updates go to (a new
    one when None: then nothing reaches the streams but their snapshots); `registry`: the
    Prometheus registry for `/metrics` (default: one over `view`); `allowed_hosts`: Host
    names to accept (None: any); `broker_connected`: what `/healthz` reports (default: what
    the feed was told); `keepalive_s`: the longest silence on an event stream."""
    feed = feed if feed is not None else Feed(view)
    registry = registry if registry is not None else registry_for(view)
    index = (STATIC / "index.html").read_bytes()

    async def page(request: Request) -> Response:
        return Response(index, media_type="text/html; charset=utf-8")

    async def state(request: Request) -> Response:
        # Taken here, on the loop's thread; encoded in a worker thread (about 20 ms for a
        # snapshot of SNAPSHOT_DEVICES devices), while the loop goes on.
        snapshot = view.snapshot(device_limit=feed.snapshot_devices)
        return Response(
            await asyncio.to_thread(_json, snapshot),
            media_type="application/json",
            headers={"cache-control": "no-store"},
        )

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        connected = feed.broker_connected if broker_connected is None else broker_connected()
        return JSONResponse(
            {"ok": True, "fleet": view.fleet, "broker_connected": connected},
            headers={"cache-control": "no-store"},
        )

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)  # browsers ask for one; a 404 would be logged

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/favicon.ico", no_icon, methods=["GET"]),
        Route("/api/state", state, methods=["GET"]),
        Route("/api/stream", EventStream(feed, keepalive_s), methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts)
    app.state.feed = feed
    return app
