"""The wire contract: typed messages and the one encoder/decoder.

Rules this package keeps:
- A payload is exactly one zstd frame that declares its decompressed size, holding one msgpack
  map `{"v": WIRE_VERSION, "t": <type tag>, <field>: <value>, ...}`. Nothing else is accepted:
  no trailing bytes, no second frame, no msgpack extension types, never pickle.
- Sizes are checked before anything is allocated for them: the compressed length, the size the
  frame header declares (the bomb guard), msgpack string/bin/array/map lengths, and each array's
  element count against its declared shape and dtype.
- Messages are frozen, slotted, keyword-only dataclasses declared with `@message("tag")`. Their
  fields are typed with the small vocabulary below, which is also the schema the decoder
  enforces; `__post_init__` checks the domain rules, so a message that exists is valid.
- Every failure raises `WireError` (or a subclass) whose message names the field at fault.
  Anything else escaping `decode` is a bug.
- Pure: no sockets, no clock, no randomness; it imports no other part of fleetlearn but
  `shared.errors` and `shared.ids` (the modules that declare messages import it, and it imports
  them back only by name, on demand, to register their tags).

Field vocabulary: `int`, `float`, `bool`, `str`, `bytes`, `numpy.ndarray` (little-endian numeric
dtypes, shipped as bytes + dtype + shape), `tuple[T, ...]`, `dict[str, T]`, `T | None`, a
`@record` dataclass (nested map without a type tag), `enum.Enum` with str values, and another
`@message` type or a union of them (nested map with its type tag, e.g. an update inside the
envelope that adds its round metrics).

How it is split (each module imports only the ones above it):

    errors   WireError and its subclasses
    limits   Limits, DEFAULT_LIMITS, ARRAY_DTYPES
    schema   Message, Record, @message, @record, the tag registry, require* helpers
    codec    the field codecs: the vocabulary above, checked both ways
    frame    encode, decode, unframe, to_map: zstd + msgpack, WIRE_VERSION
    status   DeviceStatus, Eligibility: the one message the wire itself declares

Use it as `from fleetlearn.shared import wire` and `wire.encode`, `wire.DeviceStatus`, ...: the
names below are the whole public surface. Names with a leading underscore are shared between
these modules only.
"""

from fleetlearn.shared.wire.errors import (
    ContextError,
    FrameError,
    LimitError,
    SchemaError,
    WireError,
)
from fleetlearn.shared.wire.frame import WIRE_VERSION, decode, encode, to_map, unframe
from fleetlearn.shared.wire.limits import ARRAY_DTYPES, DEFAULT_LIMITS, Limits
from fleetlearn.shared.wire.schema import (
    Message,
    Record,
    message,
    record,
    registered_types,
    require,
    require_array,
    require_id,
    require_ids,
    require_unique,
)
from fleetlearn.shared.wire.status import DeviceStatus, Eligibility

__all__ = [
    "ARRAY_DTYPES",
    "DEFAULT_LIMITS",
    "WIRE_VERSION",
    "ContextError",
    "DeviceStatus",
    "Eligibility",
    "FrameError",
    "LimitError",
    "Limits",
    "Message",
    "Record",
    "SchemaError",
    "WireError",
    "decode",
    "encode",
    "message",
    "record",
    "registered_types",
    "require",
    "require_array",
    "require_id",
    "require_ids",
    "require_unique",
    "to_map",
    "unframe",
]
