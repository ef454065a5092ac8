"""Synthetic predictive-maintenance data, generated on each simulated device and never sent.

Each example is one 0.125 s window of a rotating machine (2048 Hz vibration, plus temperature
and motor current), reduced to 16 features the way a gateway's firmware would:

    0 vib_rms      1 vib_peak      2 crest_factor   3 kurtosis      4 skewness
    5 band_1x      6 band_2x       7 band_3x        8 band_bearing  9 spectral_centroid
   10 temperature 11 temp_rise    12 current_rms   13 current_imbalance 14 current_ripple
   15 load

Classes: 0 healthy, 1 bearing_wear (impacts at the bearing defect frequency ring a structural
resonance: kurtosis, crest factor and high-band energy rise, and the bearing warms), 2 imbalance
(the 1x rotation component grows with speed squared), 3 misalignment (2x and 3x harmonics grow,
current becomes unbalanced and the coupling warms). Fault severity is drawn per window, and mild
faults overlap healthy machines, which keeps accuracy well below 100%.

Heterogeneity: machine types (pump, fan, compressor) differ in speed, resonance and baseline
levels; every machine drifts (ambient temperature, slow wear of its baseline); each site has its
own fault mix (non-IID), drawn from a Dirichlet around the fleet's mix. Everything comes from a
seed: a device's data is reproducible and never leaves the device.

Features are scaled with fixed fleet-wide calibration constants (`FEATURE_SCALE`), like a sensor
datasheet, so no statistics need to be shared between devices.

Beyond the 16 features, for the other kinds of model (docs/data.md):
- raw windows (`Machine.raw_windows`): the vibration signal itself, 256 samples per window
  divided by `RAW_SCALE`, for a 1-D convolution that learns its own features;
- run-to-failure trajectories (`Machine.run_to_failure`): one window per cycle of a machine
  whose bearing starts to wear at a random onset and fails at the end; the target is the
  remaining useful life, piecewise linear (capped at `RUL_CAP` cycles while healthy, the
  usual convention: nothing in a healthy machine's data says how long it will last), in
  units of `RUL_UNIT` cycles;
- healthy-only machines (`device_machine(..., healthy_only=True)`), the usual case for an
  anomaly detector: a plant has plenty of normal data and few labelled faults.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = ("healthy", "bearing_wear", "imbalance", "misalignment")
FEATURES = (
    "vib_rms",
    "vib_peak",
    "crest_factor",
    "kurtosis",
    "skewness",
    "band_1x",
    "band_2x",
    "band_3x",
    "band_bearing",
    "spectral_centroid",
    "temperature",
    "temp_rise",
    "current_rms",
    "current_imbalance",
    "current_ripple",
    "load",
)
N_FEATURES = len(FEATURES)
N_CLASSES = len(CLASSES)
SAMPLE_RATE = 2048.0
WINDOW = 256
RAW_SCALE = 2.0  # mm/s: raw vibration samples are divided by this, fleet-wide
RUL_CAP = 125  # cycles: the remaining-useful-life target never exceeds this
RUL_UNIT = 100.0  # cycles per unit of the target (so targets lie in 0..1.25)
HEALTHY_ONLY = np.array([1.0, 0.0, 0.0, 0.0])


@dataclass(frozen=True, slots=True)
class MachineType:
    name: str
    speed_hz: float  # shaft speed at full load
    resonance_hz: float  # structural resonance excited by bearing impacts
    base_1x: float  # healthy residual imbalance amplitude (mm/s)
    noise: float  # broadband vibration noise
    base_temp: float  # bearing temperature rise at full load (K)
    rated_current: float  # A


MACHINE_TYPES = {
    "pump": MachineType("pump", 24.5, 620.0, 0.6, 0.35, 18.0, 32.0),
    "fan": MachineType("fan", 16.0, 410.0, 0.9, 0.25, 12.0, 18.0),
    "compressor": MachineType("compressor", 49.0, 780.0, 0.5, 0.5, 26.0, 55.0),
}

# Fleet-wide fault mix before each site's skew: most windows are healthy.
FLEET_MIX = np.array([0.55, 0.15, 0.15, 0.15])

# Calibration: (offset, scale) per feature, measured once over a 24k-window fleet sample, so
# features come out with mean ~0 and std ~1 across the fleet (bench/data_calibration.py).
FEATURE_SCALE = np.array(
    [
        (0.69, 0.20),  # vib_rms (mm/s)
        (1.8, 0.38),  # vib_peak (mm/s)
        (2.6, 0.43),  # crest_factor
        (2.5, 0.46),  # kurtosis
        (0.0, 0.22),  # skewness
        (1.0, 0.33),  # band_1x (log10 energy)
        (-0.17, 0.57),  # band_2x
        (-0.77, 0.44),  # band_3x
        (0.18, 0.28),  # band_bearing
        (220.0, 124.0),  # spectral_centroid (Hz)
        (36.7, 5.7),  # temperature (C)
        (14.6, 5.7),  # temp_rise (K)
        (28.6, 13.0),  # current_rms (A)
        (0.0136, 0.0075),  # current_imbalance (fraction)
        (0.011, 0.005),  # current_ripple (fraction)
        (0.72, 0.15),  # load
    ],
    dtype=np.float64,
)


def site_mix(site_seed: int, concentration: float = 2.0) -> np.ndarray:
    """A site's fault mix: Dirichlet around FLEET_MIX; lower concentration = more non-IID."""
    rng = np.random.default_rng([site_seed, 0x5173])
    return rng.dirichlet(FLEET_MIX * concentration * len(FLEET_MIX))


@dataclass(slots=True)
class Machine:
    """One simulated machine behind one device. `windows()` draws examples as time passes."""

    machine_type: MachineType
    mix: np.ndarray  # fault-class probabilities at this machine's site
    seed: int
    ambient: float = 22.0
    drift_per_window: float = 2e-4  # slow wear of the healthy baseline
    _rng: np.random.Generator | None = None
    _age: int = 0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng([self.seed, 0xDA7A])
        # Every machine differs a little from its type's nominal values.
        jitter = self._rng.normal(1.0, 0.08, size=3)
        self.machine_type = MachineType(
            self.machine_type.name,
            self.machine_type.speed_hz * jitter[0],
            self.machine_type.resonance_hz * jitter[1],
            self.machine_type.base_1x * jitter[2],
            self.machine_type.noise,
            self.machine_type.base_temp,
            self.machine_type.rated_current,
        )

    def windows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """`n` consecutive windows: features (n, 16) float32 scaled, labels (n,) int32."""
        assert self._rng is not None
        rng = self._rng
        labels = rng.choice(N_CLASSES, size=n, p=self.mix).astype(np.int32)
        age = self._age + np.arange(n)
        self._age += n
        feats = synthesize(self.machine_type, labels, age, self.ambient, self.drift_per_window, rng)
        return scale(feats), labels

    def raw_windows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """`n` consecutive windows as raw vibration: samples (n, 256) float32 divided by
        RAW_SCALE, labels (n,) int32."""
        assert self._rng is not None
        rng = self._rng
        labels = rng.choice(N_CLASSES, size=n, p=self.mix).astype(np.int32)
        age = self._age + np.arange(n)
        self._age += n
        signal = vibration(self.machine_type, labels, age, self.drift_per_window, rng).signal
        return (signal / RAW_SCALE).astype(np.float32), labels

    def run_to_failure(self, cycles: int) -> tuple[np.ndarray, np.ndarray]:
        """One run to failure, one window per cycle: features (cycles, 16) scaled, and the
        remaining useful life (cycles,) float32 in RUL_UNIT, capped at RUL_CAP cycles.

        The bearing starts to wear at a random onset (between 30% and 70% of the run); its
        fault severity then grows quadratically to 1 at the last cycle (failure)."""
        assert self._rng is not None
        rng = self._rng
        if cycles < 2:
            raise ValueError(f"a run needs at least 2 cycles, got {cycles}")
        onset = int(cycles * rng.uniform(0.3, 0.7))
        cycle = np.arange(cycles)
        progress = np.clip((cycle - onset) / max(1, cycles - 1 - onset), 0.0, 1.0)
        severity = progress**2
        labels = np.where(cycle > onset, 1, 0).astype(np.int32)
        age = self._age + cycle
        self._age += cycles
        feats = synthesize(
            self.machine_type,
            labels,
            age,
            self.ambient,
            self.drift_per_window,
            rng,
            severity=severity,
        )
        rul = np.minimum(cycles - 1 - cycle, RUL_CAP) / RUL_UNIT
        return scale(feats), rul.astype(np.float32)


def scale(raw: np.ndarray) -> np.ndarray:
    return ((raw - FEATURE_SCALE[:, 0]) / FEATURE_SCALE[:, 1]).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Vibration:
    """Windows of vibration and the conditions that shaped them (one entry per window)."""

    signal: np.ndarray  # (n, WINDOW) mm/s
    severity: np.ndarray
    load: np.ndarray
    speed: np.ndarray
    wear: np.ndarray


def vibration(
    mt: MachineType,
    labels: np.ndarray,
    age: np.ndarray,
    drift: float,
    rng: np.random.Generator,
    severity: np.ndarray | None = None,
) -> Vibration:
    """The vibration signal of windows with the given fault labels (`severity` per window, or
    drawn per faulty window). Vectorised over windows."""
    n = labels.shape[0]
    t = np.arange(WINDOW) / SAMPLE_RATE
    if severity is None:
        severity = np.where(labels > 0, rng.beta(1.6, 2.2, size=n), 0.0)
    load = np.clip(rng.normal(0.72, 0.15, size=n), 0.25, 1.05)
    speed = mt.speed_hz * (0.85 + 0.15 * load)
    wear = 1.0 + drift * age  # healthy baseline creeps up with age
    phase = rng.uniform(0, 2 * np.pi, size=(n, 3))

    a1 = mt.base_1x * wear * (speed / mt.speed_hz) ** 2
    a1 = a1 * (1 + 2.6 * severity * (labels == 2))
    a2 = 0.18 * mt.base_1x * wear * (1 + 5.0 * severity * (labels == 3))
    a3 = 0.08 * mt.base_1x * (1 + 4.0 * severity * (labels == 3))
    w = 2 * np.pi * speed[:, None] * t[None, :]
    signal = (
        a1[:, None] * np.sin(w + phase[:, :1])
        + a2[:, None] * np.sin(2 * w + phase[:, 1:2])
        + a3[:, None] * np.sin(3 * w + phase[:, 2:3])
    )
    # Bearing impacts: a train at the outer-race defect frequency (~3.6x shaft speed), each
    # ringing the structural resonance and decaying within a few milliseconds.
    bearing = labels == 1
    if bearing.any():
        idx = np.nonzero(bearing)[0]
        bpfo = 3.6 * speed[idx]
        since = np.mod(t[None, :] * bpfo[:, None] + rng.uniform(0, 1, size=(idx.size, 1)), 1.0)
        since = since / bpfo[:, None]
        ring = np.exp(-since * 900.0) * np.sin(2 * np.pi * mt.resonance_hz * since)
        signal[idx] += (4.0 * severity[idx])[:, None] * ring
    signal += rng.normal(0, mt.noise, size=(n, WINDOW)) * wear[:, None]
    return Vibration(signal, severity, load, speed, wear)


def synthesize(
    mt: MachineType,
    labels: np.ndarray,
    age: np.ndarray,
    ambient: float,
    drift: float,
    rng: np.random.Generator,
    severity: np.ndarray | None = None,
) -> np.ndarray:
    """Raw (unscaled) features for windows with the given fault labels (`severity` per window,
    or drawn per faulty window). Vectorised over windows."""
    n = labels.shape[0]
    v = vibration(mt, labels, age, drift, rng, severity)
    signal, severity, load, speed, wear = v.signal, v.severity, v.load, v.speed, v.wear
    bearing = labels == 1

    rms = np.sqrt(np.mean(signal**2, axis=1))
    peak = np.max(np.abs(signal), axis=1)
    centred = signal - signal.mean(axis=1, keepdims=True)
    std = centred.std(axis=1) + 1e-9
    kurt = np.mean(centred**4, axis=1) / std**4
    skew = np.mean(centred**3, axis=1) / std**3
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(WINDOW), axis=1)) ** 2
    freqs = np.fft.rfftfreq(WINDOW, 1 / SAMPLE_RATE)

    def band(lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
        lo_a = np.broadcast_to(np.asarray(lo, dtype=float), (n,))[:, None]
        hi_a = np.broadcast_to(np.asarray(hi, dtype=float), (n,))[:, None]
        mask = (freqs[None, :] >= lo_a) & (freqs[None, :] < hi_a)
        return np.log10((spectrum * mask).sum(axis=1) / WINDOW + 1e-6)

    step = SAMPLE_RATE / WINDOW
    b1 = band(speed - step, speed + step)
    b2 = band(2 * speed - step, 2 * speed + step)
    b3 = band(3 * speed - step, 3 * speed + step)
    bb = band(mt.resonance_hz - 120, mt.resonance_hz + 120)
    centroid = (spectrum * freqs).sum(axis=1) / (spectrum.sum(axis=1) + 1e-12)

    ambient_now = ambient + 3.0 * np.sin(age / 5000.0) + rng.normal(0, 0.5, size=n)
    rise = mt.base_temp * load * wear
    rise = rise + 14.0 * severity * bearing + 6.0 * severity * (labels == 3)
    rise = rise + rng.normal(0, 1.5, size=n)
    temperature = ambient_now + rise
    current = mt.rated_current * (0.35 + 0.65 * load) * (1 + 0.04 * severity * (labels == 3))
    current = current + rng.normal(0, 0.6, size=n)
    imbalance = np.abs(rng.normal(0.012, 0.006, size=n)) + 0.03 * severity * (labels == 3)
    ripple = np.abs(rng.normal(0.01, 0.004, size=n)) + 0.02 * severity * (labels == 2)

    return np.stack(
        [
            rms, peak, peak / (rms + 1e-9), kurt, skew, b1, b2, b3, bb, centroid,
            temperature, rise, current, imbalance, ripple, load,
        ],
        axis=1,
    )  # fmt: skip


def device_machine(
    fleet_seed: int,
    device_index: int,
    site_index: int,
    machine_type: str,
    concentration: float = 2.0,
    *,
    healthy_only: bool = False,
) -> Machine:
    """The machine behind one simulated device, reproducible from the fleet seed;
    `healthy_only`: a machine that never shows a fault (its windows are all healthy)."""
    if machine_type not in MACHINE_TYPES:
        raise ValueError(f"unknown machine type {machine_type!r}; known: {sorted(MACHINE_TYPES)}")
    mix = HEALTHY_ONLY if healthy_only else site_mix(fleet_seed * 1000 + site_index, concentration)
    return Machine(MACHINE_TYPES[machine_type], mix, seed=fleet_seed * 1_000_003 + device_index)
