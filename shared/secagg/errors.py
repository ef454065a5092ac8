"""The secure-aggregation error hierarchy.

What it owns: every exception `shared.secagg` raises on purpose, rooted at
`shared.errors.FleetlearnError` so the CLI prints them as one line.

    SecAggError
    ├── SecAggConfigError      a parameter set that cannot work (also shared.errors.ConfigError)
    ├── ProtocolError
    │   ├── LocalProtocolError   the caller misused a state machine (adapter bug)
    │   └── RemoteProtocolError  a peer sent something wrong; `sender` says who
    ├── ThresholdError         too few parties or shares left to finish the round
    └── CryptoError            a key, signature, ciphertext or share failed its check

Rules: a RemoteProtocolError never changes the state of the machine that raised it for anyone
but that sender (the round goes on without the message); a LocalProtocolError leaves the machine
in its ERROR state for good. Wire-level garbage never reaches here: `wire.decode` raises
`wire.WireError` first.
"""

from __future__ import annotations

from fleetlearn.shared.errors import ConfigError, FleetlearnError


class SecAggError(FleetlearnError):
    """Base of every deliberate secure-aggregation error."""


class SecAggConfigError(SecAggError, ConfigError, ValueError):
    """A SecAgg parameter is unusable; `key` names it and the message says how to fix it.

    Also a ValueError so that a config decoded off the wire (it is a `wire.record`) turns into
    the decoder's SchemaError instead of escaping `wire.decode`.
    """


class ProtocolError(SecAggError):
    """A protocol rule was broken, locally or by a peer."""


class LocalProtocolError(ProtocolError):
    """This side broke the protocol: a call out of order, bad local input, a state-machine bug."""


class RemoteProtocolError(ProtocolError):
    """A peer broke the protocol. `sender` is its device id, or "aggregator" seen from a device.

    Raised for one message at a time; the machine that raises it has discarded that message and
    carries on for everyone else (ARCHITECTURE §4: "a bad payload ... is counted and logged,
    and the round goes on").
    """

    def __init__(self, problem: str, *, sender: str | None, stage: str | None = None) -> None:
        where = f" during {stage}" if stage else ""
        who = sender if sender is not None else "unknown sender"
        super().__init__(f"{who}{where}: {problem}")
        self.sender = sender
        self.stage = stage
        self.problem = problem


class ThresholdError(SecAggError):
    """Fewer live parties or shares than the threshold needs; the round cannot finish."""


class CryptoError(SecAggError):
    """A key, signature, ciphertext or share failed a cryptographic check.

    Raised by the primitives in keys/shamir; the state machines turn it into a
    RemoteProtocolError naming the party that supplied the bad value.
    """
