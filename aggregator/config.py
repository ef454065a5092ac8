"""The aggregator's settings: one TOML file, every key overridable by environment or CLI.

    fleetlearn aggregator --config aggregator.toml --set rounds.cohort=50
    FLEETLEARN_ROUNDS_COHORT=50 fleetlearn aggregator ...

`fleetlearn aggregator --print-config` prints the effective settings as TOML. A bad value stops
the aggregator before it connects, with one line naming the key (shared.errors.ConfigError).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from fleetlearn.aggregator import rules
from fleetlearn.aggregator.engine import EngineConfig, EngineError
from fleetlearn.shared import rounds
from fleetlearn.shared.errors import ConfigError
from fleetlearn.shared.ids import id_problem
from fleetlearn.shared.secagg.config import MAX_COHORT

T = TypeVar("T")
MAX_ROUNDS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class BrokerSection:
    url: str = "mqtt://127.0.0.1:1883"
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    ca_file: str = ""  # for mqtts:// brokers with a private CA

    def __post_init__(self) -> None:
        from fleetlearn.transport import BrokerAddress  # the one parser of broker URLs

        address = BrokerAddress.parse(self.url, key="broker.url")
        if self.ca_file and not address.tls:
            raise ConfigError("broker.ca_file", "is only used with an mqtts:// broker.url")


@dataclass(frozen=True, slots=True)
class FleetSection:
    id: str = "plant-7"
    dir: Path = Path("fleet")  # written by `fleetlearn provision`

    def __post_init__(self) -> None:
        problem = id_problem(self.id)
        if problem:
            raise ConfigError("fleet.id", problem)


@dataclass(frozen=True, slots=True)
class StateSection:
    dir: Path = Path("state")


@dataclass(frozen=True, slots=True)
class ModelSection:
    initial: str = ""  # .tflite with an embedded manifest; "" = the packaged default


@dataclass(frozen=True, slots=True)
class RoundsSection:
    count: int = 10  # rounds to close (aborted ones are retried), 0 = until stopped
    mode: Literal["secure", "plain", "async", "async-secure"] = "secure"
    cohort: int = 20
    over_select: float = 1.2
    min_cohort: int = 3
    battery_floor: float = 0.2
    wait_for_devices: float = 120.0  # seconds to wait for min_cohort eligible devices
    settle: float = 2.0  # seconds after a release before the next round (devices load it)
    interval: float = 0.0  # extra pause between rounds
    # Seconds a device that missed a stage stays out of selection unless it shows life sooner.
    stall_cooldown: float = 600.0
    # Stop after this many aborted rounds in a row (each is retried with a fresh cohort);
    # 0 = never stop, keep retrying.
    max_aborts: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.count <= MAX_ROUNDS:
            raise ConfigError("rounds.count", f"must be in 0..{MAX_ROUNDS}, got {self.count}")
        for key, size in (("rounds.cohort", self.cohort), ("rounds.min_cohort", self.min_cohort)):
            if not 1 <= size <= MAX_COHORT:
                raise ConfigError(key, f"must be in 1..{MAX_COHORT} devices, got {size}")
        if not 1.0 <= self.over_select <= 10.0:
            raise ConfigError("rounds.over_select", f"must be in 1..10, got {self.over_select}")
        if self.max_aborts < 0:
            raise ConfigError("rounds.max_aborts", f"must be >= 0, got {self.max_aborts}")
        if not 0.0 <= self.battery_floor <= 1.0:
            raise ConfigError("rounds.battery_floor", f"must be in 0..1, got {self.battery_floor}")
        for key, value in (
            ("rounds.wait_for_devices", self.wait_for_devices),
            ("rounds.settle", self.settle),
            ("rounds.interval", self.interval),
            ("rounds.stall_cooldown", self.stall_cooldown),
        ):
            if not 0.0 <= value <= 86_400:
                raise ConfigError(key, f"must be in 0..86400 seconds, got {value}")


@dataclass(frozen=True, slots=True)
class StagesSection:
    """Stage durations in seconds, each counted from the moment its stage opened: the
    announcement for ADVERTISE (and a plain round's COLLECT), the previous stage's close for
    the others. A stage closes when every device expected answered; after its soft limit
    (`advertise`, ...) as soon as `quorum` of them answered and the round can go on; at its
    hard limit (`advertise_hard`, ...) with whoever answered. Devices apply the hard limits
    too, on their own clocks. With `adapt`, the soft limits announced for a round rise with
    the fleet's recent arrival times (up to the hard limits)."""

    advertise: float = 10.0
    share: float = 10.0
    collect: float = 40.0  # includes local training
    unmask: float = 10.0
    advertise_hard: float = 30.0
    share_hard: float = 30.0
    collect_hard: float = 120.0
    unmask_hard: float = 30.0
    quorum: float = 0.8
    adapt: bool = True


@dataclass(frozen=True, slots=True)
class TrainingSection:
    """What devices do locally each round (shared.rounds.TrainingPlan says what each means).
    The defaults come from the sweep in docs/learning.md (bench/defaults_sweep.py)."""

    learning_rate: float = 0.15  # the local rate of the first round
    lr_decay: float = 1.0  # round r trains at learning_rate * lr_decay^(r-1) (releases applied)
    epochs: int = 1
    steps: int = 20  # > 0: exactly this many local optimizer steps; 0: `epochs` passes
    max_samples: int = 512
    prox_mu: float = 0.0  # FedProx proximal weight; 0 = FedAvg
    eval_fraction: float = 0.2  # of each device's rows held out for federated evaluation
    personal: str = ""  # comma-separated weight names kept on devices (personalization)
    # Off: rand-k is made unbiased (the aggregator scales its mean by d/k). Turn it on for
    # top-k, which needs it; with partial participation it slows rand-k down (the sweep).
    error_feedback: bool = False

    def __post_init__(self) -> None:
        if not 0.5 <= self.lr_decay <= 1.0:
            raise ConfigError("training.lr_decay", f"must be in [0.5, 1], got {self.lr_decay}")

    @property
    def personal_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.personal.split(",") if n.strip())


@dataclass(frozen=True, slots=True)
class EvalSection:
    """Evaluation on a test set the aggregator holds (needs a LiteRT runtime: the `device`
    extra). Devices' federated evaluation is `training.eval_fraction`."""

    data: str = ""  # .npz or .csv in the data format (docs/data.md); "" = none
    label: str = "label"  # the label column of a .csv


@dataclass(frozen=True, slots=True)
class CompressionSection:
    # Dense: every coordinate in SecAgg (the sweep in docs/learning.md). For large models,
    # rand_k with `density` cuts the upload (docs/compression.md).
    sparsity: Literal["dense", "rand_k", "top_k"] = "dense"
    density: float = 0.1
    quant_bits: int = 16
    clip: float = 0.5
    top_k_bits: int = 8


@dataclass(frozen=True, slots=True)
class SecAggSection:
    neighbours: int = 0  # 0: about 2*log2(cohort)
    threshold: int = 0  # 0: neighbours/2 + 1
    expected_dropout: float = 0.0  # >0: size k so a round aborts with probability < 1e-3

    def __post_init__(self) -> None:
        k, t = self.neighbours, self.threshold
        if k != 0 and not 2 <= k < MAX_COHORT:
            raise ConfigError("secagg.neighbours", f"must be 0 (automatic) or 2..{MAX_COHORT - 1}")
        if t == 0:
            return
        if k == 0:
            # The automatic k depends on each round's cohort; a fixed t could fall below k/2.
            raise ConfigError("secagg.threshold", "needs secagg.neighbours set as well")
        if not k // 2 < t <= k:
            raise ConfigError(
                "secagg.threshold",
                f"must be in {k // 2 + 1}..{k} for secagg.neighbours = {k}, got {t}: at or "
                "below k/2 the aggregator could collect both shares of one device",
            )


@dataclass(frozen=True, slots=True)
class AggregationSection:
    rule: Literal["mean", "median", "trimmed"] = "mean"
    trim: float = 0.2
    clip_norm: float = 0.0  # 0: no norm clipping

    def __post_init__(self) -> None:
        if self.clip_norm < 0:
            raise ConfigError("aggregation.clip_norm", f"must be >= 0, got {self.clip_norm}")


@dataclass(frozen=True, slots=True)
class ServerSection:
    # FedAvg with server momentum 0.5 (FedAvgM): the best of the sweep in docs/learning.md.
    optimizer: Literal["fedavg", "fedavgm", "fedadam"] = "fedavgm"
    lr: float = 1.0
    momentum: float = 0.5
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


@dataclass(frozen=True, slots=True)
class PrivacySection:
    """Differential privacy (docs/privacy.md says how to choose these).
    mechanism: none; distributed (secure rounds: devices clip and add integer noise before
    masking); central (plain rounds: the aggregator clips and adds Gaussian noise); local
    (plain rounds: each device clips and adds Gaussian noise to its own update)."""

    mechanism: Literal["none", "distributed", "central", "local"] = "none"
    noise_multiplier: float = 1.0  # noise standard deviation in the sum, over the clip
    clip: float = 0.1  # L2 norm each device's update is clipped to
    epsilon: float = 0.0  # the fleet's budget: no round starts past it; 0 = no budget
    delta: float = 1e-5
    # Count amplification by sampling against the budget: right only when nobody it protects
    # against sees the cohorts (the fleet's devices read every round announcement).
    amplification: bool = False


@dataclass(frozen=True, slots=True)
class FedBuffSection:
    """Asynchronous rounds (rounds.mode = "async"; FedBuff, docs/learning.md): devices train
    whenever invited and send an update tagged with the version it started from."""

    buffer: int = 10  # updates per release
    concurrency: int = 30  # devices training at once
    max_staleness: int = 8  # releases an update may lag behind when it arrives
    staleness_exponent: float = 0.5  # an update counts (1 + staleness)^-exponent


@dataclass(frozen=True, slots=True)
class AggregatorSettings:
    broker: BrokerSection = field(default_factory=BrokerSection)
    fleet: FleetSection = field(default_factory=FleetSection)
    state: StateSection = field(default_factory=StateSection)
    model: ModelSection = field(default_factory=ModelSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    stages: StagesSection = field(default_factory=StagesSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    secagg: SecAggSection = field(default_factory=SecAggSection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    server: ServerSection = field(default_factory=ServerSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    fedbuff: FedBuffSection = field(default_factory=FedBuffSection)

    def engine_config(self) -> EngineConfig:
        """The round engine's view; errors name the settings key."""
        from fleetlearn.shared import wire

        def build(section: str, cls: type[T], **values: Any) -> T:
            # The wire records validate themselves; re-key their errors to the settings key.
            try:
                return cls(**values)
            except wire.WireError as exc:
                key = f"{section}.{(exc.field or '').split('.')[-1]}"
                raise ConfigError(key, str(exc)) from None

        st = self.stages
        times = build(
            "stages",
            rounds.StageTimes,
            advertise=st.advertise,
            share=st.share,
            collect=st.collect,
            unmask=st.unmask,
            advertise_hard=st.advertise_hard,
            share_hard=st.share_hard,
            collect_hard=st.collect_hard,
            unmask_hard=st.unmask_hard,
        )
        tr = self.training
        training = build(
            "training",
            rounds.TrainingPlan,
            epochs=tr.epochs,
            max_samples=tr.max_samples,
            error_feedback=tr.error_feedback,
            learning_rate=tr.learning_rate,
            steps=tr.steps,
            prox_mu=tr.prox_mu,
            eval_fraction=tr.eval_fraction,
            personal=tr.personal_names,
        )
        c = self.compression
        if not 0.0 < c.density <= 1.0:
            raise ConfigError("compression.density", f"must be in (0, 1], got {c.density}")
        if not 1 <= c.quant_bits <= 32:
            raise ConfigError("compression.quant_bits", f"must be in 1..32, got {c.quant_bits}")
        if c.top_k_bits not in (8, 16):
            raise ConfigError("compression.top_k_bits", f"must be 8 or 16, got {c.top_k_bits}")
        if not c.clip > 0:
            raise ConfigError("compression.clip", f"must be > 0, got {c.clip}")
        if not 0.0 <= self.aggregation.trim < 0.5:
            raise ConfigError(
                "aggregation.trim", f"must be in [0, 0.5), got {self.aggregation.trim}"
            )
        k = self.secagg.neighbours
        if self.rounds.mode == "secure" and k >= self.rounds.min_cohort:
            raise ConfigError(
                "secagg.neighbours",
                f"{k} neighbours need rounds of at least {k + 1} devices; "
                f"raise rounds.min_cohort to {k + 1} or lower secagg.neighbours",
            )
        try:
            return EngineConfig(
                mode=self.rounds.mode,
                cohort=self.rounds.cohort,
                over_select=self.rounds.over_select,
                min_cohort=self.rounds.min_cohort,
                battery_floor=self.rounds.battery_floor,
                times=times,
                quorum=st.quorum,
                adapt=st.adapt,
                stall_cooldown=self.rounds.stall_cooldown,
                training=training,
                lr_decay=tr.lr_decay,
                sparsity=c.sparsity,
                density=c.density,
                quant_bits=c.quant_bits,
                clip=c.clip,
                top_k_bits=c.top_k_bits,
                neighbours=self.secagg.neighbours,
                threshold=self.secagg.threshold,
                expected_dropout=self.secagg.expected_dropout,
                rule=self.aggregation.rule,
                trim=self.aggregation.trim,
                clip_norm=self.aggregation.clip_norm,
                privacy=self.privacy.mechanism,
                dp_noise_multiplier=self.privacy.noise_multiplier,
                dp_clip=self.privacy.clip,
                dp_epsilon=self.privacy.epsilon,
                dp_delta=self.privacy.delta,
                dp_amplification=self.privacy.amplification,
                buffer=self.fedbuff.buffer,
                concurrency=self.fedbuff.concurrency,
                max_staleness=self.fedbuff.max_staleness,
                staleness_exponent=self.fedbuff.staleness_exponent,
            )
        except EngineError as exc:
            # The message names its key for engine users; the ConfigError names it once.
            key = exc.key or "rounds"
            raise ConfigError(key, str(exc).removeprefix(key).lstrip()) from None

    def optimizer_config(self) -> rules.OptimizerConfig:
        s = self.server
        return rules.OptimizerConfig(
            name=s.optimizer, lr=s.lr, momentum=s.momentum, beta1=s.beta1, beta2=s.beta2, tau=s.tau
        )
