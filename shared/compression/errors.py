"""The compression package's one error of its own.

Local misuse (bits out of range, a non-finite or wrongly shaped update, a missing round seed)
raises `CompressionError`. Anything that came off the wire and is wrong raises `wire.WireError`
instead (a `SchemaError` naming the field, or a `ContextError` when a well-formed update does
not fit the round), so a receiver catches one type for hostile input.
"""

from __future__ import annotations

from fleetlearn.shared.errors import FleetlearnError


class CompressionError(FleetlearnError, ValueError):
    """A compression function was called with values or parameters it cannot honour."""
