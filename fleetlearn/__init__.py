"""fleetlearn: federated learning for industrial IoT fleets over MQTT.

One namespace for the whole distribution. The sides live in top-level folders of the
repository (`shared/`, `transport/`, `aggregator/`, `device/`, `broker/`, `firmware_sim/`,
`dashboard/`) and import as `fleetlearn.shared`, `fleetlearn.aggregator`, ...: in a checkout,
this folder holds a relative symlink to each of them; a built wheel holds the files themselves
under `fleetlearn/`, so nothing but `fleetlearn` lands top-level in site-packages.

Importing this package imports nothing else: a gateway that needs only `fleetlearn.device`
never loads the aggregator, the broker runner or the simulator. `fleetlearn.cli` is the
`fleetlearn` command.
"""
