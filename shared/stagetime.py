"""Stage timing: when a round's stage may close, from durations, on one side's own clock.

What it owns: turning a round's `StageTimes` (a soft and a hard limit per stage, in seconds)
into decisions on the clock of whoever applies them (ARCHITECTURE §7):

- A stage closes when every device expected answered; after its soft limit, as soon as a
  quorum answered and closing leaves the round able to finish; at its hard limit, with
  whoever answered.
- Limits count from the moment the stage opened on the applier's clock. The aggregator opens
  the first stage with the announcement and each later one when it closes the one before. A
  device opens a stage when it receives the announcement or the aggregator message that
  opened it (roster: SHARE, share inbox: COLLECT, unmask request: UNMASK).
- Hard limits hold on both sides without synchronised clocks. A device that answered stage S
  gives up waiting for the aggregator's reply at opened(S) + hard(S) + hard(S+1) on its own
  clock: the aggregator opened S no later than the device heard of it and closes S within
  hard(S), then S+1 within hard(S+1), so a reply arriving later could only be answered late.
  A device that has not answered S yet (still training) gives up at opened(S) + hard(S).
- Soft limits may follow the fleet: `ArrivalHistory` remembers how long recent stages took
  until their last answer in time, and `adapted()` sets the next round's soft limits from
  that, never below the configured soft limit and never above the hard one: on a loaded
  machine the answers spread out, and a soft limit cut to a calm machine would drop the tail.

Pure: no clock (`now` is passed in), no I/O, no randomness.
"""

from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass, field

from fleetlearn.shared.rounds import StageTimes
from fleetlearn.shared.secagg.config import STAGES, Stage


def quorum_count(expected: int, quorum: float) -> int:
    """How many of `expected` devices are enough to close a stage after its soft limit."""
    return max(1, math.ceil(quorum * expected - 1e-9)) if expected else 0


@dataclass(frozen=True, slots=True)
class StageWindow:
    """One open stage at the aggregator, its limits as deadlines on the aggregator's clock."""

    stage: Stage
    opened: float
    soft_at: float
    hard_at: float

    @classmethod
    def open(cls, times: StageTimes, stage: Stage, now: float) -> StageWindow:
        return cls(
            stage=stage,
            opened=now,
            soft_at=now + times.soft(stage),
            hard_at=now + times.hard(stage),
        )

    def next_deadline(self, now: float) -> float:
        """When to look again without a new answer: the soft limit, then the hard one."""
        return self.soft_at if now < self.soft_at else self.hard_at

    def enough(self, now: float, *, answered: int, expected: int, quorum: float) -> bool:
        """Past the soft limit with a quorum: the stage may close now, if the round can go on
        with these answers (the caller checks that). Everyone answered, or the hard limit
        passed: the stage closes regardless."""
        return now >= self.soft_at and answered >= quorum_count(expected, quorum)


def next_stage(stage: Stage) -> Stage | None:
    i = STAGES.index(stage)
    return STAGES[i + 1] if i + 1 < len(STAGES) else None


def give_up_at(times: StageTimes, stage: Stage, opened: float, *, answered: bool) -> float:
    """When a device stops waiting in `stage`, which it saw open at `opened` (its own clock).

    `answered`: the device sent its message for `stage` and waits for the aggregator to open
    the next one; otherwise it still owes its message (e.g. training is not done)."""
    limit = opened + times.hard(stage)
    following = next_stage(stage)
    if not answered or following is None:
        return limit
    return limit + times.hard(following)


@dataclass(slots=True)
class ArrivalHistory:
    """How long recent stages took until their last answer in time.

    Per stage, the time from its opening to the last answer that arrived before it closed, for
    the last `rounds` rounds. Devices that never answered (stalled, gone) do not count: the
    history says how fast the live ones are."""

    rounds: int = 5
    _seen: dict[Stage, collections.deque[float]] = field(default_factory=dict)

    def record(self, stage: Stage, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        self._seen.setdefault(stage, collections.deque(maxlen=self.rounds)).append(seconds)

    def adapted(self, times: StageTimes, *, margin: float = 1.5) -> StageTimes:
        """`times` with each soft limit raised to `margin` times the median recent time to
        the last answer, within [configured soft, hard]. Hard limits never change: devices enforce
        them, and a round's limits are fixed by its announcement."""
        soft = {}
        for stage in STAGES:
            seen = self._seen.get(stage)
            value = times.soft(stage)
            if seen:
                value = min(times.hard(stage), max(value, margin * statistics.median(seen)))
            soft[stage.value] = value
        return StageTimes(
            **soft,
            advertise_hard=times.advertise_hard,
            share_hard=times.share_hard,
            collect_hard=times.collect_hard,
            unmask_hard=times.unmask_hard,
        )
