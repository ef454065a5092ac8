"""TensorFlow-free access to a .tflite model: variables, weights, manifest, signed release.

What this module owns (ARCHITECTURE §6):
- A small flatbuffer reader for the TFLite schema, written for hostile input: every read is
  bounds-checked, every index is range-checked, and malformed bytes raise `ModelFormatError`,
  never IndexError or struct.error.
- The model's variables: a resource variable's initial value is the constant assigned to it in
  the initializer subgraph (the one every signature runs once through CALL_ONCE). Reading
  weights reads those constants; patching weights rewrites them in place, so the aggregator
  ships new weights without TensorFlow. A buffer that another tensor also uses is never patched
  (the converter merges identical constants): that is `SharedBufferError`.
- The manifest (model id, version, weight layout, labels, content hash), embedded in the
  model's metadata and carried beside it in a `ModelRelease`, which the aggregator signs with
  Ed25519 and devices verify before they load anything.

Rules it keeps: pure (no TensorFlow, no LiteRT, no sockets, no clock, no global RNG); input
bytes are never modified (functions return new bytes); messages go through `shared.wire`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import nacl.exceptions
import nacl.signing
import numpy as np
import zstandard

from fleetlearn.shared import wire
from fleetlearn.shared.errors import FleetlearnError

# ---------------------------------------------------------------------------------------- errors


class ModelError(FleetlearnError):
    """Base of every error about a model file, its weights or its release."""


class ModelFormatError(ModelError, ValueError):
    """The bytes are not a TFLite model this module can read (truncated, corrupt, other schema)."""


class LayoutError(ModelError, ValueError):
    """Weights or a weight layout do not fit the model's variables (name, shape, dtype, value)."""


class SharedBufferError(ModelError):
    """A variable's initial value shares its buffer with another tensor, so it cannot be patched."""


class ReleaseError(ModelError):
    """A model release cannot be made or must not be installed."""


class SignatureError(ReleaseError):
    """The release's signature does not verify with the aggregator's key."""


class RollbackError(ReleaseError):
    """The release is older than the model already installed."""


class ContentMismatchError(ReleaseError):
    """The model bytes do not match the manifest that was signed."""


# ------------------------------------------------------------------------------------- constants

# TFLite's BuiltinOperator enum in code order (schema.fbs); only used to name operators for people.
_OP_NAMES_TEXT = (
    "ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE "
    "EMBEDDING_LOOKUP FLOOR FULLY_CONNECTED HASHTABLE_LOOKUP L2_NORMALIZATION L2_POOL_2D "
    "LOCAL_RESPONSE_NORMALIZATION LOGISTIC LSH_PROJECTION LSTM MAX_POOL_2D MUL RELU "
    "RELU_N1_TO_1 RELU6 RESHAPE RESIZE_BILINEAR RNN SOFTMAX SPACE_TO_DEPTH SVDF TANH "
    "CONCAT_EMBEDDINGS SKIP_GRAM CALL CUSTOM EMBEDDING_LOOKUP_SPARSE PAD "
    "UNIDIRECTIONAL_SEQUENCE_RNN GATHER BATCH_TO_SPACE_ND SPACE_TO_BATCH_ND TRANSPOSE MEAN SUB "
    "DIV SQUEEZE UNIDIRECTIONAL_SEQUENCE_LSTM STRIDED_SLICE BIDIRECTIONAL_SEQUENCE_RNN EXP "
    "TOPK_V2 SPLIT LOG_SOFTMAX DELEGATE BIDIRECTIONAL_SEQUENCE_LSTM CAST PRELU MAXIMUM ARG_MAX "
    "MINIMUM LESS NEG PADV2 GREATER GREATER_EQUAL LESS_EQUAL SELECT SLICE SIN TRANSPOSE_CONV "
    "SPARSE_TO_DENSE TILE EXPAND_DIMS EQUAL NOT_EQUAL LOG SUM SQRT RSQRT SHAPE POW ARG_MIN "
    "FAKE_QUANT REDUCE_PROD REDUCE_MAX PACK LOGICAL_OR ONE_HOT LOGICAL_AND LOGICAL_NOT UNPACK "
    "REDUCE_MIN FLOOR_DIV REDUCE_ANY SQUARE ZEROS_LIKE FILL FLOOR_MOD RANGE "
    "RESIZE_NEAREST_NEIGHBOR LEAKY_RELU SQUARED_DIFFERENCE MIRROR_PAD ABS SPLIT_V UNIQUE CEIL "
    "REVERSE_V2 ADD_N GATHER_ND COS WHERE RANK ELU REVERSE_SEQUENCE MATRIX_DIAG QUANTIZE "
    "MATRIX_SET_DIAG ROUND HARD_SWISH IF WHILE NON_MAX_SUPPRESSION_V4 NON_MAX_SUPPRESSION_V5 "
    "SCATTER_ND SELECT_V2 DENSIFY SEGMENT_SUM BATCH_MATMUL PLACEHOLDER_FOR_GREATER_OP_CODES "
    "CUMSUM CALL_ONCE BROADCAST_TO RFFT2D CONV_3D IMAG REAL COMPLEX_ABS HASHTABLE "
    "HASHTABLE_FIND HASHTABLE_IMPORT HASHTABLE_SIZE REDUCE_ALL CONV_3D_TRANSPOSE VAR_HANDLE "
    "READ_VARIABLE ASSIGN_VARIABLE BROADCAST_ARGS RANDOM_STANDARD_NORMAL BUCKETIZE "
    "RANDOM_UNIFORM MULTINOMIAL GELU DYNAMIC_UPDATE_SLICE RELU_0_TO_1 UNSORTED_SEGMENT_PROD "
    "UNSORTED_SEGMENT_MAX UNSORTED_SEGMENT_SUM ATAN2 UNSORTED_SEGMENT_MIN SIGN BITCAST "
    "BITWISE_XOR RIGHT_SHIFT STABLEHLO_LOGISTIC STABLEHLO_ADD STABLEHLO_DIVIDE "
    "STABLEHLO_MULTIPLY STABLEHLO_MAXIMUM STABLEHLO_RESHAPE STABLEHLO_CLAMP "
    "STABLEHLO_CONCATENATE STABLEHLO_BROADCAST_IN_DIM STABLEHLO_CONVOLUTION STABLEHLO_SLICE "
    "STABLEHLO_CUSTOM_CALL STABLEHLO_REDUCE STABLEHLO_ABS STABLEHLO_AND STABLEHLO_COSINE "
    "STABLEHLO_EXPONENTIAL STABLEHLO_FLOOR STABLEHLO_LOG STABLEHLO_MINIMUM STABLEHLO_NEGATE "
    "STABLEHLO_OR STABLEHLO_POWER STABLEHLO_REMAINDER STABLEHLO_RSQRT STABLEHLO_SELECT "
    "STABLEHLO_SUBTRACT STABLEHLO_TANH STABLEHLO_SCATTER STABLEHLO_COMPARE STABLEHLO_CONVERT "
    "STABLEHLO_DYNAMIC_SLICE STABLEHLO_DYNAMIC_UPDATE_SLICE STABLEHLO_PAD STABLEHLO_IOTA "
    "STABLEHLO_DOT_GENERAL STABLEHLO_REDUCE_WINDOW STABLEHLO_SORT STABLEHLO_WHILE "
    "STABLEHLO_GATHER STABLEHLO_TRANSPOSE DILATE STABLEHLO_RNG_BIT_GENERATOR REDUCE_WINDOW "
    "STABLEHLO_COMPOSITE STABLEHLO_SHIFT_LEFT STABLEHLO_CBRT STABLEHLO_CASE"
)
_OP_NAMES: tuple[str, ...] = tuple(_OP_NAMES_TEXT.split())
OP_CUSTOM = 32
OP_CALL_ONCE = 129
OP_VAR_HANDLE = 142
OP_ASSIGN_VARIABLE = 144
# Operator.builtin_options union tags of the two option tables this module reads.
_OPTIONS_CALL_ONCE = 103
_OPTIONS_VAR_HANDLE = 111

# TFLite TensorType -> (name people read, numpy dtype for numeric types, else None).
_TENSOR_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("float32", "<f4"),
    1: ("float16", "<f2"),
    2: ("int32", "<i4"),
    3: ("uint8", "|u1"),
    4: ("int64", "<i8"),
    5: ("string", None),
    6: ("bool", "|b1"),
    7: ("int16", "<i2"),
    8: ("complex64", None),
    9: ("int8", "|i1"),
    10: ("float64", "<f8"),
    11: ("complex128", None),
    12: ("uint64", "<u8"),
    13: ("resource", None),
    14: ("variant", None),
    15: ("uint32", "<u4"),
    16: ("uint16", "<u2"),
    17: ("int4", None),
    18: ("bfloat16", None),
}

_FILE_IDENTIFIER = b"TFL3"
_SCHEMA_VERSION = 3
# Buffer data is aligned to 16 bytes in the file (schema: force_align 16); any bytes this module
# inserts are a multiple of that, so everything after them keeps its alignment.
_BUFFER_ALIGN = 16
_MAX_MODEL_BYTES = 512 * 1024 * 1024  # well above any fleet model; bounds every allocation

MANIFEST_METADATA_NAME = "fleetlearn.manifest"
# Manifest payload in its metadata buffer: magic | content hash | body length (u32) | body | 0s.
# The hash sits at a fixed place so it can be computed over the file with those 32 bytes zeroed
# and written afterwards; the zero padding lets the next version be rewritten in place.
_MANIFEST_MAGIC = b"FLMANIF1"
_HASH_SIZE = 32
_MANIFEST_HEADER = len(_MANIFEST_MAGIC) + _HASH_SIZE + 4
_MANIFEST_SLACK = 256
ZERO_HASH = bytes(_HASH_SIZE)

_U8 = struct.Struct("<B")
_I8 = struct.Struct("<b")
_U16 = struct.Struct("<H")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


# ------------------------------------------------------------------------------ flatbuffer reader


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


# ---------------------------------------------------------------------------- the parsed model


@dataclass(frozen=True, slots=True)
class OpCode:
    """One entry of the model's operator table."""

    builtin: int
    custom: str | None
    version: int

    @property
    def name(self) -> str:
        if self.builtin == OP_CUSTOM:
            return f"CUSTOM({self.custom})"
        if 0 <= self.builtin < len(_OP_NAMES):
            return _OP_NAMES[self.builtin]
        return f"BUILTIN_{self.builtin}"

    @property
    def is_custom(self) -> bool:
        """True for custom operators, which include every Flex (TensorFlow) operator."""
        return self.builtin == OP_CUSTOM or self.custom is not None


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A named tensor of a signature: shape -1 marks a dimension resized at run time."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class SignatureInfo:
    key: str
    subgraph: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


@dataclass(frozen=True, slots=True)
class SubgraphInfo:
    name: str
    ops: tuple[str, ...]  # operator names in execution order


@dataclass(frozen=True, slots=True)
class Variable:
    """A resource variable and where its initial value lives in the file.

    `buffer`/`offset` are None when the initial value is not a plain constant in the file (then
    it cannot be read or patched). `shared_with` describes every other user of the buffer.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    buffer: int | None
    offset: int | None
    nbytes: int
    shared_with: tuple[str, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What `describe_model` finds in a .tflite file."""

    size: int
    schema_version: int
    description: str
    op_codes: tuple[OpCode, ...]
    subgraphs: tuple[SubgraphInfo, ...]
    signatures: tuple[SignatureInfo, ...]
    variables: tuple[Variable, ...]
    metadata: tuple[str, ...]
    initializer: int | None  # subgraph that assigns the variables' initial values

    @property
    def custom_ops(self) -> tuple[str, ...]:
        return tuple(code.name for code in self.op_codes if code.is_custom)

    def signature(self, key: str) -> SignatureInfo:
        for sig in self.signatures:
            if sig.key == key:
                return sig
        known = ", ".join(s.key for s in self.signatures) or "none"
        raise ModelFormatError(f"model has no signature {key!r} (it has: {known})")

    def variable(self, name: str) -> Variable:
        for var in self.variables:
            if var.name == name:
                return var
        known = ", ".join(v.name for v in self.variables) or "none"
        raise LayoutError(f"model has no variable {name!r} (it has: {known})")


@dataclass(frozen=True, slots=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    type: int
    buffer: int


@dataclass(frozen=True, slots=True)
class _Operator:
    opcode: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    shared_name: str | None  # VAR_HANDLE
    init_subgraph: int | None  # CALL_ONCE


@dataclass(frozen=True, slots=True)
class _Subgraph:
    name: str
    tensors: tuple[_Tensor, ...]
    operators: tuple[_Operator, ...]


@dataclass(frozen=True, slots=True)
class _Parsed:
    """Everything read from the file, with positions needed to rewrite it."""

    data: bytes
    model: _Table
    info: ModelInfo
    buffers: tuple[tuple[int, int], ...]  # (absolute start, length) of each buffer's data
    buffer_tables: tuple[_Table, ...]
    metadata: tuple[tuple[str, int], ...]  # (name, buffer index)
    manifest_buffer: int | None


def _dtype_name(type_code: int) -> str:
    return _TENSOR_TYPES.get(type_code, (f"type_{type_code}", None))[0]


def _numpy_dtype(type_code: int) -> str | None:
    return _TENSOR_TYPES.get(type_code, ("", None))[1]


def _parse_op_code(table: _Table) -> OpCode:
    deprecated = table.scalar(0, _I8, 0)
    custom = table.string(1, f"{table.what}.custom_code")
    version = table.scalar(2, _I32, 1)
    builtin = table.scalar(3, _I32, 0)
    # Old files only fill the 8-bit field; new ones put 127 there for codes above 126.
    return OpCode(builtin=max(deprecated, builtin), custom=custom, version=version)


def _parse_buffer(table: _Table, fb: _Flatbuffer) -> tuple[int, int]:
    offset = table.scalar(1, _U64, 0)
    if offset > 1:
        # Large models keep buffer data after the flatbuffer, addressed from the file start.
        size = table.scalar(2, _U64, 0)
        if offset + size > fb.size:
            raise ModelFormatError(f"{table.what}: data lies outside the file")
        return offset, size
    return table.vector(0, 1, f"{table.what}.data")


def _check_index(index: int, count: int, what: str) -> int:
    if not 0 <= index < count:
        raise ModelFormatError(f"{what}: index {index} is outside 0..{count - 1}")
    return index


def _parse_subgraph(table: _Table, op_codes: Sequence[OpCode], n_buffers: int) -> _Subgraph:
    what = table.what
    tensors = []
    for t in table.tables(0, f"{what}.tensors"):
        shape = t.ints(0, f"{t.what}.shape")
        if any(d < 0 for d in shape):
            raise ModelFormatError(f"{t.what}: negative dimension in shape {shape}")
        buffer = _check_index(t.scalar(2, _U32, 0), n_buffers, f"{t.what}.buffer")
        name = t.string(3, f"{t.what}.name") or ""
        # shape_signature marks dimensions resized at run time with -1; shape holds 1 there.
        signature = t.ints(7, f"{t.what}.shape_signature")
        if signature and (len(signature) != len(shape) or any(d < -1 for d in signature)):
            raise ModelFormatError(f"{t.what}: shape signature {signature} does not fit {shape}")
        tensors.append(
            _Tensor(
                name=name,
                shape=shape,
                shape_signature=signature or shape,
                type=t.scalar(1, _U8, 0),
                buffer=buffer,
            )
        )
    operators = []
    for o in table.tables(3, f"{what}.operators"):
        opcode = _check_index(o.scalar(0, _U32, 0), len(op_codes), f"{o.what}.opcode_index")
        inputs = o.ints(1, f"{o.what}.inputs")
        outputs = o.ints(2, f"{o.what}.outputs")
        for index in (*inputs, *outputs):
            if index != -1:  # -1 marks an omitted optional input
                _check_index(index, len(tensors), f"{o.what} tensor")
        code = op_codes[opcode].builtin
        shared_name = init_subgraph = None
        if code in (OP_VAR_HANDLE, OP_CALL_ONCE):
            expected = _OPTIONS_VAR_HANDLE if code == OP_VAR_HANDLE else _OPTIONS_CALL_ONCE
            options = o.table(4, f"{o.what}.options")
            if o.scalar(3, _U8, 0) != expected or options is None:
                raise ModelFormatError(f"{o.what}: {_OP_NAMES[code]} without its options")
            if code == OP_VAR_HANDLE:
                shared_name = options.string(1, f"{o.what}.shared_name") or ""
            else:
                init_subgraph = options.scalar(0, _I32, 0)
        operators.append(_Operator(opcode, inputs, outputs, shared_name, init_subgraph))
    name = table.string(4, f"{what}.name") or ""
    return _Subgraph(name=name, tensors=tuple(tensors), operators=tuple(operators))


def _parse_signature(table: _Table, subgraphs: Sequence[_Subgraph]) -> SignatureInfo:
    key = table.string(2, f"{table.what}.signature_key") or ""
    index = _check_index(table.scalar(4, _U32, 0), len(subgraphs), f"{table.what}.subgraph")
    tensors = subgraphs[index].tensors

    def maps(slot: int, what: str) -> tuple[TensorInfo, ...]:
        out = []
        for m in table.tables(slot, what):
            name = m.string(0, f"{m.what}.name") or ""
            t = tensors[_check_index(m.scalar(1, _U32, 0), len(tensors), f"{m.what}.tensor")]
            out.append(TensorInfo(name=name, shape=t.shape_signature, dtype=_dtype_name(t.type)))
        return tuple(out)

    inputs = maps(0, f"signature {key!r} inputs")
    outputs = maps(1, f"signature {key!r} outputs")
    return SignatureInfo(key=key, subgraph=index, inputs=inputs, outputs=outputs)


def _find_variables(
    subgraphs: Sequence[_Subgraph],
    op_codes: Sequence[OpCode],
    buffers: Sequence[tuple[int, int]],
    metadata: Sequence[tuple[str, int]],
) -> tuple[int | None, tuple[Variable, ...]]:
    init_indices = {
        op.init_subgraph for sg in subgraphs for op in sg.operators if op.init_subgraph is not None
    }
    if not init_indices:
        return None, ()
    if len(init_indices) > 1:
        raise ModelFormatError(f"signatures call different initializers {sorted(init_indices)}")
    init = _check_index(init_indices.pop(), len(subgraphs), "CALL_ONCE init_subgraph_index")
    graph = subgraphs[init]

    handles: dict[int, str] = {}
    produced: set[int] = set()
    assigned: list[tuple[str, int]] = []
    for op in graph.operators:
        code = op_codes[op.opcode].builtin
        if code == OP_VAR_HANDLE and op.outputs and op.shared_name is not None:
            handles[op.outputs[0]] = op.shared_name
        elif code == OP_ASSIGN_VARIABLE:
            if len(op.inputs) < 2 or op.inputs[0] not in handles or op.inputs[1] < 0:
                raise ModelFormatError("initializer assigns a value to no known variable")
            assigned.append((handles[op.inputs[0]], op.inputs[1]))
        produced.update(op.outputs)

    def constant(tensor_index: int) -> int | None:
        t = graph.tensors[tensor_index]
        if tensor_index in produced or not t.buffer or not buffers[t.buffer][1]:
            return None
        return t.buffer

    # Every user of each buffer besides the initial values themselves, so that a variable whose
    # initial value the converter merged with another constant is refused by name.
    by_buffer: dict[int, list[str]] = {}
    for name, value in assigned:
        buffer = constant(value)
        if buffer is not None:
            by_buffer.setdefault(buffer, []).append(name)
    initial_values = {value for _, value in assigned}
    users: dict[int, list[str]] = {}
    for si, sg in enumerate(subgraphs):
        for ti, t in enumerate(sg.tensors):
            if t.buffer and t.buffer in by_buffer and not (si == init and ti in initial_values):
                where = sg.name or f"#{si}"
                users.setdefault(t.buffer, []).append(f"tensor {t.name or ti!r} in {where!r}")
    for name, index in metadata:
        if index in by_buffer:
            users.setdefault(index, []).append(f"metadata {name!r}")

    variables: dict[str, Variable] = {}
    for name, value in assigned:
        if name in variables:
            raise ModelFormatError(f"initializer assigns variable {name!r} twice")
        t = graph.tensors[value]
        dtype = _numpy_dtype(t.type)
        nbytes = math.prod(t.shape) * (np.dtype(dtype).itemsize if dtype else 0)
        buffer = constant(value) if dtype else None  # strings, resources: not readable here
        offset: int | None = None
        shared: tuple[str, ...] = ()
        if buffer is not None:
            start, length = buffers[buffer]
            if length != nbytes:
                raise ModelFormatError(
                    f"variable {name!r}: initial value holds {length} bytes, but shape "
                    f"{list(t.shape)} of {_dtype_name(t.type)} needs {nbytes}"
                )
            offset = start
            others = tuple(f"variable {n!r}" for n in by_buffer[buffer] if n != name)
            shared = (*others, *users.get(buffer, ()))
        variables[name] = Variable(
            name=name,
            shape=t.shape,
            dtype=_dtype_name(t.type),
            buffer=buffer,
            offset=offset,
            nbytes=nbytes,
            shared_with=shared,
        )
    return init, tuple(variables.values())


def _parse(data: bytes) -> _Parsed:
    if not isinstance(data, bytes):
        raise ModelFormatError(f"model must be bytes, not {type(data).__name__}")
    return _parse_once(data)


# Parsing is pure and its result immutable, so equal bytes are parsed once. Reading a release
# parses the model three times (manifest and hash, signatures and layout, initial weights),
# about 20 ms of pure Python for the default model; a simulator process hands every release
# to a hundred devices, and that parsing starved their round work on a busy machine.
@functools.lru_cache(maxsize=4)
def _parse_once(data: bytes) -> _Parsed:
    if len(data) < 8 or data[4:8] != _FILE_IDENTIFIER:
        raise ModelFormatError("not a TFLite model (no 'TFL3' file identifier)")
    if len(data) > _MAX_MODEL_BYTES:
        raise ModelFormatError(f"model of {len(data)} bytes exceeds {_MAX_MODEL_BYTES}")
    fb = _Flatbuffer(data)
    model = _Table(fb, fb.deref(0, "root"), "model")
    version = model.scalar(0, _U32, 0)
    if version != _SCHEMA_VERSION:
        raise ModelFormatError(
            f"TFLite schema version {version}; this reader knows {_SCHEMA_VERSION}"
        )
    op_codes = tuple(_parse_op_code(t) for t in model.tables(1, "operator_codes"))
    buffer_tables = tuple(model.tables(4, "buffers"))
    buffers = tuple(_parse_buffer(t, fb) for t in buffer_tables)
    subgraphs = tuple(
        _parse_subgraph(t, op_codes, len(buffers)) for t in model.tables(2, "subgraphs")
    )
    description = model.string(3, "description") or ""
    metadata = []
    for t in model.tables(6, "metadata"):
        name = t.string(0, f"{t.what}.name") or ""
        index = _check_index(t.scalar(1, _U32, 0), len(buffers), f"{t.what}.buffer")
        metadata.append((name, index))
    signatures = tuple(_parse_signature(t, subgraphs) for t in model.tables(7, "signature_defs"))
    init, variables = _find_variables(subgraphs, op_codes, buffers, metadata)

    manifests = [index for name, index in metadata if name == MANIFEST_METADATA_NAME]
    if len(manifests) > 1:
        raise ModelFormatError(f"model carries {len(manifests)} manifests")
    info = ModelInfo(
        size=len(data),
        schema_version=version,
        description=description,
        op_codes=op_codes,
        subgraphs=tuple(
            SubgraphInfo(sg.name, tuple(op_codes[op.opcode].name for op in sg.operators))
            for sg in subgraphs
        ),
        signatures=signatures,
        variables=variables,
        metadata=tuple(name for name, _ in metadata),
        initializer=init,
    )
    return _Parsed(
        data=data,
        model=model,
        info=info,
        buffers=buffers,
        buffer_tables=buffer_tables,
        metadata=tuple(metadata),
        manifest_buffer=manifests[0] if manifests else None,
    )


def describe_model(data: bytes) -> ModelInfo:
    """Parse a .tflite file: operators, signatures, variables, metadata names."""
    return _parse(data).info


# ------------------------------------------------------------------------------ weights, layout


@wire.record
class WeightSpec(wire.Record):
    """One variable of the weight layout: the flat update vector holds these in order."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        wire.require(0 < len(self.name) <= 256, "WeightSpec.name", "must be 1..256 characters")
        wire.require(self.name.isprintable(), "WeightSpec.name", "must be printable")
        wire.require(len(self.shape) <= 8, "WeightSpec.shape", "more than 8 dimensions")
        wire.require(
            all(0 < d < 2**31 for d in self.shape), "WeightSpec.shape", "dimensions must be 1..2^31"
        )
        # The update vector is float32; other dtypes would need their own conversion rules.
        wire.require(self.dtype == "float32", "WeightSpec.dtype", "only float32 is supported")

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def layout_size(layout: Sequence[WeightSpec]) -> int:
    """Length of the flat vector for `layout`."""
    return sum(spec.size for spec in layout)


def flatten(weights: Mapping[str, np.ndarray], layout: Sequence[WeightSpec]) -> np.ndarray:
    """Concatenate `weights` into one float32 vector in `layout` order."""
    out = np.empty(layout_size(layout), dtype=np.float32)
    start = 0
    for spec in layout:
        if spec.name not in weights:
            raise LayoutError(f"weights lack {spec.name!r}, which the layout lists")
        value = np.asarray(weights[spec.name])
        if value.shape != spec.shape:
            raise LayoutError(f"{spec.name}: shape {value.shape} differs from layout {spec.shape}")
        out[start : start + spec.size] = value.reshape(-1)
        start += spec.size
    return out


def unflatten(vector: np.ndarray, layout: Sequence[WeightSpec]) -> dict[str, np.ndarray]:
    """Split a flat vector into named float32 arrays (copies) following `layout`."""
    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.shape[0] != layout_size(layout):
        raise LayoutError(
            f"vector of shape {vector.shape} does not fit the layout's {layout_size(layout)} values"
        )
    out: dict[str, np.ndarray] = {}
    start = 0
    for spec in layout:
        out[spec.name] = vector[start : start + spec.size].astype(np.float32).reshape(spec.shape)
        start += spec.size
    return out


def _readable(var: Variable) -> tuple[int, int]:
    if var.offset is None:
        raise LayoutError(
            f"variable {var.name!r} has no constant, numeric initial value in the file, so it "
            "cannot be read or patched (was the model converted with resource variables?)"
        )
    return var.offset, var.nbytes


def _require_patchable(var: Variable) -> tuple[int, int]:
    location = _readable(var)
    if var.shared_with:
        raise SharedBufferError(
            f"variable {var.name!r} shares its initial-value buffer #{var.buffer} with "
            f"{', '.join(var.shared_with)}; the converter merges identical constants, so "
            "patching it would change them too. Rebuild the model with distinct initial values."
        )
    return location


def read_weights(data: bytes, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The initial values of the named variables (default: all readable ones), as copies."""
    info = _parse(data).info
    chosen = (
        [v for v in info.variables if v.offset is not None]
        if names is None
        else [info.variable(n) for n in names]
    )
    out: dict[str, np.ndarray] = {}
    for var in chosen:
        offset, _ = _readable(var)
        out[var.name] = (
            np.frombuffer(data, dtype=_variable_dtype(var), count=var.size, offset=offset)
            .reshape(var.shape)
            .copy()
        )
    return out


def _variable_dtype(var: Variable) -> np.dtype:
    return np.dtype(var.dtype).newbyteorder("<")  # TFLite stores little-endian


def patch_weights(data: bytes, weights: Mapping[str, np.ndarray]) -> bytes:
    """Return a copy of the model whose variables start from `weights`.

    Only the initial-value buffers change, in place, so everything else stays byte-identical.
    The embedded manifest's content hash no longer matches afterwards: call `embed_manifest`.
    A patched model takes effect in a fresh interpreter (the initializer runs once per one).
    """
    info = _parse(data).info
    out = bytearray(data)
    for name, value in weights.items():
        var = info.variable(name)
        offset, nbytes = _require_patchable(var)
        array = np.asarray(value)
        if array.shape != var.shape:
            raise LayoutError(f"{name}: shape {array.shape} does not match the model's {var.shape}")
        dtype = _variable_dtype(var)
        if dtype.kind != "f":
            raise LayoutError(f"{name}: patching {var.dtype} variables is not supported")
        if array.dtype.kind not in "fiu":
            raise LayoutError(f"{name}: weights must be numbers, not {array.dtype}")
        converted = np.ascontiguousarray(array, dtype=dtype)
        if not np.all(np.isfinite(converted)):
            raise LayoutError(f"{name}: refusing to ship NaN or infinite weights")
        out[offset : offset + nbytes] = converted.tobytes()
    return bytes(out)


def patch_flat(data: bytes, vector: np.ndarray, layout: Sequence[WeightSpec]) -> bytes:
    """`patch_weights` from a flat float32 vector in `layout` order."""
    return patch_weights(data, unflatten(vector, layout))


def default_layout(data: bytes) -> tuple[WeightSpec, ...]:
    """The weights the `get_weights` signature returns, in its order, as a layout."""
    info = _parse(data).info
    specs = []
    for out in info.signature("get_weights").outputs:
        var = info.variable(out.name)
        specs.append(WeightSpec(name=var.name, shape=var.shape, dtype=var.dtype))
    return tuple(specs)


def _check_layout(info: ModelInfo, layout: Sequence[WeightSpec]) -> None:
    for spec in layout:
        var = info.variable(spec.name)
        if var.shape != spec.shape or var.dtype != spec.dtype:
            raise LayoutError(
                f"layout says {spec.name} is {spec.dtype}{list(spec.shape)}, "
                f"the model holds {var.dtype}{list(var.shape)}"
            )
        _require_patchable(var)


# ------------------------------------------------------------------------------------ manifest


@wire.record
class ModelManifest(wire.Record):
    """What a model is: travels inside the .tflite (metadata) and beside it in a release.

    `version` counts aggregation rounds applied, plus one: version 1 is the initial model.
    `content_hash` is SHA-256 of the .tflite bytes with this hash's own 32 bytes zeroed.
    """

    model_id: str
    version: int
    layout: tuple[WeightSpec, ...]
    content_hash: bytes
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        wire.require_id(self.model_id, "ModelManifest.model_id")
        wire.require(1 <= self.version < 2**63, "ModelManifest.version", "must be 1..2^63-1")
        wire.require(len(self.layout) > 0, "ModelManifest.layout", "lists no variable")
        names = [spec.name for spec in self.layout]
        wire.require(len(set(names)) == len(names), "ModelManifest.layout", "repeats a name")
        wire.require(
            len(self.content_hash) == _HASH_SIZE, "ModelManifest.content_hash", "must be 32 bytes"
        )
        wire.require(len(set(self.labels)) == len(self.labels), "ModelManifest.labels", "repeats")
        wire.require(
            all(0 < len(label) <= 64 and label.isprintable() for label in self.labels),
            "ModelManifest.labels",
            "each label must be 1..64 printable characters",
        )

    @property
    def parameter_count(self) -> int:
        return layout_size(self.layout)


@wire.message("model.manifest")
class EmbeddedManifest(wire.Message):
    """The manifest as stored in model metadata; its content_hash is zeros (see _MANIFEST_MAGIC)."""

    manifest: ModelManifest

    def __post_init__(self) -> None:
        wire.require(
            self.manifest.content_hash == ZERO_HASH,
            "EmbeddedManifest.manifest.content_hash",
            "must be zeros; the hash lives in the payload header",
        )


def _manifest_slot(parsed: _Parsed) -> tuple[int, int] | None:
    """(start, capacity) of the manifest payload in the file, or None without a manifest."""
    if parsed.manifest_buffer is None:
        return None
    start, capacity = parsed.buffers[parsed.manifest_buffer]
    if capacity < _MANIFEST_HEADER or parsed.data[start : start + 8] != _MANIFEST_MAGIC:
        raise ModelFormatError(f"metadata {MANIFEST_METADATA_NAME!r} is not a fleetlearn manifest")
    return start, capacity


def _content_hash(parsed: _Parsed) -> bytes:
    data = parsed.data
    slot = _manifest_slot(parsed)
    digest = hashlib.sha256()
    if slot is None:
        digest.update(data)
    else:
        at = slot[0] + len(_MANIFEST_MAGIC)
        view = memoryview(data)
        digest.update(view[:at])
        digest.update(ZERO_HASH)
        digest.update(view[at + _HASH_SIZE :])
    return digest.digest()


def content_hash(data: bytes) -> bytes:
    """SHA-256 of the model with its manifest's hash field zeroed (plain SHA-256 without one)."""
    return _content_hash(_parse(data))


def _read_manifest(parsed: _Parsed) -> ModelManifest | None:
    slot = _manifest_slot(parsed)
    if slot is None:
        return None
    start, capacity = slot
    data = parsed.data
    at = start + len(_MANIFEST_MAGIC)
    stored_hash = data[at : at + _HASH_SIZE]
    body_size = _U32.unpack_from(data, at + _HASH_SIZE)[0]
    if body_size > capacity - _MANIFEST_HEADER:
        raise ModelFormatError("manifest body runs past its buffer")
    body = data[start + _MANIFEST_HEADER : start + _MANIFEST_HEADER + body_size]
    try:
        embedded = wire.decode(body, EmbeddedManifest)
    except wire.WireError as exc:
        raise ModelFormatError(f"embedded manifest is unreadable: {exc}") from None
    return replace(embedded.manifest, content_hash=stored_hash)


def read_manifest(data: bytes) -> ModelManifest | None:
    """The manifest embedded in the model, or None when it has none."""
    return _read_manifest(_parse(data))


def embed_manifest(
    data: bytes,
    *,
    model_id: str,
    version: int,
    layout: Sequence[WeightSpec] | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[bytes, ModelManifest]:
    """Write a manifest into the model's metadata and return (new bytes, manifest with hash).

    `layout` and `labels` default to those of the manifest already embedded; without one, the
    layout is what `get_weights` returns. Every layout variable must be patchable.
    """
    parsed = _parse(data)
    previous = _read_manifest(parsed)
    if layout is None:
        layout = previous.layout if previous else default_layout(data)
    if labels is None:
        labels = previous.labels if previous else ()
    _check_layout(parsed.info, layout)
    manifest = ModelManifest(
        model_id=model_id,
        version=version,
        layout=tuple(layout),
        labels=tuple(labels),
        content_hash=ZERO_HASH,
    )
    body = wire.encode(EmbeddedManifest(manifest=manifest))
    payload = _MANIFEST_MAGIC + ZERO_HASH + _U32.pack(len(body)) + body

    slot = _manifest_slot(parsed)
    if slot is not None and slot[1] >= len(payload):
        start, capacity = slot
        out = bytearray(data)
        out[start : start + capacity] = payload.ljust(capacity, b"\0")
    else:
        capacity = -(-(len(payload) + _MANIFEST_SLACK) // 64) * 64
        out, start = _insert_manifest_buffer(parsed, capacity)
        out[start : start + len(payload)] = payload

    rewritten = _parse(bytes(out))
    digest = _content_hash(rewritten)
    at = start + len(_MANIFEST_MAGIC)
    out[at : at + _HASH_SIZE] = digest
    # Self-check of the rewrite: same variables (bar their position), and the manifest reads back.
    moved = [replace(v, offset=None, buffer=None) for v in parsed.info.variables]
    if [replace(v, offset=None, buffer=None) for v in rewritten.info.variables] != moved or (
        _read_manifest(rewritten) != manifest
    ):
        raise ModelFormatError("rewriting the manifest damaged the model; file a bug")
    return bytes(out), replace(manifest, content_hash=digest)


# Model table fields (schema.fbs): 0 version (scalar); 1..9 references to children.
_MODEL_BUFFERS = 4
_MODEL_METADATA = 6
_MODEL_REFERENCES = range(1, 10)


def _insert_manifest_buffer(parsed: _Parsed, capacity: int) -> tuple[bytearray, int]:
    """Add a metadata entry with a zeroed data buffer of `capacity` bytes; rewrite the rest.

    Flatbuffer references only point forward, and a converter writes the root Model table
    first, right after its vtable. So new vectors (buffers and metadata, one entry longer) go
    right after the Model table, where they can still point at every old table; the Model's
    references are rewritten and the rest of the file moves down by a multiple of 16 bytes,
    which keeps every alignment. Returns (new file, start of the new data buffer).
    """
    data, model = parsed.data, parsed.model
    end = model.pos + model.inline_size  # insertion point
    if not (model.vtable >= 8 and model.vtable + model.vtable_size <= model.pos):
        raise ModelFormatError("cannot add a manifest: unusual layout (model vtable moved)")
    if model.slots() > max(_MODEL_REFERENCES) + 1:
        raise ModelFormatError("cannot add a manifest: the model uses a newer TFLite schema")
    fields: dict[int, int] = {}
    for slot in _MODEL_REFERENCES:
        pos = model.field(slot, 4)
        if pos is not None:
            fields[slot] = pos
            if model.fb.deref(pos, "model field") < end:
                raise ModelFormatError("cannot add a manifest: unusual layout (backward reference)")
    if _MODEL_BUFFERS not in fields or _MODEL_METADATA not in fields:
        raise ModelFormatError("cannot add a manifest: the model has no buffers or metadata field")
    for table in parsed.buffer_tables:
        if table.scalar(1, _U64, 0) > 1:
            raise ModelFormatError("cannot add a manifest to a model with external buffer data")

    fb = model.fb
    old_buffers = _element_targets(fb, fields[_MODEL_BUFFERS])
    keep = [
        target
        for target, (name, _) in zip(
            _element_targets(fb, fields[_MODEL_METADATA]), parsed.metadata, strict=True
        )
        if name != MANIFEST_METADATA_NAME
    ]

    block = bytearray()

    def here() -> int:
        return end + len(block)

    def align(alignment: int, phase: int = 0) -> None:
        block.extend(b"\0" * ((phase - here()) % alignment))

    def put(kind: struct.Struct, value: int) -> int:
        pos = here()
        block.extend(kind.pack(value))
        return pos

    def put_vector(count: int) -> tuple[int, list[int]]:
        align(4)
        at = put(_U32, count)
        return at, [put(_U32, 0) for _ in range(count)]

    buffers_vec, buffer_slots = put_vector(len(old_buffers) + 1)
    metadata_vec, metadata_slots = put_vector(len(keep) + 1)
    # Metadata { name: string; buffer: uint } -- vtable first, so soffset is positive.
    align(4)
    meta_vtable = here()
    for value in (8, 12, 4, 8):
        put(_U16, value)
    meta_table = put(_I32, 0)
    meta_name = put(_U32, 0)
    put(_U32, len(old_buffers))
    # Buffer { data: [ubyte] }
    align(4)
    buf_vtable = here()
    for value in (6, 8, 4):
        put(_U16, value)
    align(4)
    buf_table = put(_I32, 0)
    buf_data = put(_U32, 0)
    align(4)
    name_at = put(_U32, len(MANIFEST_METADATA_NAME))
    block.extend(MANIFEST_METADATA_NAME.encode() + b"\0")
    align(_BUFFER_ALIGN, phase=_BUFFER_ALIGN - 4)  # the bytes after the length are aligned
    data_at = put(_U32, capacity)
    block.extend(bytes(capacity))
    # The shift itself must be a multiple of 16, so the moved rest of the file stays aligned.
    block.extend(bytes(-len(block) % _BUFFER_ALIGN))
    shift = len(block)

    def point(at: int, target: int) -> None:
        _U32.pack_into(block, at - end, target - at)

    buffer_targets = [*(t + shift for t in old_buffers), buf_table]
    metadata_targets = [*(t + shift for t in keep), meta_table]
    for at, target in zip(
        buffer_slots + metadata_slots, buffer_targets + metadata_targets, strict=True
    ):
        point(at, target)
    _I32.pack_into(block, meta_table - end, meta_table - meta_vtable)
    point(meta_name, name_at)
    _I32.pack_into(block, buf_table - end, buf_table - buf_vtable)
    point(buf_data, data_at)

    head = bytearray(data[:end])
    for slot, pos in fields.items():
        if slot == _MODEL_BUFFERS:
            target = buffers_vec
        elif slot == _MODEL_METADATA:
            target = metadata_vec
        else:
            target = fb.deref(pos, "model field") + shift
        _U32.pack_into(head, pos, target - pos)
    out = head + block + data[end:]
    if len(out) > _MAX_MODEL_BYTES:
        raise ModelFormatError(f"model would grow past {_MAX_MODEL_BYTES} bytes")
    return out, data_at + 4


def _element_targets(fb: _Flatbuffer, field_pos: int) -> list[int]:
    start, count = fb.vector(fb.deref(field_pos, "model field"), 4, "model field")
    return [fb.deref(start + 4 * i, "model field") for i in range(count)]


# ------------------------------------------------------------------------------------- release

_RELEASE_LABEL = b"fleetlearn/release/v1"
_ZSTD_LEVEL = 9  # ~3 ms for 1M parameters; releases are made once per round, fetched by all
MAX_RELEASE_MODEL_BYTES = 48 * 1024 * 1024  # inside wire's 64 MiB decompressed limit
_SIGNATURE_SIZE = 64


@wire.message("model.release")
class ModelRelease(wire.Message):
    """A signed model: retained on `fl/{fleet}/model` (ARCHITECTURE §3, §6).

    The Ed25519 signature covers a canonical header: a domain label, every manifest field, the
    model's size and the SHA-256 of the compressed bytes. So every byte of a release is signed
    (zstd ignores some bits of a frame; signing the frame itself leaves no byte to flip
    unnoticed), the signature is checked before anything is decompressed, and the manifest's
    content hash then binds the model bytes to the manifest.
    """

    manifest: ModelManifest
    model_size: int  # bytes of the .tflite once decompressed; bounds decompression
    model_zst: bytes  # one zstd frame declaring model_size
    signature: bytes

    def __post_init__(self) -> None:
        wire.require(
            0 < self.model_size <= MAX_RELEASE_MODEL_BYTES,
            "ModelRelease.model_size",
            f"must be 1..{MAX_RELEASE_MODEL_BYTES}",
        )
        wire.require(len(self.model_zst) > 0, "ModelRelease.model_zst", "is empty")
        wire.require(
            len(self.signature) == _SIGNATURE_SIZE, "ModelRelease.signature", "must be 64 bytes"
        )


def _release_header(manifest: ModelManifest, model_size: int, model_zst: bytes) -> bytes:
    """The signed bytes: every variable-length part is length-prefixed, so the encoding is
    unambiguous, and the label keeps these signatures from meaning anything elsewhere."""
    parts = [_RELEASE_LABEL, manifest.model_id.encode()]
    out = bytearray()
    for part in parts:
        out += _U32.pack(len(part)) + part
    out += _U64.pack(manifest.version) + _U64.pack(model_size)
    out += _U32.pack(_HASH_SIZE) + hashlib.sha256(model_zst).digest()
    out += _U32.pack(len(manifest.content_hash)) + manifest.content_hash
    out += _U32.pack(len(manifest.layout))
    for spec in manifest.layout:
        name, dtype = spec.name.encode(), spec.dtype.encode()
        out += _U32.pack(len(name)) + name + _U32.pack(len(dtype)) + dtype
        out += _U32.pack(len(spec.shape)) + b"".join(_U64.pack(d) for d in spec.shape)
    out += _U32.pack(len(manifest.labels))
    for label in manifest.labels:
        encoded = label.encode()
        out += _U32.pack(len(encoded)) + encoded
    return bytes(out)


def make_release(
    model_bytes: bytes, manifest: ModelManifest, signing_key: nacl.signing.SigningKey
) -> ModelRelease:
    """Compress and sign a model whose embedded manifest is `manifest` (see embed_manifest)."""
    if len(model_bytes) > MAX_RELEASE_MODEL_BYTES:
        raise ReleaseError(f"model of {len(model_bytes)} bytes exceeds {MAX_RELEASE_MODEL_BYTES}")
    parsed = _parse(model_bytes)
    if _read_manifest(parsed) != manifest:
        raise ReleaseError("the manifest given is not the one embedded in the model")
    if _content_hash(parsed) != manifest.content_hash:
        raise ReleaseError(
            "the model changed after its manifest was embedded (patch first, then embed_manifest)"
        )
    _check_layout(parsed.info, manifest.layout)
    compressed = zstandard.ZstdCompressor(
        level=_ZSTD_LEVEL, write_content_size=True, write_checksum=True
    ).compress(model_bytes)
    header = _release_header(manifest, len(model_bytes), compressed)
    signature = signing_key.sign(header).signature
    return ModelRelease(
        manifest=manifest,
        model_size=len(model_bytes),
        model_zst=compressed,
        signature=signature,
    )


def release_weights(
    base_model: bytes,
    weights: Mapping[str, np.ndarray] | np.ndarray,
    *,
    version: int,
    signing_key: nacl.signing.SigningKey,
) -> ModelRelease:
    """The aggregator's one call per round: patch, re-embed the manifest, sign.

    `weights` is a name -> array mapping or a flat vector in the base manifest's layout.
    """
    base = read_manifest(base_model)
    if base is None:
        raise ReleaseError("the base model has no manifest; build it with `fleetlearn model build`")
    if isinstance(weights, np.ndarray):
        weights = unflatten(weights, base.layout)
    patched = patch_weights(base_model, weights)
    model, manifest = embed_manifest(patched, model_id=base.model_id, version=version)
    return make_release(model, manifest, signing_key)


def _decompress(release: ModelRelease) -> bytes:
    try:
        declared = zstandard.frame_content_size(release.model_zst)
    except zstandard.ZstdError:
        raise ContentMismatchError("model bytes are not a zstd frame") from None
    if declared != release.model_size:
        raise ContentMismatchError(
            f"compressed model declares {declared} bytes, the signed size is {release.model_size}"
        )
    try:
        model = zstandard.ZstdDecompressor().decompress(
            release.model_zst, max_output_size=release.model_size, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise ContentMismatchError(f"compressed model is corrupt ({exc})") from None
    if len(model) != release.model_size:
        raise ContentMismatchError("compressed model holds a different size than it declares")
    return model


def verify_release(
    release: ModelRelease, verify_key: nacl.signing.VerifyKey, *, min_version: int
) -> tuple[bytes, ModelManifest]:
    """Check a release before anything loads it; return (model bytes, manifest).

    Refuses, with a ReleaseError subclass: a bad signature or another key (SignatureError), a
    version below `min_version`, normally the installed one (RollbackError; an equal version
    is accepted so a retained re-delivery verifies), and model bytes that differ from what the
    manifest describes (ContentMismatchError).
    """
    if not isinstance(release, ModelRelease):
        raise ReleaseError(f"expected a ModelRelease, got {type(release).__name__}")
    manifest = release.manifest
    try:
        header = _release_header(manifest, release.model_size, release.model_zst)
        verify_key.verify(header, release.signature)
    except nacl.exceptions.BadSignatureError:
        raise SignatureError(
            f"release {manifest.model_id} v{manifest.version} is not signed by this fleet's "
            "aggregator key (altered in transit, or signed with another key); not installing it"
        ) from None
    if manifest.version < min_version:
        raise RollbackError(
            f"release {manifest.model_id} v{manifest.version} is older than the installed "
            f"v{min_version}; refusing to roll back"
        )
    model = _decompress(release)
    try:
        parsed = _parse(model)
        if _content_hash(parsed) != manifest.content_hash:
            raise ContentMismatchError("model bytes do not match the signed content hash")
        if _read_manifest(parsed) != manifest:
            raise ContentMismatchError("the manifest inside the model differs from the signed one")
        _check_layout(parsed.info, manifest.layout)
    except ReleaseError:
        raise
    except ModelError as exc:
        raise ContentMismatchError(f"signed model is unusable: {exc}") from None
    return model, manifest
