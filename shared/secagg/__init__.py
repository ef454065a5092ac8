"""Sans-IO SecAgg+ (Bell et al. 2020; k = n - 1 is Bonawitz et al. 2017): the aggregator
learns the sum of the survivors' quantized updates and metric sums, nothing per device.

What this package owns and how it is split (ARCHITECTURE §5, docs/secagg.md):

    config        SecAggConfig (a wire.record), StageDeadlines, Stage, sizing rules, and
                  PrivacyFloor (a device's own minimums, never from the announcement)
    keys          X25519 / Ed25519 / HKDF / ChaCha20-Poly1305, one label per purpose; graph
                  draws, their tickets and the ring seed
    prg           mask expansion: ChaCha20 keystream into preallocated buffers
    shamir        sharing whole 32-byte secrets over GF(2^521 - 1)
    graph         the neighbour ring over the advertisers, seeded by all their draws
    packing       exactly b bits per coordinate on the wire
    contribution  update + FedAvg weight + metrics -> Z_2^b, and the result's decoding
    messages      the wire messages (tags "secagg.*")
    client        SecAggClient: one device's state machine
    server        SecAggServer: the aggregator's state machine, Outbound
    harness       InMemoryRound: a whole round over a dict of queues (tests, bench)
    errors        SecAggError and its subclasses

Rules for all of it: no sockets, no clock reads (time comes in as `now`), no global RNG
(randomness is an injected byte source; `keys.system_random` is the OS CSPRNG), bytes only via
`shared.wire`. The adapters in aggregator/ and device/ do MQTT, timers and threads.

`client` and `server` are imported from their modules, not re-exported here: they take their
stage vocabulary from `shared.protocol`, which builds on `shared.rounds`, which needs
`config` from this package, so importing them here would make that a cycle.
"""

from fleetlearn.shared.secagg.config import (
    PrivacyFloor,
    SecAggConfig,
    Stage,
    StageDeadlines,
    default_neighbours,
    suggest_neighbours,
)
from fleetlearn.shared.secagg.contribution import SecAggResult, TrainingMetrics
from fleetlearn.shared.secagg.errors import (
    CryptoError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SecAggConfigError,
    SecAggError,
    ThresholdError,
)
from fleetlearn.shared.secagg.keys import RandomSource, system_random
from fleetlearn.shared.secagg.messages import (
    TO_AGGREGATOR,
    TO_DEVICE,
    Abort,
    Advertise,
    MaskedInput,
    Roster,
    ShareInbox,
    Shares,
    Unmask,
    UnmaskRequest,
)

__all__ = [
    "TO_AGGREGATOR",
    "TO_DEVICE",
    "Abort",
    "Advertise",
    "CryptoError",
    "LocalProtocolError",
    "MaskedInput",
    "PrivacyFloor",
    "ProtocolError",
    "RandomSource",
    "RemoteProtocolError",
    "Roster",
    "SecAggConfig",
    "SecAggConfigError",
    "SecAggError",
    "SecAggResult",
    "ShareInbox",
    "Shares",
    "Stage",
    "StageDeadlines",
    "ThresholdError",
    "TrainingMetrics",
    "Unmask",
    "UnmaskRequest",
    "default_neighbours",
    "suggest_neighbours",
    "system_random",
]
