"""The round protocol as one table: every message of a round, its stage, topic and direction.

What it owns: `ROUTES`, the only place that says which message travels on which topic kind, in
which stage, which way, in which round mode, whether the broker retains it and how long an
MQTT 5 broker keeps it. Every side derives its round vocabulary from it: the engine (what
type to decode from a device topic, which stage it answers, where its own messages go), the
SecAgg+ state machines (which message each stage takes or opens), the device participant
(the topic and expiry of each message it sends, which aggregator message opens which stage),
the simulator (which topics a stage's dropout silences). `shared.topics` owns the syntax of
topics and the broker ACL's sets; `tests/test_protocol.py` holds them to this table.

Rules:
- Stages run in the order of `STAGES` (shared.secagg.config). A mode runs the stages its
  uplink rows name: secure rounds (synchronous or asynchronous) ADVERTISE, SHARE, COLLECT,
  UNMASK; plain rounds (synchronous or asynchronous) only COLLECT.
- An uplink row is what a device answers a stage with, on a topic under its own id; each
  device topic kind carries exactly one message type, so the topic says what to decode.
- A downlink row with a stage is the aggregator's message that opens that stage on the
  device (a device counts the stage's limits from its arrival); without one it starts
  (announcement) or ends (abort) the round.
Pure data: no I/O, no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fleetlearn.shared import wire
from fleetlearn.shared.rounds import PlainUpdate, RoundAnnounce, RoundMode
from fleetlearn.shared.secagg import messages as sm
from fleetlearn.shared.secagg.config import STAGES, Stage
from fleetlearn.shared.topics import Kind

# Seconds an MQTT 5 broker keeps an undelivered round message: nobody needs it later.
ROUND_MESSAGE_EXPIRY = 600


class Direction(enum.Enum):
    UP = "up"  # a device to the aggregator, on a topic under the device's own id
    DOWN = "down"  # the aggregator to one device (its inbox), the cohort or the fleet


SECURE = frozenset({RoundMode.SECURE, RoundMode.ASYNC_SECURE})  # SecAgg+ stages
PLAIN = frozenset({RoundMode.PLAIN, RoundMode.ASYNC})  # plain updates
ANY_MODE = SECURE | PLAIN


@dataclass(frozen=True, slots=True)
class Route:
    stage: Stage | None  # up: the stage it answers; down: the stage it opens (None: see rules)
    kind: Kind
    message: type[wire.Message]
    direction: Direction
    modes: frozenset[RoundMode]
    retained: bool = False
    expiry: int | None = ROUND_MESSAGE_EXPIRY


_UP, _DOWN = Direction.UP, Direction.DOWN

ROUTES: tuple[Route, ...] = (
    # stage          topic kind       message           way    modes     retained / expiry
    Route(None, Kind.ROUND, RoundAnnounce, _DOWN, ANY_MODE, retained=True, expiry=None),
    Route(Stage.ADVERTISE, Kind.ADVERTISE, sm.Advertise, _UP, SECURE),
    Route(Stage.SHARE, Kind.INBOX, sm.Roster, _DOWN, SECURE),
    Route(Stage.SHARE, Kind.SHARES, sm.Shares, _UP, SECURE),
    Route(Stage.COLLECT, Kind.INBOX, sm.ShareInbox, _DOWN, SECURE),
    Route(Stage.COLLECT, Kind.MASKED, sm.MaskedInput, _UP, SECURE),
    Route(Stage.COLLECT, Kind.UPDATE, PlainUpdate, _UP, PLAIN),
    Route(Stage.UNMASK, Kind.SURVIVORS, sm.UnmaskRequest, _DOWN, SECURE),
    Route(Stage.UNMASK, Kind.UNMASK, sm.Unmask, _UP, SECURE),
    Route(None, Kind.SURVIVORS, sm.Abort, _DOWN, SECURE),
)

# ------------------------------------------------------------------------------ derived views

STAGE_INDEX: dict[Stage, int] = {stage: i for i, stage in enumerate(STAGES)}
ROUTE_OF: dict[type[wire.Message], Route] = {r.message: r for r in ROUTES}
# Device topic kind -> the one message it carries.
UPLINK: dict[Kind, Route] = {r.kind: r for r in ROUTES if r.direction is _UP}
# Device message -> the stage it answers.
ANSWERS: dict[type[wire.Message], Stage] = {
    r.message: r.stage for r in ROUTES if r.direction is _UP and r.stage is not None
}
# Aggregator message -> the stage it opens on the device.
OPENS: dict[type[wire.Message], Stage] = {
    r.message: r.stage for r in ROUTES if r.direction is _DOWN and r.stage is not None
}


def stages(mode: RoundMode) -> tuple[Stage, ...]:
    """The stages a round of `mode` runs, in order."""
    answered = {r.stage for r in ROUTES if r.direction is _UP and mode in r.modes}
    return tuple(s for s in STAGES if s in answered)


def answer(stage: Stage, mode: RoundMode) -> type[wire.Message]:
    """What a device sends in `stage` of a `mode` round."""
    for r in ROUTES:
        if r.direction is _UP and r.stage is stage and mode in r.modes:
            return r.message
    raise KeyError(f"{mode.value} rounds have no {stage.value} stage")


def opener(stage: Stage) -> type[wire.Message] | None:
    """The aggregator message that opens `stage` on a device (None: the announcement)."""
    return next((m for m, s in OPENS.items() if s is stage), None)


def downlink(kind: Kind) -> tuple[type[wire.Message], ...]:
    """What the aggregator may send on a round topic of `kind`, in protocol order."""
    return tuple(r.message for r in ROUTES if r.direction is _DOWN and r.kind is kind)


def uplink_kinds(stage: Stage) -> tuple[Kind, ...]:
    """The device topics that answer `stage` (one per mode that runs it)."""
    return tuple(r.kind for r in ROUTES if r.direction is _UP and r.stage is stage)


def _check() -> None:
    """The rules the docstring states, checked once at import: a wrong row fails loudly."""
    kinds = [r.kind for r in ROUTES if r.direction is _UP]
    if len(kinds) != len(set(kinds)):
        raise RuntimeError("protocol: a device topic kind carries more than one message type")
    if len(ROUTE_OF) != len(ROUTES):
        raise RuntimeError("protocol: a message type has more than one route")
    if any(r.stage is None for r in ROUTES if r.direction is _UP):
        raise RuntimeError("protocol: every uplink message answers a stage")


_check()
