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


class MissingExtraError(FleetlearnError):
    """A command needs a library that this installation's extras did not bring."""

    def __init__(self, what: str, modules: tuple[str, ...], extra: str) -> None:
        super().__init__(
            f"{what} needs {', '.join(modules)}, which this installation lacks: "
            f"pip install 'fleetlearn[{extra}]'"
        )
        self.modules = modules
        self.extra = extra


def require_modules(what: str, modules: tuple[str, ...], extra: str) -> None:
    """Raise MissingExtraError unless every module in `modules` can be imported.

    Gateways install only `fleetlearn[device]`; the simulator's terminal view, its plots and
    the embedded broker come with other extras, and a command that needs them says which."""
    import importlib.util

    missing = tuple(m for m in modules if importlib.util.find_spec(m) is None)
    if missing:
        raise MissingExtraError(what, missing, extra)
