"""The wire's one error hierarchy. Every payload that cannot become a valid message, at any
layer, raises one of these, with a message that names the field at fault:

    WireError (FleetlearnError, ValueError)   `field` names the offending field when known
    ├── FrameError      not one well-formed zstd frame holding one msgpack map
    │   └── LimitError  a size limit exceeded (compressed, declared decompressed, array, string)
    ├── SchemaError     the map does not match the schema (type tag, field, type, shape, rule)
    └── ContextError    a well-formed message where it does not belong (round, sender, stage)

Nothing here trusts or reads input; the other modules of `shared.wire` raise these, and
anything else escaping `decode` is a bug.
"""

from __future__ import annotations

from fleetlearn.shared.errors import FleetlearnError


class WireError(FleetlearnError, ValueError):
    """A payload or message is malformed. `field` names the offending field when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.problem = message
        self.field = field


class FrameError(WireError):
    """The bytes are not one well-formed zstd frame holding one msgpack map."""


class LimitError(FrameError):
    """A size limit was exceeded (compressed, declared decompressed, array, string...)."""


class SchemaError(WireError):
    """The map does not match the schema: unknown type, missing field, wrong type or shape."""


class ContextError(WireError):
    """A well-formed message arrived where it does not belong (wrong round, sender, stage...)."""
