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
# The image runs the aggregator and the simulator: [sim] (devices, terminal view, plots) and
# [privacy] (dp-accounting, for an aggregator with privacy.mechanism set).
RUN pip install --no-cache-dir ".[sim,privacy]"
ENTRYPOINT ["fleetlearn"]
CMD ["--help"]
