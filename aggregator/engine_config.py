"""The round engine's settings and errors, apart from the engine so that its parts (selection,
modes, report) can read them without importing the engine.

Rules: a config that exists is consistent (`__post_init__` refuses combinations that cannot
work, naming the setting as `aggregator.config` spells it). `aggregator.config` builds one
from the service's settings; tests and the simulator build one directly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from fleetlearn.aggregator import rules
from fleetlearn.shared import rounds
from fleetlearn.shared.errors import FleetlearnError
from fleetlearn.shared.rounds import StageTimes
from fleetlearn.shared.secagg.config import MAX_COHORT


class EngineError(FleetlearnError):
    """The engine cannot do what was asked (e.g. too few eligible devices to start). `key`:
    the setting at fault, when a setting is (the aggregator reports it as that key's
    ConfigError)."""

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class NotEnoughDevicesError(EngineError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    mode: Literal["secure", "plain", "async", "async-secure"] = "secure"
    cohort: int = 20  # devices whose updates a round aims for
    over_select: float = 1.2  # select this many times `cohort` when enough are eligible
    min_cohort: int = 3
    battery_floor: float = 0.2
    times: StageTimes = field(default_factory=StageTimes)
    # After its soft limit a stage closes once this share of the devices it waits for answered.
    quorum: float = 0.8
    adapt: bool = True  # soft limits follow recent arrival times (never above the hard ones)
    stall_cooldown: float = 600.0  # seconds a stalled device stays deprioritized at most
    training: rounds.TrainingPlan = field(default_factory=rounds.TrainingPlan)
    # Round r (model version v) trains at training.learning_rate * lr_decay^(v - 1).
    lr_decay: float = 1.0
    sparsity: Literal["dense", "rand_k", "top_k"] = "rand_k"
    density: float = 0.1
    quant_bits: int = 16
    clip: float = 0.5
    top_k_bits: int = 8
    neighbours: int = 0  # 0: about 2*log2(n), or sized for expected_dropout
    threshold: int = 0  # 0: k/2 + 1
    # Share of the cohort expected to drop during a round. Above 0, an automatic k is the
    # smallest whose chance of aborting a round stays under 1e-3 (secagg.suggest_neighbours).
    expected_dropout: float = 0.0
    rule: rules.RuleName = "mean"
    trim: float = 0.2
    clip_norm: float = 0.0
    # Differential privacy (docs/privacy.md). "distributed": devices clip to `dp_clip` and add
    # Skellam noise inside secure rounds; "central": the aggregator clips each plain update to
    # `dp_clip` and adds Gaussian noise to their sum. Either way the sum carries noise of
    # standard deviation `dp_noise_multiplier` times the clip. "local": each device clips and
    # adds that much Gaussian noise to its own plain update. Cohorts are Poisson samples.
    privacy: Literal["none", "distributed", "central", "local"] = "none"
    dp_noise_multiplier: float = 1.0
    dp_clip: float = 0.1
    # No round starts that would take the run past (dp_epsilon, dp_delta); 0: no budget.
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    # Whether the budget counts amplification by sampling: only right when nobody the budget
    # protects against sees the cohorts (devices read every round's announcement).
    dp_amplification: bool = False
    # Asynchronous rounds (mode "async", FedBuff; docs/learning.md): at most `concurrency`
    # devices train at once; every `buffer` updates the aggregator applies their mean, each
    # weighted by (1 + staleness)^-staleness_exponent, where staleness is how many releases
    # came out since the version it trained from; updates staler than `max_staleness` are
    # refused. An invitation lapses after `times.collect_hard` seconds without an update.
    buffer: int = 10
    concurrency: int = 30
    max_staleness: int = 8
    staleness_exponent: float = 0.5

    @property
    def secure(self) -> bool:
        """Whether the aggregator sees only sums (SecAgg+): synchronous or asynchronous."""
        return self.mode in ("secure", "async-secure")

    @property
    def asynchronous(self) -> bool:
        return self.mode in ("async", "async-secure")

    @property
    def cost_report(self) -> bool:
        """Devices report their cost with their updates, except in private rounds: exact sums
        of CPU time over cohorts that differ by one device would tell that device's, which
        follows its sample count, outside the noise (docs/privacy.md)."""
        return self.privacy == "none"

    def plan_for(self, model_version: int) -> rounds.TrainingPlan:
        """The training plan announced for a round on `model_version`: the rate scheduled,
        and whether devices report their cost."""
        plan = dataclasses.replace(self.training, cost_report=self.cost_report)
        if self.privacy == "local":
            plan = dataclasses.replace(
                plan, local_clip=self.dp_clip, local_noise=self.dp_noise_multiplier
            )
        if self.lr_decay == 1.0:
            return plan
        rate = plan.learning_rate * self.lr_decay ** (model_version - 1)
        return dataclasses.replace(plan, learning_rate=max(rate, 1e-6))

    def __post_init__(self) -> None:
        if not 0.5 <= self.lr_decay <= 1.0:
            raise EngineError(
                f"training.lr_decay must be in [0.5, 1], got {self.lr_decay}",
                key="training.lr_decay",
            )
        if self.min_cohort < (3 if self.secure else 1):
            raise EngineError(
                f"rounds.min_cohort must be >= 3 in secure mode, got {self.min_cohort}",
                key="rounds.min_cohort",
            )
        if self.cohort < self.min_cohort:
            raise EngineError(
                f"rounds.cohort {self.cohort} is below rounds.min_cohort {self.min_cohort}",
                key="rounds.cohort",
            )
        if not 0.0 <= self.expected_dropout < 1.0:
            raise EngineError(
                f"secagg.expected_dropout must be in [0, 1), got {self.expected_dropout}",
                key="secagg.expected_dropout",
            )
        if self.over_select < 1.0:
            raise EngineError(
                f"rounds.over_select must be >= 1, got {self.over_select}", key="rounds.over_select"
            )
        if not 0.0 < self.quorum <= 1.0:
            raise EngineError(
                f"stages.quorum must be in (0, 1], got {self.quorum}", key="stages.quorum"
            )
        if not 0.0 <= self.stall_cooldown <= 86_400:
            raise EngineError(
                f"rounds.stall_cooldown must be in 0..86400 seconds, got {self.stall_cooldown}",
                key="rounds.stall_cooldown",
            )
        if self.secure and self.sparsity == "top_k":
            raise EngineError(
                "compression.sparsity top_k cannot be masked (each device picks its own "
                "coordinates); use rand_k or dense in secure mode",
                key="compression.sparsity",
            )
        if self.sparsity == "top_k" and not self.training.error_feedback:
            raise EngineError(
                "training.error_feedback must be true with compression.sparsity top_k: top-k "
                "drops the same small coordinates round after round, and only error feedback "
                "sends them later (unlike rand_k, it cannot be rescaled to be unbiased)",
                key="training.error_feedback",
            )
        self._check_privacy()
        self._check_async()
        if self.secure and self.rule != "mean":
            raise EngineError(
                f"aggregation.rule {self.rule!r} needs individual updates; secure mode only "
                "sees their sum, so it supports 'mean' only",
                key="aggregation.rule",
            )

    def _check_async(self) -> None:
        if not 1 <= self.buffer <= 100_000:
            raise EngineError(
                f"fedbuff.buffer must be in 1..100000, got {self.buffer}", key="fedbuff.buffer"
            )
        if not self.buffer <= self.concurrency <= 100_000:
            raise EngineError(
                f"fedbuff.concurrency must be in fedbuff.buffer ({self.buffer})..100000 (fewer "
                f"devices training than the buffer holds would never fill it), got "
                f"{self.concurrency}",
                key="fedbuff.concurrency",
            )
        if not 0 <= self.max_staleness <= 10_000:
            raise EngineError(
                f"fedbuff.max_staleness must be in 0..10000, got {self.max_staleness}",
                key="fedbuff.max_staleness",
            )
        if not 0.0 <= self.staleness_exponent <= 10.0:
            raise EngineError(
                f"fedbuff.staleness_exponent must be in [0, 10], got {self.staleness_exponent}",
                key="fedbuff.staleness_exponent",
            )
        if self.mode == "async-secure" and self.buffer < 3:
            raise EngineError(
                f"fedbuff.buffer must be >= 3 in async-secure mode (a secure sum of fewer "
                f"updates would reveal too much), got {self.buffer}",
                key="fedbuff.buffer",
            )
        if self.mode == "async-secure":
            group = max(self.buffer, math.ceil(self.buffer * self.over_select))
            if group > MAX_COHORT:
                raise EngineError(
                    f"fedbuff.buffer * rounds.over_select makes secure groups of {group} "
                    f"devices; SecAgg+ takes at most {MAX_COHORT}",
                    key="fedbuff.buffer",
                )
            if self.neighbours and self.neighbours >= self.buffer:
                raise EngineError(
                    f"secagg.neighbours {self.neighbours} needs groups of at least "
                    f"{self.neighbours + 1} survivors; raise fedbuff.buffer to "
                    f"{self.neighbours + 1} or lower secagg.neighbours",
                    key="secagg.neighbours",
                )
        if self.mode == "async-secure" and self.training.error_feedback:
            raise EngineError(
                "training.error_feedback must be false in async-secure mode: a held update "
                "may go into a later group than the one it was first offered to",
                key="training.error_feedback",
            )
        if self.asynchronous and self.sparsity == "top_k":
            raise EngineError(
                "compression.sparsity top_k is not supported in async rounds (use dense or rand_k)",
                key="compression.sparsity",
            )

    def _check_privacy(self) -> None:
        if self.privacy == "none":
            if self.dp_epsilon:
                raise EngineError(
                    "privacy.epsilon is a budget for noisy rounds: set privacy.mechanism too",
                    key="privacy.epsilon",
                )
            return
        want = {"distributed": "secure", "central": "plain", "local": "plain"}[self.privacy]
        if self.mode != want:
            raise EngineError(
                f"privacy.mechanism {self.privacy} runs in {want} rounds, not {self.mode} "
                "(distributed noise needs secure aggregation; central noise is added by the "
                "aggregator to updates it sees; local noise protects each update on its own, "
                "so masking it adds nothing)",
                key="privacy.mechanism",
            )
        if self.privacy == "local" and self.training.error_feedback:
            raise EngineError(
                "training.error_feedback must be false with privacy.mechanism local: a device "
                "would carry what it did not send, noise included, into later updates",
                key="training.error_feedback",
            )
        if self.privacy == "central" and (self.rule != "mean" or self.clip_norm):
            raise EngineError(
                "privacy.mechanism central clips with privacy.clip and needs aggregation.rule "
                "mean without aggregation.clip_norm (a robust rule's sensitivity is not bounded "
                "by the clip)",
                key="aggregation.rule",
            )
        if self.sparsity == "top_k":
            raise EngineError(
                "compression.sparsity top_k picks coordinates from the data; with privacy use "
                "dense or rand_k (its coordinates come from the public round seed)",
                key="compression.sparsity",
            )
        checks = (
            ("privacy.noise_multiplier", self.dp_noise_multiplier, 0.01, 1000.0),
            ("privacy.clip", self.dp_clip, 1e-6, 1e6),
            ("privacy.delta", self.dp_delta, 1e-15, 0.1),
        )
        for key, value, low, high in checks:
            if not (isinstance(value, int | float) and low <= value <= high):
                raise EngineError(f"{key} must be in [{low}, {high}], got {value!r}", key=key)
        if not (isinstance(self.dp_epsilon, int | float) and 0.0 <= self.dp_epsilon <= 1000.0):
            raise EngineError(
                f"privacy.epsilon must be in [0, 1000] (0: no budget), got {self.dp_epsilon!r}",
                key="privacy.epsilon",
            )
