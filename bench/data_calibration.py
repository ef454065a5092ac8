"""Measure the raw feature statistics behind firmware_sim.data.FEATURE_SCALE.

    python bench/data_calibration.py

Prints mean and standard deviation of every raw feature over 60 machines x 400 windows
(20 of each machine type, 5 sites), next to the calibration constants in use.
"""

from __future__ import annotations

import numpy as np

from fleetlearn.firmware_sim.data import FEATURE_SCALE, FEATURES, MACHINE_TYPES, device_machine


def main() -> None:
    raw = []
    for i, name in enumerate(list(MACHINE_TYPES) * 20):
        machine = device_machine(3, i, i % 5, name)
        scaled, _ = machine.windows(400)
        raw.append(scaled.astype(np.float64) * FEATURE_SCALE[:, 1] + FEATURE_SCALE[:, 0])
    data = np.concatenate(raw)
    print("command: python bench/data_calibration.py")
    print(f"{'feature':18s} {'mean':>10s} {'std':>10s} {'offset':>10s} {'scale':>10s}")
    for name, mu, sd, (off, sc) in zip(
        FEATURES, data.mean(0), data.std(0), FEATURE_SCALE, strict=True
    ):
        print(f"{name:18s} {mu:10.4g} {sd:10.4g} {off:10.4g} {sc:10.4g}")


if __name__ == "__main__":
    main()
