"""The fleet's web dashboard and Prometheus endpoint (`fleetlearn dashboard`, docs/dashboard.md).

It reads topics only: the read-only `dashboard` user's JSON topics and device statuses
(`shared.topics.dashboard_filters`), through `transport`; it imports no side (aggregator,
device, broker, simulator), which the import contracts in pyproject.toml check.

    payloads   each dashboard topic's payload, checked into a bounded record (untrusted input)
    view       FleetView: the sans-IO fold of those records into rounds, devices, events
    prom       the Prometheus collector over a view (`fleetlearn_*` series)
    app        the read-only Starlette app: the page, its static files, state, events, metrics
    service    Dashboard: the MQTT link and uvicorn in the caller's event loop
    cli        `fleetlearn dashboard`

Importing this package imports nothing else; the web stack comes with the `dashboard` extra.
"""
