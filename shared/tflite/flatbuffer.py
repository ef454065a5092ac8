"""A small bounds-checked flatbuffer reader, written for hostile input.

Owns `_Flatbuffer` (reads scalars, follows references, sizes vectors and strings) and `_Table`
(finds fields through its vtable), and the little-endian struct formats the package shares.
Trusts nothing in the bytes: every read is bounds-checked and every offset range-checked, so a
truncated or corrupt file raises `ModelFormatError` naming what was being read, never
IndexError or struct.error. Knows nothing of the TFLite schema (that is `tflite.model`).
"""

from __future__ import annotations

import struct

from fleetlearn.shared.tflite.errors import ModelFormatError

_U8 = struct.Struct("<B")
_I8 = struct.Struct("<b")
_U16 = struct.Struct("<H")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Flatbuffer:
    """Bounds-checked reads from one flatbuffer. `what` names the thing read, for the error."""

    __slots__ = ("data", "size")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read(self, kind: struct.Struct, pos: int, what: str) -> int:
        if pos < 0 or pos + kind.size > self.size:
            raise ModelFormatError(
                f"{what}: byte {pos} lies outside the file of {self.size} bytes "
                "(truncated or corrupt)"
            )
        value: int = kind.unpack_from(self.data, pos)[0]
        return value

    def deref(self, pos: int, what: str) -> int:
        """Follow the forward offset stored at `pos` (flatbuffer references only point forward)."""
        target = pos + self.read(_U32, pos, what)
        if target >= self.size:
            raise ModelFormatError(f"{what}: reference points past the end of the file")
        return target

    def vector(self, pos: int, element_size: int, what: str) -> tuple[int, int]:
        """(start of elements, count) of the vector at `pos`, checked to fit in the file."""
        count = self.read(_U32, pos, what)
        start = pos + 4
        if count * element_size > self.size - start:
            raise ModelFormatError(f"{what}: vector of {count} elements runs past the end")
        return start, count

    def string(self, pos: int, what: str) -> str:
        start, count = self.vector(pos, 1, what)
        try:
            return self.data[start : start + count].decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{what}: string is not UTF-8") from None


class _Table:
    """One flatbuffer table: finds fields through its vtable, checking every offset."""

    __slots__ = ("fb", "inline_size", "pos", "vtable", "vtable_size", "what")

    def __init__(self, fb: _Flatbuffer, pos: int, what: str) -> None:
        self.fb = fb
        self.pos = pos
        self.what = what
        self.vtable = pos - fb.read(_I32, pos, what)
        self.vtable_size = fb.read(_U16, self.vtable, f"{what} vtable")
        self.inline_size = fb.read(_U16, self.vtable + 2, f"{what} vtable")
        if self.vtable_size < 4 or self.vtable_size % 2 or self.vtable + self.vtable_size > fb.size:
            raise ModelFormatError(f"{what}: malformed vtable")
        if self.inline_size < 4 or pos + self.inline_size > fb.size:
            raise ModelFormatError(f"{what}: table runs past the end of the file")

    def field(self, slot: int, size: int) -> int | None:
        """Absolute position of field `slot` (`size` bytes wide), or None when absent."""
        entry = 4 + 2 * slot
        if entry + 2 > self.vtable_size:
            return None
        offset = self.fb.read(_U16, self.vtable + entry, self.what)
        if offset == 0:
            return None
        if offset < 4 or offset + size > self.inline_size:
            raise ModelFormatError(f"{self.what}: field {slot} lies outside its table")
        return self.pos + offset

    def slots(self) -> int:
        return (self.vtable_size - 4) // 2

    def scalar(self, slot: int, kind: struct.Struct, default: int) -> int:
        pos = self.field(slot, kind.size)
        return default if pos is None else self.fb.read(kind, pos, self.what)

    def ref(self, slot: int, what: str) -> int | None:
        pos = self.field(slot, 4)
        return None if pos is None else self.fb.deref(pos, what)

    def table(self, slot: int, what: str) -> _Table | None:
        target = self.ref(slot, what)
        return None if target is None else _Table(self.fb, target, what)

    def string(self, slot: int, what: str) -> str | None:
        target = self.ref(slot, what)
        return None if target is None else self.fb.string(target, what)

    def vector(self, slot: int, element_size: int, what: str) -> tuple[int, int]:
        target = self.ref(slot, what)
        return (0, 0) if target is None else self.fb.vector(target, element_size, what)

    def tables(self, slot: int, what: str) -> list[_Table]:
        start, count = self.vector(slot, 4, what)
        fb = self.fb
        return [_Table(fb, fb.deref(start + 4 * i, what), f"{what}[{i}]") for i in range(count)]

    def ints(self, slot: int, what: str) -> tuple[int, ...]:
        start, count = self.vector(slot, 4, what)
        return struct.unpack_from(f"<{count}i", self.fb.data, start) if count else ()
