"""Hypothesis strategies for wire messages, derived from their field annotations.

Every registered message type gets a strategy built from the wire vocabulary; types whose
`__post_init__` rules are too narrow for random fields register an explicit strategy in
`EXPLICIT` (keyed by tag). Invalid draws are discarded with `assume`, and a type whose draws are
nearly all invalid fails hypothesis' health check, which tells its author to add one here.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from fleetlearn.shared import wire
from fleetlearn.shared.wire import codec

ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-_.:"
ids = st.text(ID_ALPHABET, min_size=1, max_size=12).map(lambda s: "d" + s)
DTYPES = ["|u1", "<u2", "<u4", "<u8", "|i1", "<i2", "<i4", "<i8", "<f4", "<f8"]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    count = int(np.prod(shape)) if shape else 1
    raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def for_annotation(hint: Any) -> st.SearchStrategy[Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is int:
        return st.integers(-(2**63), 2**64 - 1)
    if hint is float:
        return st.floats(allow_nan=True, allow_infinity=True)
    if hint is bool:
        return st.booleans()
    if hint is str:
        return st.one_of(ids, st.text(max_size=20))
    if hint is bytes:
        return st.binary(max_size=64)
    if hint is np.ndarray or origin is np.ndarray:
        return arrays()
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return st.sampled_from(list(hint))
    if isinstance(hint, type) and issubclass(hint, wire.Record):
        return for_type(hint)
    nested = codec._message_alternatives(hint)
    if nested:
        return st.one_of(*(for_type(c) for c in nested))
    if origin is tuple:
        return st.lists(for_annotation(args[0]), max_size=5).map(tuple)
    if origin is dict:
        return st.dictionaries(ids, for_annotation(args[1]), max_size=5)
    if origin in (typing.Union, types.UnionType):
        inner = args[0] if args[1] is type(None) else args[1]
        return st.one_of(st.none(), for_annotation(inner))
    raise TypeError(f"no strategy for {hint!r}")


EXPLICIT: dict[str, Callable[[], st.SearchStrategy[wire.Message]]] = {}


def _register_explicit() -> None:
    from tests.secagg_strategies import STRATEGIES as SECAGG
    from tests.sparse_strategies import STRATEGIES as SPARSE

    EXPLICIT.update(SPARSE)
    from tests.model_fixtures import STRATEGIES as MODEL

    EXPLICIT.update(MODEL)
    EXPLICIT.update(SECAGG)
    EXPLICIT["status"] = _status
    EXPLICIT["round.announce"] = _announce
    EXPLICIT["round.plain_update"] = _plain_update


unit = st.floats(0.0, 1.0)
finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)


def _status() -> st.SearchStrategy[wire.Message]:
    return st.builds(
        wire.DeviceStatus,
        device_id=ids,
        online=st.booleans(),
        eligibility=st.sampled_from(list(wire.Eligibility)),
        charging=st.booleans(),
        battery=unit,
        model_version=st.integers(0, 2**40),
        sdk_version=st.text(max_size=12),
        samples=st.integers(0, 10**6),
        note=st.text(max_size=40),
        ticket=st.sampled_from([0, 16]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
        ready_version=st.integers(0, 2**31 - 1),
    )


@st.composite
def _announce_draw(draw: st.DrawFn) -> wire.Message:
    from fleetlearn.shared import rounds
    from fleetlearn.shared.compression import Compression, SparseMode
    from fleetlearn.shared.secagg.config import DistributedNoise, SecAggConfig

    cohort = tuple(draw(st.lists(ids, min_size=3, max_size=8, unique=True)))
    mode = draw(st.sampled_from(list(rounds.RoundMode)))
    secure = mode in (rounds.RoundMode.SECURE, rounds.RoundMode.ASYNC_SECURE)
    sparse_mode = draw(
        st.sampled_from([SparseMode.RAND_K, SparseMode.DENSE] if secure else list(SparseMode))
    )
    if sparse_mode is SparseMode.DENSE:
        compression = Compression(mode=sparse_mode)
    elif sparse_mode is SparseMode.TOP_K:
        compression = Compression(mode=sparse_mode, density=draw(st.floats(0.001, 1.0)), bits=8)
    else:
        compression = Compression(
            mode=sparse_mode, density=draw(st.floats(0.001, 1.0)), bits=draw(st.integers(1, 24))
        )
    secagg = None
    if secure:
        secagg = SecAggConfig.create(
            cohort_size=len(cohort),
            dimension=draw(st.integers(1, 5000)),
            quant_bits=compression.bits if sparse_mode is SparseMode.RAND_K else 16,
            clip=compression.clip,
            noise=draw(
                st.none()
                | st.builds(
                    DistributedNoise.sized,
                    clip=st.floats(0.01, 10.0),
                    dimension=st.integers(1, 5000),
                    noise_multiplier=st.floats(0.1, 5.0),
                    least_survivors=st.integers(2, len(cohort)),
                )
            ),
        )
    soft = draw(st.lists(st.floats(0.5, 3600), min_size=4, max_size=4))
    hard = [s + draw(st.floats(0, 3600)) for s in soft]  # each hard limit >= its soft one
    round_id = draw(st.integers(0, 2**31 - 1))
    invited: tuple[str, ...] = ()
    invited_in: tuple[int, ...] = ()
    if mode in (rounds.RoundMode.ASYNC, rounds.RoundMode.ASYNC_SECURE):
        invited = tuple(draw(st.lists(ids, max_size=8, unique=True)))
        # each invitation's round, at most this one
        invited_in = tuple(draw(st.integers(0, round_id)) for _ in invited)
    return rounds.RoundAnnounce(
        round_id=round_id,
        mode=mode,
        model_version=draw(st.integers(1, 2**40)),
        cohort=cohort,
        seed=draw(st.binary(min_size=32, max_size=32)),
        compression=compression,
        training=rounds.TrainingPlan(
            epochs=draw(st.integers(1, 100)),
            max_samples=draw(st.integers(1, 10**6)),
            error_feedback=draw(st.booleans()),
            **draw(
                st.sampled_from([{}])
                | st.builds(
                    lambda c, z: {"local_clip": c, "local_noise": z},
                    st.floats(1e-3, 10.0),
                    st.floats(1e-3, 100.0),
                )
            ),
        ),
        times=rounds.StageTimes(
            advertise=soft[0],
            share=soft[1],
            collect=soft[2],
            unmask=soft[3],
            advertise_hard=hard[0],
            share_hard=hard[1],
            collect_hard=hard[2],
            unmask_hard=hard[3],
        ),
        secagg=secagg,
        state=draw(st.sampled_from(list(rounds.RoundState))),
        reason=draw(st.text(max_size=30)),
        tickets=draw(st.binary(min_size=16 * len(cohort), max_size=16 * len(cohort)))
        if secure or draw(st.booleans())
        else b"",
        invited=invited,
        invited_in=invited_in,
        max_staleness=draw(st.integers(0, 10_000)),
        staleness_exponent=draw(st.floats(0.0, 10.0)),
    )


def _announce() -> st.SearchStrategy[wire.Message]:
    return _announce_draw()


@st.composite
def _plain_update_draw(draw: st.DrawFn) -> wire.Message:
    from fleetlearn.shared import rounds
    from tests.sparse_strategies import STRATEGIES as SPARSE

    update = draw(st.one_of(SPARSE[t]() for t in ("update.sparse", "update.randk", "update.dense")))
    samples = draw(st.integers(0, 10**6))
    return rounds.PlainUpdate(
        round_id=draw(st.integers(0, 2**31 - 1)),
        sender=draw(ids),
        update=update,  # type: ignore[arg-type]
        weight=draw(st.floats(1e-6, 1e9)),
        loss=draw(st.floats(0, 1e6)),
        correct=draw(st.integers(0, samples)),
        samples=samples,
        base_version=draw(st.integers(0, 2**31 - 1)),
    )


def _plain_update() -> st.SearchStrategy[wire.Message]:
    return _plain_update_draw()


def for_type(cls: type[wire.Message]) -> st.SearchStrategy[Any]:
    if not EXPLICIT:
        _register_explicit()
    if not issubclass(cls, wire.Record) and cls.TAG in EXPLICIT:
        return EXPLICIT[cls.TAG]()
    hints = typing.get_type_hints(cls)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            has_default = f.default is not dataclasses.MISSING
            if has_default and draw(st.booleans()):
                continue
            kwargs[f.name] = draw(for_annotation(hints[f.name]))
        try:
            return cls(**kwargs)
        except wire.WireError:
            assume(False)
            raise  # unreachable: assume(False) aborts the example

    return build()


def full_map(message: wire.Message) -> dict[str, Any]:
    """`wire.to_map(message)` with every field present, those at their default too (the
    encoder leaves them out): fuzzers that mutate a map's fields then reach every field."""
    out = wire.to_map(message)
    _fill_defaults(message, out)
    return out


def _fill_defaults(obj: wire.Message, mapped: dict[str, Any]) -> None:
    for field in codec._codecs_for(type(obj)):
        value = getattr(obj, field.name)
        if field.name not in mapped:
            mapped[field.name] = field.to_wire(value)
        elif isinstance(value, wire.Message) and isinstance(mapped[field.name], dict):
            _fill_defaults(value, mapped[field.name])
        elif isinstance(value, tuple) and isinstance(mapped[field.name], list):
            for item, item_map in zip(value, mapped[field.name], strict=True):
                if isinstance(item, wire.Message) and isinstance(item_map, dict):
                    _fill_defaults(item, item_map)
