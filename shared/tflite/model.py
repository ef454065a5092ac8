"""What a .tflite file holds: operators, signatures, resource variables, metadata.

Owns the reading of the TFLite schema (schema.fbs, version 3) into an immutable `ModelInfo`
(`describe_model`), and the positions the other modules need to read or rewrite the file
(`_Parsed`, through `_parse`). A variable's initial value is the constant assigned to it in the
initializer subgraph (the one every signature runs once through CALL_ONCE); a constant that
another tensor also uses is recorded in `Variable.shared_with`.
Trusts nothing: bytes that are not a TFLite model it can read raise `ModelFormatError` (index
and shape checks on top of the reader's bounds checks). Pure, and the input is never modified;
equal bytes are parsed once (a small cache).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleetlearn.shared.tflite.errors import LayoutError, ModelFormatError
from fleetlearn.shared.tflite.flatbuffer import _I8, _I32, _U8, _U32, _U64, _Flatbuffer, _Table

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
_MAX_MODEL_BYTES = 512 * 1024 * 1024  # well above any fleet model; bounds every allocation

MANIFEST_METADATA_NAME = "fleetlearn.manifest"


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
