# The fleetlearn image used by docker-compose.yml for the aggregator and the simulator.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
# fleetlearn/ holds relative symlinks to the folders below; the wheel pip builds holds the files.
COPY fleetlearn ./fleetlearn
COPY shared ./shared
COPY transport ./transport
COPY aggregator ./aggregator
COPY device ./device
COPY firmware_sim ./firmware_sim
COPY broker ./broker
COPY dashboard ./dashboard
# The image runs the aggregator, the simulator and the dashboard: [sim] (devices, terminal view,
# plots), [privacy] (dp-accounting, for an aggregator with privacy.mechanism set) and
# [dashboard] (the web page and its Prometheus endpoint).
RUN pip install --no-cache-dir ".[sim,privacy,dashboard]"
ENTRYPOINT ["fleetlearn"]
CMD ["--help"]
