# The fleetlearn image used by docker-compose.yml for the aggregator and the simulator.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md fleetlearn.py ./
COPY shared ./shared
COPY aggregator ./aggregator
COPY device ./device
COPY firmware_sim ./firmware_sim
COPY broker ./broker
RUN pip install --no-cache-dir ".[device]"
ENTRYPOINT ["fleetlearn"]
CMD ["--help"]
