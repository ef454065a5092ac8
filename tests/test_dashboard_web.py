"""The dashboard served over HTTP: /metrics against the table of docs/dashboard.md, the state,
the event stream, the headers, the page's assets, the command line, and (the acceptance test)
the page in a real headless Chromium while a fleet runs rounds over mosquitto.

Servers run on free loopback ports; nothing waits for a fixed time except the browser test's
bound (each round's accuracy on the page within 2 s of the summary reaching another
subscriber).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetlearn.broker import provision as prov
from fleetlearn.cli import main
from fleetlearn.dashboard.app import LOOPBACK_HOSTS, Feed, PageLimitError, create_app
from fleetlearn.dashboard.service import WebServer
from fleetlearn.dashboard.view import FleetView
from fleetlearn.shared import topics, wire
from fleetlearn.transport import BrokerAddress, Incoming
from tests.conftest import require_mosquitto
from tests.test_dashboard_view import event, health, js, status, summary

ROOT = Path(__file__).resolve().parent.parent
FLEET = "plant-7"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Nothing but the kernel's proxy-free loopback: an http_proxy in the environment must not
# carry these requests elsewhere.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


async def fetch(
    url: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    def get() -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, method=method, headers=headers or {})
        try:
            with _OPENER.open(request, timeout=20) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    return await asyncio.to_thread(get)


@contextlib.asynccontextmanager
async def served(
    view: FleetView, *, feed: Feed | None = None, **options: Any
) -> AsyncIterator[tuple[str, Feed]]:
    """The app over `view` (and `feed`, default a new one) on a free loopback port; yields
    its URL and feed."""
    feed = Feed(view) if feed is None else feed
    web = WebServer(create_app(view, feed=feed, **options), "127.0.0.1", 0, on_stop=feed.close)
    task = asyncio.create_task(web.serve())
    await web.wait_started(task)
    try:
        yield web.url, feed
    finally:
        web.stop()
        await task
        web.close()


# ------------------------------------------------------------------------------ /metrics


def documented_series() -> dict[str, dict[str, str]]:
    """The series table of docs/dashboard.md: name -> type, label, present."""
    text = (ROOT / "docs" / "dashboard.md").read_text()
    section = text.split("## Prometheus series", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, dict[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"`fleetlearn_[a-z_]+`", cells[0]):
            label = re.match(r"`([a-z_]+)`", cells[2])
            rows[cells[0].strip("`")] = {
                "type": cells[1],
                "label": label.group(1) if label else "",
                "present": cells[3],
            }
    return rows


def scrape(text: str) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Samples by name (then by their one label's value, "" without labels), and types."""
    samples: dict[str, dict[str, float]] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert len(s.labels) <= 1, s
            samples.setdefault(s.name, {})[next(iter(s.labels.values()), "")] = s.value
            types[s.name] = family.type
    return samples, types


def test_documented_series_parse() -> None:
    rows = documented_series()
    assert len(rows) >= 20
    assert rows["fleetlearn_rounds_total"] == {
        "type": "counter",
        "label": "state",
        "present": "always",
    }
    assert rows["fleetlearn_privacy_epsilon_budget"]["present"] == "budget"


PRIVACY = {"mechanism": "distributed", "released": True, "noise_multiplier": 1.0,
           "sampling_rate": 1.0, "rounds_charged": 1, "epsilon_amplified": 0.5,
           "epsilon_cohort_known": 0.5, "epsilon": 0.5, "amplification": False,
           "delta": 1e-5, "epsilon_budget": None}  # fmt: skip
SECURE_STAGES = {
    name: {"expected": 4, "arrived": 4 - (name == "collect"), "late": 0,
           "dropped": int(name == "collect"), "not_needed": 0, "closed_by": "quorum",
           "seconds": seconds}
    for name, seconds in (("advertise", 0.5), ("share", 0.75), ("collect", 2.0), ("unmask", 0.25))
}  # fmt: skip


def feed_sequence(view: FleetView) -> None:
    """Three rounds (the newest secure, with privacy and a budget), a replay, three devices,
    one garbage message."""
    view.ingest(METRICS_T, js(summary(1, privacy=PRIVACY, accuracy=0.5, mean_loss=0.9)), 1.0)
    aborted = summary(2, state="aborted", survivors=0, accuracy=None, mean_loss=None, cost=None,
                      uplink_bytes_per_device=500, new_version=None)  # fmt: skip
    view.ingest(METRICS_T, js(aborted), 2.0)
    newest = summary(
        3,
        mode="secure",
        survivors=3,
        stragglers=1,
        dropouts_recovered=1,
        accuracy=0.8125,
        mean_loss=0.4,
        uplink_bytes_per_device=2000,
        downlink_bytes_per_device=800,
        stages=SECURE_STAGES,
        privacy={**PRIVACY, "epsilon": 1.25, "rounds_charged": 2, "epsilon_budget": 8.0},
        cost={"devices": 3, "cpu_s": 3.0, "bytes_up": 6000.0, "bytes_down": 3200.0,
              "energy_j": 12.0},
    )  # fmt: skip
    view.ingest(METRICS_T, js(newest), 3.0)
    view.ingest(METRICS_T, js(newest), 4.0)  # the retained summary again, on a reconnect
    view.ingest(status_t("dev-0001"), status("dev-0001"), 5.0)
    view.ingest(status_t("dev-0002"), status("dev-0002", eligibility=wire.Eligibility.BUSY), 5.0)
    will = status("dev-0003", online=False, eligibility=wire.Eligibility.OFFLINE)
    view.ingest(status_t("dev-0003"), will, 5.0)
    view.ingest(health_t("dev-0001"), health("dev-0001"), 6.0)
    view.ingest(EVENTS_T, event("round_started", cohort=4, mode="secure"), 6.0)
    view.ingest(METRICS_T, b"{not json", 7.0)


METRICS_T = f"fl/{FLEET}/metrics"
EVENTS_T = f"fl/{FLEET}/events"


def status_t(dev: str) -> str:
    return topics.status(FLEET, dev)


def health_t(dev: str) -> str:
    return topics.health(FLEET, dev)


async def test_metrics_are_exactly_the_documented_series_with_their_values() -> None:
    view = FleetView(FLEET)
    feed_sequence(view)
    async with served(view) as (url, _):
        code, headers, body = await fetch(url + "metrics")
    assert code == 200
    assert headers["content-type"].startswith("text/plain")
    samples, types = scrape(body.decode())
    documented = documented_series()
    assert set(samples) == set(documented), set(samples) ^ set(documented)
    for name, row in documented.items():
        assert types[name] == row["type"], name
        labels = set(samples[name])
        assert (labels == {""}) == (row["label"] == ""), (name, labels)

    def one(name: str) -> float:
        return samples[name][""]

    assert samples["fleetlearn_rounds_total"] == {"closed": 2, "aborted": 1, "refused": 0}
    assert one("fleetlearn_round") == 3
    assert one("fleetlearn_model_version") == 4
    assert one("fleetlearn_round_accuracy") == 0.8125
    assert one("fleetlearn_round_loss") == 0.4
    assert one("fleetlearn_round_survivors") == 3
    assert one("fleetlearn_round_cohort") == 4
    assert one("fleetlearn_round_stragglers") == 1
    assert one("fleetlearn_round_duration_seconds") == 2.25
    assert samples["fleetlearn_stage_seconds"] == {
        "advertise": 0.5,
        "share": 0.75,
        "collect": 2.0,
        "unmask": 0.25,
    }
    assert samples["fleetlearn_stage_dropped"] == {
        "advertise": 0,
        "share": 0,
        "collect": 1,
        "unmask": 0,
    }
    assert one("fleetlearn_dropouts_recovered_total") == 1
    # Per device bytes times the devices they are per: survivors up (the cohort for the
    # aborted round, which had none), the cohort down.
    assert one("fleetlearn_uplink_bytes_total") == 1000 * 4 + 500 * 4 + 2000 * 3
    assert one("fleetlearn_downlink_bytes_total") == 400 * 4 + 400 * 4 + 800 * 4
    assert one("fleetlearn_device_cpu_seconds_total") == 2.0 + 3.0
    assert one("fleetlearn_device_bytes_up_total") == 4000 + 6000
    assert one("fleetlearn_device_bytes_down_total") == 1600 + 3200
    assert one("fleetlearn_device_energy_joules_total") == 8 + 12
    assert samples["fleetlearn_devices"] == {"online": 2, "offline": 1, "eligible": 1}
    assert one("fleetlearn_privacy_epsilon") == 1.25
    assert one("fleetlearn_privacy_epsilon_budget") == 8.0
    rejected = samples["fleetlearn_dashboard_rejected_total"]
    assert rejected["bad_json"] == 1
    assert sum(rejected.values()) == 1
    assert "internal_error" in rejected  # every reason is a series, also at zero


async def test_metrics_of_a_new_dashboard_are_the_always_present_series() -> None:
    view = FleetView(FLEET)
    async with served(view) as (url, _):
        samples, _types = scrape((await fetch(url + "metrics"))[2].decode())
        always = {n for n, row in documented_series().items() if row["present"] == "always"}
        assert set(samples) == always
        # An aborted round: the round gauges appear, its missing figures as NaN; no privacy.
        aborted = summary(1, state="aborted", survivors=0, accuracy=None, mean_loss=None)
        view.ingest(METRICS_T, js(aborted), 1.0)
        samples, _types = scrape((await fetch(url + "metrics"))[2].decode())
    present = {n for n, row in documented_series().items() if row["present"] != "privacy"}
    assert set(samples) == present - {"fleetlearn_privacy_epsilon_budget"}
    assert math.isnan(samples["fleetlearn_round_accuracy"][""])
    assert samples["fleetlearn_round"][""] == 1


# ---------------------------------------------------------------- state, headers, assets


async def test_state_and_healthz() -> None:
    view = FleetView(FLEET)
    feed_sequence(view)
    async with served(view) as (url, feed):
        code, headers, body = await fetch(url + "api/state")
        assert code == 200
        assert headers["content-type"] == "application/json"
        assert headers["cache-control"] == "no-store"
        state = json.loads(body)
        assert state == json.loads(json.dumps(view.snapshot()))
        assert [r["round"] for r in state["rounds"]] == [1, 2, 3]
        assert [d["device_id"] for d in state["devices"]] == ["dev-0001", "dev-0002", "dev-0003"]
        assert state["counts"]["rejected"]["bad_json"] == 1
        feed.set_broker_connected(True)
        code, _, body = await fetch(url + "healthz")
    assert code == 200
    assert json.loads(body) == {"ok": True, "fleet": FLEET, "broker_connected": True}


async def test_state_holds_at_most_the_snapshot_devices() -> None:
    """/api/state once encoded every device (30 MB at 100,000, on the event loop): now the
    first devices by id, as many as a stream's snapshot; the counts tell how many there are."""
    view = FleetView(FLEET)
    feed_sequence(view)
    async with served(view, feed=Feed(view, snapshot_devices=2)) as (url, _):
        code, _, body = await fetch(url + "api/state")
    assert code == 200
    state = json.loads(body)
    assert [d["device_id"] for d in state["devices"]] == ["dev-0001", "dev-0002"]
    assert state["counts"]["devices"] == 3
    assert state == json.loads(json.dumps(view.snapshot(device_limit=2)))


async def test_costly_routes_refuse_requests_that_pages_of_other_sites_made() -> None:
    """A browser marks a request a page made with Sec-Fetch-Site; a page of another site (or
    another port of the same host, `same-site`) must not make the server take snapshots,
    scrapes or streams. Prometheus and curl send no such header; a user's own navigation is
    `none`, the page's own requests `same-origin`."""
    view = FleetView(FLEET)
    feed_sequence(view)
    async with served(view, allowed_hosts=LOOPBACK_HOSTS) as (url, feed):
        for site in ("cross-site", "same-site", "Cross-Site"):
            for path in ("api/state", "api/stream", "metrics"):
                code, headers, _ = await fetch(url + path, headers={"Sec-Fetch-Site": site})
                assert code == 403, (site, path)
                assert_secured(headers, f"{site} {path}")
            # The page itself may be linked from anywhere; it costs nothing.
            for path in ("", "healthz", "static/dashboard.js"):
                code, _, _ = await fetch(url + path, headers={"Sec-Fetch-Site": site})
                assert code == 200, (site, path)
        assert not feed.pages
        for site in ("same-origin", "none", None):
            headers = {} if site is None else {"Sec-Fetch-Site": site}
            for path in ("api/state", "metrics"):
                code, _, _ = await fetch(url + path, headers=headers)
                assert code == 200, (site, path)
            code, _, _ = await fetch(url + "api/stream", method="HEAD", headers=headers)
            assert code == 200, site


def assert_secured(headers: dict[str, str], what: str) -> None:
    csp = headers.get("content-security-policy", "")
    assert "default-src 'self'" in csp, what
    assert "frame-ancestors 'none'" in csp, what
    assert headers.get("x-content-type-options") == "nosniff", what
    assert headers.get("referrer-policy") == "no-referrer", what


async def test_every_response_carries_the_security_headers_and_only_get_is_served() -> None:
    view = FleetView(FLEET)
    async with served(view, allowed_hosts=LOOPBACK_HOSTS) as (url, _):
        for path, code, kind in [
            ("", 200, "text/html"),
            ("api/state", 200, "application/json"),
            ("metrics", 200, "text/plain"),
            ("healthz", 200, "application/json"),
            ("static/dashboard.js", 200, "text/javascript"),
            ("static/dashboard.css", 200, "text/css"),
            ("static/uPlot.iife.min.js", 200, "text/javascript"),
            ("static/uPlot.min.css", 200, "text/css"),
            ("static/uPlot.LICENSE.txt", 200, "text/plain"),
            ("no-such-page", 404, ""),
            ("static/../view.py", 404, ""),
        ]:
            got, headers, _ = await fetch(url + path)
            assert got == code, path
            assert headers.get("content-type", "").startswith(kind), path
            assert_secured(headers, path)
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            for path in ("", "api/state", "metrics", "api/stream", "static/dashboard.js"):
                got, headers, _ = await fetch(url + path, method=method)
                assert got == 405, (method, path)
                assert_secured(headers, f"{method} {path}")
        # A name that is not loopback (DNS rebinding) is refused; localhost is fine.
        port = url.rsplit(":", 1)[1].rstrip("/")
        got, headers, _ = await fetch(url + "api/state", headers={"Host": "attacker.example"})
        assert got == 421
        assert_secured(headers, "refused host")
        got, _, _ = await fetch(url + "api/state", headers={"Host": f"localhost:{port}"})
        assert got == 200
        got, _, _ = await fetch(url + "healthz", headers={"Host": f"[::1]:{port}"})
        assert got == 200


async def test_the_page_and_its_assets_name_no_other_origin() -> None:
    """Every asset is served by the app itself; the page has no inline script or style and its
    own script never writes HTML (payload strings come from devices)."""
    view = FleetView(FLEET)
    async with served(view) as (url, _):
        _, _, html_bytes = await fetch(url)
        html = html_bytes.decode()
        linked = re.findall(r'(?:src|href)="([^"]+)"', html)
        assets = [u for u in linked if u.endswith((".js", ".css"))]
        assert sorted(assets) == [
            "/static/dashboard.css",
            "/static/dashboard.js",
            "/static/uPlot.iife.min.js",
            "/static/uPlot.min.css",
        ]
        assert all(u.startswith("/") and not u.startswith("//") for u in linked), linked
        bodies = {"/": html}
        for asset in assets:
            code, _, body = await fetch(url + asset.lstrip("/"))
            assert code == 200, asset
            bodies[asset] = body.decode()
        code, _, license_text = await fetch(url + "static/uPlot.LICENSE.txt")
        assert code == 200
        assert b"MIT License" in license_text
        assert b"1.6.32" in license_text
    for name, text in bodies.items():
        # uPlot's minified file opens with its license comment, which names its home page.
        without_license = re.sub(r"/\*!.*?\*/", "", text, flags=re.S)
        assert not re.search(r"https?://", without_license, re.I), name
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    assert len(scripts) == 2
    assert all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
    assert "<style" not in html
    assert not re.search(r"\sstyle=|\son[a-z]+=", html)
    script = re.sub(r"^\s*//.*$", "", bodies["/static/dashboard.js"], flags=re.M)  # comments
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


# ---------------------------------------------------------------------------- the stream


async def _read_event(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The next server-sent block: (event name or ":" for a comment, data)."""
    async with asyncio.timeout(20):
        block = (await reader.readuntil(b"\n\n")).decode()
    if block.startswith(":"):
        return ":", block
    fields = dict(line.split(": ", 1) for line in block.strip().split("\n"))
    return fields.get("event", ""), fields.get("data", fields.get("retry", ""))


async def _request_stream(
    url: str,
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """GET /api/stream; the response's head (status line and headers), and the connection."""
    address = BrokerAddress.parse(url.replace("http://", "mqtt://").rstrip("/"))
    reader, writer = await asyncio.open_connection(address.host, address.port)
    # HTTP/1.0: the body then comes as it is, without chunked framing, until the server closes.
    writer.write(
        b"GET /api/stream HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(20):
        head = await reader.readuntil(b"\r\n\r\n")
    return head, reader, writer


async def _open_stream(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    head, reader, writer = await _request_stream(url)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"text/event-stream" in head
    assert b"default-src 'self'" in head
    assert b"chunked" not in head.lower()
    return reader, writer


async def _read_data_event(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The next server-sent block that is not a comment (a keep-alive may come first when the
    machine is slow)."""
    while True:
        kind, data = await _read_event(reader)
        if kind != ":":
            return kind, data


async def test_stream_sends_a_snapshot_then_batches_then_keepalives() -> None:
    view = FleetView(FLEET)
    view.ingest(METRICS_T, js(summary(1)), 1.0)
    async with served(view, keepalive_s=0.3) as (url, feed):
        reader, writer = await _open_stream(url)
        try:
            assert await _read_event(reader) == ("", "2000")  # retry: 2000
            kind, data = await _read_event(reader)
            assert kind == "snapshot"
            snapshot = json.loads(data)
            assert [r["round"] for r in snapshot["rounds"]] == [1]
            assert snapshot["broker_connected"] is False
            # Two updates of one device and a round within one batch: the device once, the
            # newest; then an event.
            feed.publish(view.ingest(status_t("dev-0001"), status("dev-0001", battery=0.9), 2))
            feed.publish(view.ingest(status_t("dev-0001"), status("dev-0001", battery=0.8), 3))
            feed.publish(view.ingest(METRICS_T, js(summary(2)), 3.0))
            feed.publish(view.ingest(EVENTS_T, event("round_closed", survivors=4), 3.0))
            kind, data = await _read_data_event(reader)
            assert kind == "update"
            batch = json.loads(data)
            assert [d["battery"] for d in batch["devices"]] == [0.8]
            assert [r["round"] for r in batch["rounds"]] == [2]
            assert [e["event"] for e in batch["events"]] == ["round_closed"]
            assert batch["counts"]["devices"] == 1
            assert batch["model_version"] == 3
            # Nothing more to say: keep-alive comments, and no other event.
            for _ in range(2):
                kind, data = await _read_event(reader)
                assert (kind, data) == (":", ": keep-alive\n\n")
            assert len(feed.pages) == 1
        finally:
            writer.close()
        # The closed connection is noticed and the page forgotten.
        async with asyncio.timeout(20):
            while feed.pages:  # noqa: ASYNC110 - the server's stream task clears it
                await asyncio.sleep(0.05)


async def test_a_page_that_falls_behind_is_dropped() -> None:
    view = FleetView(FLEET)
    feed = Feed(view, queue_batches=2)
    slow = feed.open_page()  # never read
    fast = feed.open_page()
    for r in range(1, 4):
        feed.publish(view.ingest(METRICS_T, js(summary(r)), float(r)))
        feed.flush()
        fast.queue.get_nowait()
    assert slow.closed
    assert slow not in feed.pages
    assert fast in feed.pages
    assert feed.dropped_pages == 1
    while not fast.queue.empty():  # a stream that kept up now waits for updates
        fast.queue.get_nowait()
    feed.close()
    assert fast.closed
    assert fast.queue.get_nowait() is None  # which wakes it


async def test_streams_beyond_the_limit_are_told_to_come_back_later() -> None:
    view = FleetView(FLEET)
    feed = Feed(view, max_pages=2)
    async with served(view, feed=feed) as (url, _):
        streams = [await _open_stream(url) for _ in range(2)]
        try:
            head, reader, writer = await _request_stream(url)
            try:
                assert head.startswith(b"HTTP/1.1 503"), head
                assert b"\r\nretry-after: 5\r\n" in head
                assert b"default-src 'self'" in head
                async with asyncio.timeout(20):
                    assert b"too many" in await reader.read()  # and the server closes it
            finally:
                writer.close()
            with pytest.raises(PageLimitError):
                feed.open_page()
            assert len(feed.pages) == 2
        finally:
            for _, writer in streams:
                writer.close()
        async with asyncio.timeout(20):
            while feed.pages:  # noqa: ASYNC110 - the server's stream tasks clear it
                await asyncio.sleep(0.05)
        reader, writer = await _open_stream(url)  # a closed stream frees its place
        try:
            assert (await _read_event(reader))[0] == ""  # retry: 2000
            assert (await _read_event(reader))[0] == "snapshot"
        finally:
            writer.close()


async def test_an_update_batch_holds_at_most_batch_devices() -> None:
    """A release makes every device's status change at once: 100,000 devices in one batch
    would be one 30 MB event. The rest go in the next batches, the first changed first."""
    view = FleetView(FLEET)
    feed = Feed(view, batch_devices=2, batch_s=0.01)
    page = feed.open_page()
    devices = [f"dev-000{i}" for i in range(1, 6)]
    for dev in devices:
        feed.publish(view.ingest(status_t(dev), status(dev), 1.0))
    feed.publish(view.ingest(METRICS_T, js(summary(1)), 1.0))
    feed.publish(view.ingest(status_t("dev-0001"), status("dev-0001", battery=0.5), 2.0))
    batches = []
    async with asyncio.timeout(20):
        while sum(len(b["devices"]) for b in batches) < len(devices):
            data = await page.queue.get()
            assert data is not None
            batches.append(json.loads(data.decode().split("data: ", 1)[1]))
    assert [[d["device_id"] for d in b["devices"]] for b in batches] == [
        ["dev-0001", "dev-0002"],
        ["dev-0003", "dev-0004"],
        ["dev-0005"],
    ]
    assert batches[0]["devices"][0]["battery"] == 0.5  # the newest of that device
    assert [[r["round"] for r in b["rounds"]] for b in batches] == [[1], [], []]
    assert all(b["counts"]["devices"] == 5 for b in batches)
    feed.close()


# ------------------------------------------------------------------------- command line

BAD_FLAGS = [
    (["--broker", "http://x"], "--broker"),
    (["--fleet", "bad/fleet"], "fleet id"),
    (["--port", "70000"], "outside"),
    (["--host", "no such host!"], "neither an IP address"),
    (["--fleet", "plant-8"], "--fleet"),
    (["--fleet-dir", "{tmp}/missing"], "missing"),
    (["--ca-file", "/etc/hostname"], "--ca-file"),
    (["--allowed-host", "evil.example:80"], "not a host name"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD_FLAGS, ids=[c[1] for c in BAD_FLAGS])
def test_bad_flags_are_one_line_and_exit_2(
    fleet_dir: Path,
    tmp_path: Path,
    argv: list[str],
    needle: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = {"--broker": "mqtt://127.0.0.1:1", "--fleet": FLEET, "--fleet-dir": str(fleet_dir)}
    given = dict(zip(argv[::2], (a.format(tmp=tmp_path) for a in argv[1::2]), strict=True))
    args = [x for pair in {**base, **given}.items() for x in pair]
    code: int | str | None
    try:
        code = main(["dashboard", *args])
    except SystemExit as exc:  # argparse refused the flag itself
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err


async def _start_command(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    """`fleetlearn dashboard ...` in a process of its own; returns it and its page's URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetlearn", "dashboard", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        line = (await proc.stdout.readline()).decode()
    match = re.search(r" at (http://\S+/) ", line)
    assert match, line
    return proc, match.group(1)


async def _stop_command(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode(), err.decode()


async def test_command_warns_off_loopback_serves_and_stops_on_ctrl_c(fleet_dir: Path) -> None:
    # No broker listens on port 1: the page serves anyway and says the broker is down.
    proc, url = await _start_command(
        "--broker", "mqtt://127.0.0.1:1", "--fleet", FLEET, "--fleet-dir", str(fleet_dir),
        "--host", "0.0.0.0", "--port", "0",
    )  # fmt: skip
    try:
        port = int(url.rsplit(":", 1)[1].rstrip("/"))
        code, _, body = await fetch(f"http://127.0.0.1:{port}/healthz")
        assert code == 200
        assert json.loads(body)["broker_connected"] is False
    finally:
        out, err = await _stop_command(proc)
    assert "dashboard stopped" in out
    assert "no authentication" in err
    assert "reverse proxy with TLS and authentication" in err
    assert "ssh -L" in err


async def test_command_on_another_loopback_address_answers_at_its_url(fleet_dir: Path) -> None:
    """127.0.0.2 is loopback too: the URL the command prints must answer, not 421."""
    proc, url = await _start_command(
        "--broker", "mqtt://127.0.0.1:1", "--fleet", FLEET, "--fleet-dir", str(fleet_dir),
        "--host", "127.0.0.2", "--port", "0", "--allowed-host", "dashboard.example",
    )  # fmt: skip
    try:
        assert re.fullmatch(r"http://127\.0\.0\.2:\d+/", url), url
        port = url.rsplit(":", 1)[1].rstrip("/")
        for host in (f"127.0.0.2:{port}", f"localhost:{port}", "dashboard.example"):
            code, _, _ = await fetch(url + "healthz", headers={"Host": host})
            assert code == 200, host
        code, _, _ = await fetch(url + "healthz", headers={"Host": "attacker.example"})
        assert code == 421
    finally:
        _out, err = await _stop_command(proc)
    assert "no authentication" not in err  # loopback: no warning


async def test_dashboard_on_another_loopback_address_answers_at_its_url(fleet_dir: Path) -> None:
    from fleetlearn.dashboard.service import Dashboard

    dashboard = Dashboard(
        broker="mqtt://127.0.0.1:1", fleet=FLEET, fleet_dir=fleet_dir, host="127.0.0.2", port=0
    )
    url = await dashboard.start()
    try:
        assert (await fetch(url + "healthz"))[0] == 200
        code, _, _ = await fetch(url + "healthz", headers={"Host": "attacker.example"})
        assert code == 421
    finally:
        await dashboard.stop()


async def test_serving_leaves_the_process_signal_handlers_alone() -> None:
    """uvicorn installs its own SIGINT and SIGTERM handlers while it serves (an undocumented
    hook, `capture_signals`, that service._Server overrides): the CLI's and the demo's Ctrl-C
    handling would be gone. A uvicorn that renames the hook fails here."""
    watched = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.getsignal(sig) for sig in watched}
    async with served(FleetView(FLEET)) as (url, _):
        assert (await fetch(url + "healthz"))[0] == 200
        during = {sig: signal.getsignal(sig) for sig in watched}
    assert during == before
    assert {sig: signal.getsignal(sig) for sig in watched} == before


# ------------------------------------------------------------- in the caller's event loop


@pytest.mark.broker
async def test_dashboard_in_the_callers_loop_reads_the_broker(
    mosquitto: Any, fleet_dir: Path
) -> None:
    """What `fleetlearn demo --dashboard` runs: start() returns the URL, the view fills from
    the broker (retained messages included), stop() ends it all."""
    import aiomqtt

    from fleetlearn.dashboard.service import Dashboard

    agg = prov.load_aggregator(fleet_dir)
    dev = prov.load_device(fleet_dir / "devices" / "dev-0001")
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, username=agg.username, password=agg.password
    ) as client:
        await client.publish(topics.metrics(FLEET), js(summary(4)), qos=1, retain=True)
    dashboard = Dashboard(broker=mosquitto.url, fleet=FLEET, fleet_dir=fleet_dir, port=0)
    url = await dashboard.start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
        async with aiomqtt.Client(
            mosquitto.host, mosquitto.port, username=dev.username, password=dev.password
        ) as client:
            await client.publish(status_t("dev-0001"), status("dev-0001"), qos=1, retain=True)
        async with asyncio.timeout(30):
            while True:
                state = json.loads((await fetch(url + "api/state"))[2])
                health_ = json.loads((await fetch(url + "healthz"))[2])
                if state["devices"] and state["rounds"] and health_["broker_connected"]:
                    break
                await asyncio.sleep(0.05)
        assert [r["round"] for r in state["rounds"]] == [4]  # the retained summary
        assert state["devices"][0]["device_id"] == "dev-0001"
        assert dashboard.failed is None
    finally:
        await dashboard.stop()
    with pytest.raises(urllib.error.URLError):  # nothing listens there any more
        await fetch(url + "healthz")


@pytest.mark.broker
async def test_dashboard_refused_by_the_broker_says_so(
    mosquitto: Any, fleet_dir: Path, tmp_path: Path
) -> None:
    from fleetlearn.dashboard.service import Dashboard
    from fleetlearn.transport import LinkAuthError

    wrong = tmp_path / "fleet"
    shutil.copytree(fleet_dir, wrong)
    (wrong / "dashboard" / "password").write_text("not-the-password\n")
    dashboard = Dashboard(broker=mosquitto.url, fleet=FLEET, fleet_dir=wrong, port=0)
    await dashboard.start()
    with pytest.raises(LinkAuthError, match="refused 'dashboard'"):
        async with asyncio.timeout(30):
            await dashboard.wait()  # it ends by itself
    assert isinstance(dashboard.failed, LinkAuthError)
    with pytest.raises(LinkAuthError):
        await dashboard.stop()


async def test_a_taken_port_is_one_clear_error(fleet_dir: Path) -> None:
    from fleetlearn.dashboard.payloads import DashboardError
    from fleetlearn.dashboard.service import Dashboard

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        dashboard = Dashboard(
            broker="mqtt://127.0.0.1:1", fleet=FLEET, fleet_dir=fleet_dir, port=port
        )
        with pytest.raises(DashboardError, match=f"cannot listen on 127.0.0.1:{port}"):
            await dashboard.start()


@pytest.mark.broker
def test_command_refused_by_the_broker_is_one_line_and_exit_2(
    mosquitto: Any, fleet_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "fleet"
    shutil.copytree(fleet_dir, wrong)
    (wrong / "dashboard" / "password").write_text("not-the-password\n")
    argv = ["--broker", mosquitto.url, "--fleet", FLEET, "--fleet-dir", str(wrong), "--port", "0"]
    assert main(["dashboard", *argv]) == 2
    err = capsys.readouterr().err
    assert "refused 'dashboard'" in err
    assert len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------ the acceptance test


def require_chromium() -> Any:
    """Playwright's async API, with Debian's Chromium at CHROMIUM. Under CI a missing browser
    fails the test (scripts/bootstrap installs it); elsewhere it is skipped."""
    problem = None
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        problem = f"{CHROMIUM} is missing (apt-get install chromium; scripts/bootstrap does)"
    try:
        from playwright import async_api
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[dev]')"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return async_api


def _fixed(value: float, digits: int) -> str:
    """JavaScript's toFixed: the exact binary value rounded half up."""
    return str(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def page_joules(value: float) -> str:
    """The page's energy format (dashboard.js `joules`)."""
    if value >= 1e6:
        return _fixed(value / 1e6, 2) + " MJ"
    if value >= 1e3:
        return _fixed(value / 1e3, 2) + " kJ"
    return _fixed(value, 2 if value < 10 else 1) + " J"


# Installed in the page before its own script: notes, on the page's clock (Date.now(), the
# machine's clock, like the watcher's time.time()), when each round's accuracy cell first
# appears, and what it said. The test loop can lag on a loaded machine; this does not.
SHOWN_AT_SCRIPT = """
window.__shownAt = {};
new MutationObserver(() => {
  for (const td of document.querySelectorAll('#rounds tr[data-round] td[data-field="accuracy"]')) {
    const round = td.parentElement.dataset.round;
    if (!(round in window.__shownAt)) {
      window.__shownAt[round] = {ms: Date.now(), text: td.textContent};
    }
  }
}).observe(document, {childList: true, subtree: true});
"""


def page_percent(fraction: float) -> str:
    """The page's accuracy format (dashboard.js `percent`): JavaScript's toFixed(1) rounds
    the exact binary value, ties away from zero."""
    exact = Decimal(fraction * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{exact} %"


@pytest.mark.broker
@pytest.mark.slow
async def test_browser_shows_each_round_within_two_seconds(tmp_path: Path) -> None:
    require_mosquitto()
    pw = require_chromium()
    from fleetlearn.transport.mqtt import Link
    from tests.fleet_harness import fleet

    rounds = 3
    async with fleet(tmp_path, 4) as h:
        assert h.broker is not None
        # A second subscriber notes when each new summary reaches a client of the broker.
        published: dict[int, tuple[float, dict[str, Any]]] = {}
        arrived: collections.defaultdict[int, asyncio.Event] = collections.defaultdict(
            asyncio.Event
        )

        def on_summary(msg: Incoming) -> None:
            if not msg.retain:
                data = json.loads(msg.payload)
                published.setdefault(data["round"], (time.time(), data))
                arrived[data["round"]].set()

        watcher = Link(
            BrokerAddress.parse(h.broker.url),
            client_id=prov.SIMULATOR_USER,
            username=prov.SIMULATOR_USER,
            password=(h.fleet_dir / "simulator" / "password").read_text().strip(),
            subscriptions=(topics.metrics(h.fleet),),
            persistent=False,
            on_message=on_summary,
        )
        watching = asyncio.create_task(watcher.run())
        proc, url = await _start_command(
            "--broker", h.broker.url, "--fleet", h.fleet, "--fleet-dir", str(h.fleet_dir),
            "--port", "0",
        )  # fmt: skip
        try:
            async with asyncio.timeout(30):
                await watcher.connected.wait()
            h.start_devices()
            async with pw.async_playwright() as p:
                context = await p.chromium.launch_persistent_context(
                    str(tmp_path / "chromium-profile"),  # a fresh user data directory
                    executable_path=CHROMIUM,
                    headless=True,
                    args=CHROMIUM_ARGS,
                )
                try:
                    page = context.pages[0] if context.pages else await context.new_page()
                    problems: list[str] = []
                    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
                    page.on(
                        "console",
                        lambda m: problems.append(m.text) if m.type == "error" else None,
                    )
                    await page.add_init_script(SHOWN_AT_SCRIPT)
                    await page.goto(url)
                    await page.wait_for_selector('#stream-state[data-state="open"]')
                    await page.wait_for_selector('#broker-state[data-state="connected"]')
                    # Secure rounds (SecAgg+, the default mode): all four stages on the page.
                    settings = {
                        "rounds.count": str(rounds),
                        "rounds.mode": "secure",
                        "rounds.settle": "0.5",
                    }
                    aggregator = asyncio.create_task(h.run_aggregator(timeout=150, **settings))
                    shown: dict[int, float] = {}
                    for r in range(1, rounds + 1):
                        row = f'#rounds tr[data-round="{r}"] td[data-field="accuracy"]'
                        await page.wait_for_function(
                            "r => r in window.__shownAt", arg=str(r), timeout=120_000
                        )
                        first = await page.evaluate("r => window.__shownAt[r]", str(r))
                        shown[r] = first["ms"] / 1000
                        async with asyncio.timeout(10):  # the watcher may be a moment later
                            await arrived[r].wait()
                        when, data = published[r]
                        assert data["state"] == "closed", data
                        assert first["text"] == page_percent(data["accuracy"])
                        assert await page.text_content(row) == page_percent(data["accuracy"])
                        assert shown[r] - when < 2.0, (r, shown[r] - when)
                        # The devices' cost reports: summed on `metrics` (the secure sum of
                        # every survivor's report) and shown with the round.
                        cost = data["cost"]
                        assert cost["devices"] == data["survivors"], cost
                        assert cost["cpu_s"] > 0, cost
                        assert cost["bytes_down"] > 0, cost
                        assert cost["energy_j"] > 0, cost
                        energy = f'#rounds tr[data-round="{r}"] td[data-field="cost_energy_j"]'
                        assert await page.text_content(energy) == page_joules(cost["energy_j"])
                    _service, summaries = await aggregator
                    assert [s.round_id for s in summaries] == list(range(1, rounds + 1))
                    # The tiles show the newest round, the device table the fleet.
                    tile = page.locator("#round-accuracy")
                    await page.wait_for_selector(f'#round-accuracy[data-round="{rounds}"]')
                    assert await tile.text_content() == page_percent(
                        published[rounds][1]["accuracy"]
                    )
                    await page.wait_for_function(
                        "n => document.querySelectorAll('#devices tr[data-device]').length >= n",
                        arg=len(h.devices),
                    )
                    listed = await page.eval_on_selector_all(
                        "#devices tr[data-device]", "rows => rows.map(r => r.dataset.device)"
                    )
                    assert sorted(listed) == sorted(h.devices)
                    await page.wait_for_selector('#devices tr[data-online="true"]')
                    # The fleet's cost so far: the sum over the rounds' summaries.
                    total = sum(published[r][1]["cost"]["energy_j"] for r in published)
                    await page.wait_for_function(
                        "text => document.getElementById('cost-energy').textContent === text",
                        arg=page_joules(total),
                    )
                    await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
                    if os.environ.get("FLEETLEARN_SCREENSHOT") == "1":
                        shutil.copy(tmp_path / "dashboard.png", ROOT / "docs" / "dashboard.png")
                    assert not problems, problems
                finally:
                    await context.close()
        finally:
            await _stop_command(proc)
            await watcher.close()
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
    print(
        "page behind the metrics subscriber (s): "
        + ", ".join(f"round {r}: {shown[r] - published[r][0]:.3f}" for r in sorted(shown))
    )
