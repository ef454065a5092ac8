"""The root of every error fleetlearn raises on purpose.

Each package keeps its own hierarchy under `FleetlearnError` (wire: `WireError`; secagg:
`ProtocolError`; broker: `BrokerError`; ...). Anything derived from it carries a message a field
engineer can act on, and the CLI prints it as one line instead of a traceback.
"""

from __future__ import annotations


class FleetlearnError(Exception):
    """Base of all deliberate, user-facing errors."""


class ConfigError(FleetlearnError):
    """A configuration value (file, CLI flag, environment variable) is unusable.

    `key` names the setting, so the message can say which one to fix.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem
