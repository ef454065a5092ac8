"""Unit and property tests for shared.compression: quantization, coordinates, codec, feedback.

Statistical tests use tolerances of a few standard errors computed from the test's own sample
size, so an implementation with a bias larger than that fails them.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.shared import wire
from fleetlearn.shared.compression import (
    Compression,
    CompressionError,
    DenseUpdate,
    ErrorFeedback,
    ResidualState,
    SharedUpdate,
    SparseMode,
    SparseUpdate,
    check_update,
    compress,
    coordinate_count,
    decode_update,
    dequantize,
    encode_dense,
    encode_rand_k,
    encode_top_k,
    quant_dtype,
    quant_step,
    quantize,
    quantize_symmetric,
    scatter,
    shared_coordinates,
    to_dense,
    to_sparse,
    top_k_coordinates,
    unpack_shared_sum,
)

SEED = bytes(range(32))
FAST = settings(max_examples=60, deadline=None)


def rng(n: int = 0) -> np.random.Generator:
    return np.random.default_rng(n)


# ------------------------------------------------------------------------------- quantization


def test_quantize_maps_clip_range_onto_grid_ends() -> None:
    q = quantize(np.array([-5.0, -1.0, 1.0, 7.0]), clip=1.0, bits=8, rng=rng())
    assert q.tolist() == [0, 0, 255, 255]
    assert q.dtype == np.uint32


@pytest.mark.parametrize(("bits", "dtype"), [(1, np.uint32), (32, np.uint32), (33, np.uint64)])
def test_quantize_dtype(bits: int, dtype: type) -> None:
    assert quantize(np.zeros(3), clip=1.0, bits=bits, rng=rng()).dtype == dtype
    assert quant_dtype(bits) == dtype


def test_quantize_62_bits_stays_on_grid() -> None:
    q = quantize(np.array([1.0, -1.0, 0.5]), clip=1.0, bits=62, rng=rng())
    assert q.dtype == np.uint64
    assert int(q[0]) == (1 << 62) - 1
    assert int(q[1]) == 0


@pytest.mark.parametrize("bits", [0, 63, True, 8.0, -1])
def test_quantize_rejects_bad_bits(bits: object) -> None:
    with pytest.raises(CompressionError, match="bits"):
        quantize(np.zeros(2), clip=1.0, bits=bits, rng=rng())  # type: ignore[arg-type]


@pytest.mark.parametrize("clip", [0.0, -1.0, math.nan, math.inf])
def test_quantize_rejects_bad_clip(clip: float) -> None:
    with pytest.raises(CompressionError, match="clip"):
        quantize(np.zeros(2), clip=clip, bits=8, rng=rng())


def test_quantize_rejects_non_finite_update() -> None:
    with pytest.raises(CompressionError, match="NaN"):
        quantize(np.array([0.0, np.nan]), clip=1.0, bits=8, rng=rng())


@pytest.mark.parametrize("frac", [0.1, 0.3, 0.5, 0.77, 0.95])
@pytest.mark.parametrize("bits", [2, 8, 16])
def test_stochastic_rounding_is_unbiased(frac: float, bits: int) -> None:
    # A value sitting `frac` of a step above a grid point, quantized N times.
    clip, n = 1.5, 200_000
    step = quant_step(clip, bits)
    x = -clip + (1 + frac) * step
    errors = (
        dequantize(
            quantize(np.full(n, x), clip=clip, bits=bits, rng=rng(bits)), clip=clip, bits=bits
        )
        - x
    )
    # Each draw errs by -frac*step or (1-frac)*step; std of the mean is step*sqrt(p(1-p)/n).
    standard_error = step * math.sqrt(frac * (1 - frac) / n)
    assert abs(errors.mean()) < 5 * standard_error
    # and it really is stochastic: both neighbours occur in the right proportion.
    ups = np.mean(errors > 0)
    assert abs(ups - frac) < 5 * math.sqrt(frac * (1 - frac) / n)


def test_unbiased_over_a_whole_vector() -> None:
    x = rng(1).normal(size=2000)
    clip, bits, draws = 2.0, 4, 400
    acc = np.zeros_like(x)
    for i in range(draws):
        acc += dequantize(quantize(x, clip=clip, bits=bits, rng=rng(100 + i)), clip=clip, bits=bits)
    mean_error = acc / draws - np.clip(x, -clip, clip)
    step = quant_step(clip, bits)
    # Per-coordinate std of the mean <= step/(2 sqrt(draws)); the average over 2000 coordinates
    # is then within ~0.001 step of zero unless the rounding is biased.
    assert abs(mean_error.mean()) < 5 * step / (2 * math.sqrt(draws * x.size))
    assert np.abs(mean_error).max() < 5 * step / (2 * math.sqrt(draws))


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    clip=st.floats(1e-3, 1e3),
    bits=st.integers(1, 52),
    spread=st.floats(0.1, 3.0),
)
def test_quantize_error_bound(seed: int, clip: float, bits: int, spread: float) -> None:
    x = rng(seed).normal(scale=spread * clip, size=257)
    q = quantize(x, clip=clip, bits=bits, rng=rng(seed + 1))
    assert int(q.max()) <= (1 << bits) - 1
    err = np.abs(dequantize(q, clip=clip, bits=bits) - np.clip(x, -clip, clip))
    # Documented: < step per coordinate (plus float64 rounding of the affine maps).
    assert err.max() < quant_step(clip, bits) * (1 + 1e-9) + 4 * clip * 2.0**-52


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), bits=st.integers(1, 20))
def test_dequantize_of_a_sum(seed: int, n: int, bits: int) -> None:
    clip = 0.7
    xs = rng(seed).normal(size=(n, 64))
    total = sum(
        (
            quantize(x, clip=clip, bits=bits, rng=rng(seed + i)).astype(np.uint64)
            for i, x in enumerate(xs)
        ),
        np.zeros(64, dtype=np.uint64),
    )
    got = dequantize(total, clip=clip, bits=bits, count=n)
    want = np.clip(xs, -clip, clip).sum(axis=0)
    assert np.abs(got - want).max() < n * quant_step(clip, bits) * (1 + 1e-9) + n * 1e-12


def test_dequantize_rejects_impossible_sums() -> None:
    with pytest.raises(CompressionError, match="outside"):
        dequantize(np.array([256], dtype=np.uint32), clip=1.0, bits=8)
    with pytest.raises(CompressionError, match="outside"):
        dequantize(np.array([3 * 255 + 1], dtype=np.uint32), clip=1.0, bits=8, count=3)
    with pytest.raises(CompressionError, match="integers"):
        dequantize(np.array([1.0]), clip=1.0, bits=8)
    assert dequantize(np.array([3 * 255], dtype=np.uint32), clip=1.0, bits=8, count=3)[0] == 3.0


def test_masked_sum_wraps_and_still_dequantizes() -> None:
    # What SecAgg does with these grids: add masks that cancel modulo 2^32, sum with
    # wraparound, and dequantize the unmasked total with count = number of devices.
    n, k, clip, bits = 7, 500, 1.0, 16
    xs = rng(2).normal(scale=0.4, size=(n, k))
    grids = [quantize(x, clip=clip, bits=bits, rng=rng(10 + i)) for i, x in enumerate(xs)]
    masks = rng(3).integers(0, 2**32, size=(n, k), dtype=np.uint32)
    masks[-1] = -masks[:-1].sum(axis=0, dtype=np.uint32)  # the masks sum to 0 mod 2^32
    masked = [g + m for g, m in zip(grids, masks, strict=True)]
    total = np.zeros(k, dtype=np.uint32)
    for y in masked:
        total += y
    plain = sum((g.astype(np.uint64) for g in grids), np.zeros(k, dtype=np.uint64))
    assert np.array_equal(total.astype(np.uint64), plain)
    got = dequantize(total, clip=clip, bits=bits, count=n)
    assert np.abs(got - np.clip(xs, -clip, clip).sum(axis=0)).max() < n * quant_step(clip, bits)


# ------------------------------------------------------------------------ shared coordinates


def reference_coordinates(seed: bytes, dim: int, k: int) -> list[int]:
    """The rand-k selection spelled out in plain Python (no numpy), from the docstring's spec,
    reading the keystream one 4-byte word at a time."""
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"fleetlearn/sparse/rand-k/v1" + dim.to_bytes(8, "big"),
    ).derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    limit = (2**32 // dim) * dim
    count = k if 2 * k <= dim else dim - k
    drawn: set[int] = set()
    while len(drawn) < count:
        word = int.from_bytes(stream.update(bytes(4)), "little")
        if word < limit:
            drawn.add(word % dim)
    if 2 * k <= dim:
        return sorted(drawn)
    return [i for i in range(dim) if i not in drawn]


@pytest.mark.parametrize(
    ("dim", "k"),
    [
        (1, 1),
        (2, 1),
        (3, 2),
        (1000, 10),
        (4097, 2000),
        (5000, 2500),
        (5000, 2501),
        (5000, 4999),
        (3, 3),
        (1_000_003, 400),
    ],
)
def test_shared_coordinates_match_reference(dim: int, k: int) -> None:
    assert shared_coordinates(SEED, dim, k).tolist() == reference_coordinates(SEED, dim, k)


def test_shared_coordinates_known_answer() -> None:
    # Pinned output: every device in a fleet, whatever its numpy, must pick these. A change
    # here is a wire-protocol change (it splits a fleet running two versions).
    pinned = [52, 88, 335, 356, 362, 401, 445, 598, 688, 939]
    assert shared_coordinates(SEED, 1000, 10).tolist() == pinned


def test_shared_coordinates_identical_across_devices() -> None:
    # Devices compute independently; nothing is cached between calls.
    per_device = [shared_coordinates(SEED, 100_000, 1000) for _ in range(5)]
    for other in per_device[1:]:
        assert np.array_equal(per_device[0], other)


@FAST
@given(seed=st.binary(min_size=32, max_size=32), dim=st.integers(1, 5000), frac=st.floats(0, 1))
def test_shared_coordinates_shape(seed: bytes, dim: int, frac: float) -> None:
    k = max(1, min(dim, round(frac * dim)))
    c = shared_coordinates(seed, dim, k)
    assert c.dtype == np.int64
    assert c.shape == (k,)
    assert np.all(np.diff(c) > 0)
    assert c[0] >= 0
    assert c[-1] < dim
    assert np.array_equal(c, shared_coordinates(seed, dim, k))


def test_shared_coordinates_differ_across_seeds() -> None:
    dim, k = 10_000, 100
    a = set(shared_coordinates(SEED, dim, k).tolist())
    for i in range(20):
        other = set(shared_coordinates(bytes([i]) * 32, dim, k).tolist())
        # Independent draws overlap in ~k*k/dim = 1 coordinate; 15 would be absurd.
        assert len(a & other) < 15


def test_shared_coordinates_depend_on_dim_and_nest_in_k() -> None:
    assert not np.array_equal(
        shared_coordinates(SEED, 1000, 50), shared_coordinates(SEED, 1001, 50)
    )
    small, large = shared_coordinates(SEED, 1000, 50), shared_coordinates(SEED, 1000, 300)
    assert set(small.tolist()) <= set(large.tolist())


@pytest.mark.parametrize("k", [6, 30, 40])  # draws, the boundary, and the complement
def test_shared_coordinates_are_uniform(k: int) -> None:
    # Each coordinate should be chosen with probability p = k/dim. Over 3000 seeds the count per
    # coordinate is Binomial(3000, p). A selection skewed towards some indices (modulo bias,
    # bad tie-breaking, an off-by-one at either end) fails this.
    dim, seeds = 60, 3000
    p = k / dim
    counts = np.zeros(dim)
    for i in range(seeds):
        counts[shared_coordinates(i.to_bytes(32, "big"), dim, k)] += 1
    mean, sd = seeds * p, math.sqrt(seeds * p * (1 - p))
    assert np.abs(counts - mean).max() < 5 * sd
    chi2 = float(((counts - mean) ** 2 / (sd * sd)).sum())
    assert chi2 < 120  # 59 degrees of freedom; P(chi2 > 120) < 1e-5 when uniform


@pytest.mark.parametrize(
    ("seed", "dim", "k"),
    [(b"short", 10, 1), (bytes(33), 10, 1), (SEED, 0, 1), (SEED, 10, 0), (SEED, 10, 11)],
)
def test_shared_coordinates_reject_bad_arguments(seed: bytes, dim: int, k: int) -> None:
    with pytest.raises(CompressionError):
        shared_coordinates(seed, dim, k)


def test_coordinate_count() -> None:
    assert coordinate_count(100_000, 0.01) == 1000
    assert coordinate_count(1_000_000, 0.1) == 100_000
    assert coordinate_count(10, 0.001) == 1
    assert coordinate_count(10, 1.0) == 10
    with pytest.raises(CompressionError):
        coordinate_count(10, 0.0)


# --------------------------------------------------------------------------------- top-k path


def test_top_k_picks_largest_magnitudes() -> None:
    x = rng(4).normal(size=5000)
    idx = top_k_coordinates(x, 50)
    assert np.all(np.diff(idx) > 0)
    assert set(idx.tolist()) == set(np.argsort(-np.abs(x))[:50].tolist())


def test_quantize_symmetric_is_unbiased_and_bounded() -> None:
    x = rng(5).normal(size=1000)
    draws = 300
    acc = np.zeros_like(x)
    for i in range(draws):
        ints, scale = quantize_symmetric(x, bits=8, rng=rng(i))
        assert ints.dtype == np.int8
        assert np.abs(ints.astype(int)).max() <= 127
        assert scale == float(np.float32(scale))
        decoded = ints * scale
        assert np.abs(decoded - x).max() < scale
        acc += decoded
    # Documented error < scale = max|x|/127; the mean of 300 draws has std < scale/(2*sqrt(300)).
    scale = float(np.abs(x).max()) / 127
    assert np.abs(acc / draws - x).max() < 5 * scale / (2 * math.sqrt(draws))
    assert abs((acc / draws - x).mean()) < 5 * scale / (2 * math.sqrt(draws * x.size))


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.85])
@pytest.mark.parametrize("bits", [8, 16])
def test_symmetric_rounding_is_unbiased_at_each_fraction(frac: float, bits: int) -> None:
    # The first value fixes the scale to exactly 1.0 (127 or 32767 is the peak); the rest sit
    # `frac` of a step above a grid point, on both signs.
    levels, n = (1 << (bits - 1)) - 1, 100_000
    x = np.concatenate([[float(levels)], np.full(n, 3 + frac), np.full(n, -7 + frac)])
    ints, scale = quantize_symmetric(x, bits=bits, rng=rng(bits))
    assert scale == 1.0
    for part in (slice(1, n + 1), slice(n + 1, None)):
        errors = ints[part] * scale - x[part]
        assert abs(errors.mean()) < 5 * math.sqrt(frac * (1 - frac) / n)


def test_quantize_symmetric_zero_and_int16() -> None:
    ints, scale = quantize_symmetric(np.zeros(4), bits=8, rng=rng())
    assert scale == 0.0
    assert not ints.any()
    ints, scale = quantize_symmetric(np.array([-3.0, 1.0]), bits=16, rng=rng())
    assert ints.dtype == np.int16
    assert ints[0] == -32767
    with pytest.raises(CompressionError):
        quantize_symmetric(np.ones(2), bits=12, rng=rng())


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    dim=st.integers(1, 3000),
    density=st.floats(0.001, 1.0),
    bits=st.sampled_from([8, 16]),
    scale=st.floats(1e-6, 1e6),
)
def test_top_k_roundtrip_within_bound(
    seed: int, dim: int, density: float, bits: int, scale: float
) -> None:
    x = rng(seed).standard_t(3, size=dim) * scale
    config = Compression(mode=SparseMode.TOP_K, density=density, bits=bits)
    k = config.k(dim)
    msg = encode_top_k(x, k=k, bits=bits, rng=rng(seed + 1))
    back = decode_update(wire.encode(msg), config=config, dim=dim)
    assert back == msg
    idx, vals = to_sparse(back, config=config, dim=dim)
    assert np.array_equal(idx, top_k_coordinates(x, k))
    # Documented bound: sent coordinates within scale = max|sent|/(2^(bits-1)-1), rest are 0.
    assert np.abs(vals - x[idx]).max() <= back.scale
    assert back.scale <= np.abs(x[idx]).max() / ((1 << (bits - 1)) - 1) * (1 + 2.0**-23)
    dense = to_dense(back, config=config, dim=dim)
    assert np.count_nonzero(np.delete(dense, idx)) == 0


def test_gap_dtype_is_the_smallest_that_fits() -> None:
    x = np.zeros(100_000)
    x[[3, 200]] = 1.0
    assert encode_top_k(x, k=2, bits=8, rng=rng()).gaps.dtype == np.uint8
    x[70_000] = 1.0
    assert encode_top_k(x, k=3, bits=8, rng=rng()).gaps.dtype == np.uint32
    x = np.zeros(100_000)
    x[[3, 2000]] = 1.0
    assert encode_top_k(x, k=2, bits=8, rng=rng()).gaps.dtype == np.uint16


# -------------------------------------------------------------------------------- rand-k path


@FAST
@given(
    seed=st.binary(min_size=32, max_size=32),
    dim=st.integers(1, 3000),
    density=st.floats(0.001, 1.0),
    bits=st.integers(1, 32),
    clip=st.floats(0.01, 100.0),
)
def test_rand_k_roundtrip_within_bound(
    seed: bytes, dim: int, density: float, bits: int, clip: float
) -> None:
    x = rng(dim).normal(scale=clip / 2, size=dim)
    config = Compression(mode=SparseMode.RAND_K, density=density, bits=bits, clip=clip)
    msg = encode_rand_k(x, seed=seed, k=config.k(dim), clip=clip, bits=bits, rng=rng(1))
    back = decode_update(wire.encode(msg), config=config, dim=dim)
    assert back == msg
    idx, vals = to_sparse(back, config=config, dim=dim, seed=seed)
    assert np.array_equal(idx, shared_coordinates(seed, dim, config.k(dim)))
    err = np.abs(vals - np.clip(x[idx], -clip, clip))
    assert err.max() < quant_step(clip, bits) * (1 + 1e-9) + 4 * clip * 2.0**-52


def test_rand_k_sum_of_devices_via_unpack_shared_sum() -> None:
    dim, n = 20_000, 9
    config = Compression(mode=SparseMode.RAND_K, density=0.05, bits=12, clip=3.0)
    updates = rng(6).normal(size=(n, dim))
    results = [compress(u, config, rng=rng(20 + i), seed=SEED) for i, u in enumerate(updates)]
    total = np.zeros(config.k(dim), dtype=np.uint32)
    for r in results:
        assert isinstance(r.message, SharedUpdate)
        total += r.message.grid()
    summed = unpack_shared_sum(total, config=config, dim=dim, seed=SEED, count=n)
    assert np.allclose(summed, sum(r.sent for r in results), rtol=0, atol=1e-9)


def test_rand_k_needs_the_seed() -> None:
    config = Compression(mode=SparseMode.RAND_K, density=0.5, bits=8)
    with pytest.raises(CompressionError, match="seed"):
        compress(np.ones(10), config, rng=rng())
    msg = compress(np.ones(10), config, rng=rng(), seed=SEED).message
    with pytest.raises(CompressionError, match="seed"):
        to_dense(msg, config=config, dim=10)


# ---------------------------------------------------------------------------- bytes accounting


def test_bytes_accounting() -> None:
    x = rng(7).normal(size=100_000)
    for config in (
        Compression(mode=SparseMode.DENSE),
        Compression(mode=SparseMode.TOP_K, density=0.01, bits=8),
        Compression(mode=SparseMode.RAND_K, density=0.1, bits=8, clip=3.0),
    ):
        msg = compress(x, config, rng=rng(), seed=SEED).message
        assert msg.dense_bytes == 4 * 100_000
        assert msg.wire_bytes == len(wire.encode(msg))
    top1 = encode_top_k(x, k=1000, bits=8, rng=rng())
    # 1000 int8 values + gaps (mostly < 256, so one byte) + envelope: far below 1/50 of dense.
    assert top1.wire_bytes < top1.dense_bytes / 50
    assert encode_dense(x).wire_bytes > 0.85 * encode_dense(x).dense_bytes  # noise: zstd can't


def test_encoders_reject_bad_updates() -> None:
    for bad in (np.zeros((2, 2)), np.zeros(0), np.array([1.0, np.inf]), np.array(["a"])):
        with pytest.raises(CompressionError):
            encode_dense(bad)
    with pytest.raises(CompressionError, match="float32"):
        encode_dense(np.array([1e300]))


# ------------------------------------------------------------------- hostile and wrong updates


def frame(fields: dict[str, object], tag: str) -> bytes:
    """A payload built by hand, bypassing the message classes, as a hostile sender would."""
    raw = msgpack.packb({"v": 1, "t": tag, **fields}, use_bin_type=True)
    return zstandard.ZstdCompressor(write_content_size=True).compress(raw)


def arr(values: list[int] | list[float], dtype: str) -> dict[str, object]:
    a = np.asarray(values, dtype=dtype)
    return {"d": a.dtype.str, "s": [len(values)], "b": a.tobytes()}


def sparse_fields(**over: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "dim": 100,
        "gaps": arr([3, 4, 10], "<u1"),
        "values": arr([5, -7, 127], "|i1"),
        "scale": 0.5,
    }
    fields.update(over)
    return fields


TOPK = Compression(mode=SparseMode.TOP_K, density=0.03, bits=8)


def test_hand_built_sparse_payload_decodes() -> None:
    msg = decode_update(frame(sparse_fields(), "update.sparse"), config=TOPK, dim=100)
    assert isinstance(msg, SparseUpdate)
    assert msg.indices().tolist() == [3, 7, 17]
    dense = to_dense(msg, config=TOPK, dim=100)
    assert dense[[3, 7, 17]].tolist() == [2.5, -3.5, 63.5]


@pytest.mark.parametrize(
    ("over", "field", "problem"),
    [
        ({"gaps": arr([3, 4, 93], "<u1")}, "SparseUpdate.gaps", "not below 100"),  # index 100
        ({"gaps": arr([99, 1, 1], "<u1")}, "SparseUpdate.gaps", "not below"),
        ({"gaps": arr([3, 0, 10], "<u1")}, "SparseUpdate.gaps", "strictly increasing"),  # dup
        ({"gaps": arr([30, -10, 2], "<i4")}, "SparseUpdate.gaps", "dtype"),  # unsorted, signed
        # unsorted written as a uint32 wrap-around "negative" gap (30 then 20)
        ({"gaps": arr([30, 2**32 - 10, 2], "<u4")}, "SparseUpdate.gaps", "not below"),
        ({"gaps": arr([3.0, 4.0, 1.0], "<f4")}, "SparseUpdate.gaps", "dtype"),
        ({"gaps": arr([3, 4], "<u1")}, "SparseUpdate.values", "3 values for 2 indices"),
        ({"values": arr([1, 2, 3, 4], "|i1")}, "SparseUpdate.values", "4 values for 3"),
        ({"values": arr([1, -128, 3], "|i1")}, "SparseUpdate.values", "-127..127"),
        ({"values": arr([1, 2, 3], "<i4")}, "SparseUpdate.values", "dtype"),
        ({"values": arr([1.0, 2.0, 3.0], "<f4")}, "SparseUpdate.values", "dtype"),
        ({"gaps": arr([], "<u1"), "values": arr([], "|i1")}, "SparseUpdate.gaps", "0 indices"),
        ({"scale": math.nan}, "SparseUpdate.scale", "float32"),
        ({"scale": 1e300}, "SparseUpdate.scale", "float32"),
        ({"scale": 0.1}, "SparseUpdate.scale", "float32"),  # 0.1 is not a float32 number
        ({"scale": -0.5}, "SparseUpdate.scale", ">= 0"),
        ({"dim": 0}, "SparseUpdate.dim", "outside"),
        ({"dim": 2**40}, "SparseUpdate.dim", "outside"),
        ({"dim": 2}, "SparseUpdate.gaps", "3 indices for 2"),
        ({"sender": "dev-1"}, "SparseUpdate", "unknown field"),  # the envelope carries it
        ({"extra": 1}, "SparseUpdate", "unknown field"),
    ],
)
def test_hostile_sparse_payloads_raise_schema_error(
    over: dict[str, object], field: str, problem: str
) -> None:
    with pytest.raises(wire.SchemaError, match=problem) as caught:
        decode_update(frame(sparse_fields(**over), "update.sparse"), config=TOPK, dim=100)
    assert caught.value.field == field


def shared_fields(**over: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "dim": 100,
        "bits": 8,
        "clip": 1.0,
        "values": arr(list(range(10)), "|u1"),
    }
    fields.update(over)
    return fields


RANDK = Compression(mode=SparseMode.RAND_K, density=0.1, bits=8, clip=1.0)


@pytest.mark.parametrize(
    ("over", "field", "problem"),
    [
        ({"values": arr(list(range(10)), "<u2")}, "SharedUpdate.values", "dtype"),
        ({"bits": 4, "values": arr([16] * 10, "|u1")}, "SharedUpdate.values", "4 bits"),
        ({"bits": 33}, "SharedUpdate.bits", "1..32"),
        ({"clip": math.inf}, "SharedUpdate.clip", "finite"),
        ({"values": arr([], "|u1")}, "SharedUpdate.values", "0 values"),
        ({"dim": 5}, "SharedUpdate.values", "10 values for 5"),
    ],
)
def test_hostile_shared_payloads_raise_schema_error(
    over: dict[str, object], field: str, problem: str
) -> None:
    with pytest.raises(wire.SchemaError, match=problem) as caught:
        decode_update(frame(shared_fields(**over), "update.randk"), config=RANDK, dim=100)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("payload", "config", "field"),
    [
        # well-formed, but not what the round asked for
        (frame(shared_fields(values=arr([1] * 11, "|u1")), "update.randk"), RANDK, "values"),
        (frame(shared_fields(values=arr([1] * 9, "|u1")), "update.randk"), RANDK, "values"),
        (frame(shared_fields(bits=7), "update.randk"), RANDK, "bits"),
        (frame(shared_fields(clip=2.0), "update.randk"), RANDK, "clip"),
        (frame(shared_fields(dim=200), "update.randk"), RANDK, "dim"),
        (frame(sparse_fields(dim=101), "update.sparse"), TOPK, "dim"),
        (
            frame(
                sparse_fields(gaps=arr([3, 4], "<u1"), values=arr([1, 1], "|i1")), "update.sparse"
            ),
            TOPK,
            "gaps",
        ),
        (
            frame(sparse_fields(values=arr([1, 2, 3], "<i2")), "update.sparse"),
            TOPK,
            "values",
        ),
    ],
)
def test_updates_that_do_not_fit_the_round_raise_context_error(
    payload: bytes, config: Compression, field: str
) -> None:
    with pytest.raises(wire.ContextError) as caught:
        decode_update(payload, config=config, dim=100)
    assert caught.value.field is not None
    assert caught.value.field.endswith(field)


def test_wrong_update_type_for_the_mode_is_rejected() -> None:
    with pytest.raises(wire.SchemaError, match="expected SharedUpdate"):
        decode_update(frame(sparse_fields(), "update.sparse"), config=RANDK, dim=100)
    msg = encode_dense(np.ones(100))
    with pytest.raises(wire.ContextError, match="rand_k round takes SharedUpdate"):
        to_dense(msg, config=RANDK, dim=100, seed=SEED)


def test_check_update_applies_to_a_message_object() -> None:
    # The plain path decodes an envelope that holds the update; the check runs on the object.
    msg = encode_top_k(rng(13).normal(size=100), k=3, bits=8, rng=rng())
    check_update(msg, config=TOPK, dim=100)
    with pytest.raises(wire.ContextError, match="the model has 101"):
        check_update(msg, config=TOPK, dim=101)


def hostile_array() -> st.SearchStrategy[dict[str, object]]:
    dtypes = st.sampled_from(["|u1", "<u2", "<u4", "<u8", "|i1", "<i2", "<i4", "<f4", "<f8"])

    def build(dtype: str, data: bytes, n: int) -> dict[str, object]:
        return {"d": dtype, "s": [n], "b": data}

    return st.builds(build, dtypes, st.binary(max_size=64), st.integers(0, 70))


@settings(max_examples=300, deadline=None)
@given(
    dim=st.one_of(st.integers(-5, 300), st.just(2**63)),
    gaps=hostile_array(),
    values=hostile_array(),
    scale=st.one_of(st.floats(allow_nan=True), st.integers(-3, 3), st.text(max_size=2)),
    mode=st.sampled_from(list(SparseMode)),
)
def test_garbage_only_raises_wire_errors(
    dim: int, gaps: dict[str, object], values: dict[str, object], scale: object, mode: SparseMode
) -> None:
    config = {
        SparseMode.TOP_K: TOPK,
        SparseMode.RAND_K: RANDK,
        SparseMode.DENSE: Compression(mode=SparseMode.DENSE),
    }[mode]
    for tag, fields in (
        ("update.sparse", {"dim": dim, "gaps": gaps, "values": values, "scale": scale}),
        ("update.randk", {"dim": dim, "bits": 8, "clip": scale, "values": values}),
        ("update.dense", {"values": values}),
    ):
        try:
            msg = decode_update(frame(fields, tag), config=config, dim=100)
        except wire.WireError:
            continue
        # Anything accepted must honour the invariants the aggregator relies on.
        idx, vals = to_sparse(msg, config=config, dim=100, seed=SEED)
        assert np.all(np.diff(idx) > 0)
        assert idx[0] >= 0
        assert idx[-1] < 100
        assert np.all(np.isfinite(vals))


@FAST
@given(data=st.binary(max_size=200), cut=st.integers(0, 400))
def test_mangled_bytes_only_raise_wire_errors(data: bytes, cut: int) -> None:
    good = wire.encode(encode_top_k(rng(8).normal(size=100), k=3, bits=8, rng=rng()))
    for payload in {data, good[:cut], good[:cut] + data, data + good} - {good}:
        with pytest.raises(wire.WireError):
            decode_update(payload, config=TOPK, dim=100)


# ----------------------------------------------------------------------------- error feedback


CONFIGS = [
    Compression(mode=SparseMode.TOP_K, density=0.01, bits=8),
    Compression(mode=SparseMode.TOP_K, density=0.2, bits=16),
    Compression(mode=SparseMode.RAND_K, density=0.1, bits=6, clip=0.5),
    Compression(mode=SparseMode.RAND_K, density=1.0, bits=16, clip=4.0),
    Compression(mode=SparseMode.DENSE),
]


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    config=st.sampled_from(CONFIGS),
    rounds=st.integers(1, 25),
    dim=st.integers(1, 800),
    scale=st.floats(1e-3, 1e3),
)
def test_error_feedback_conserves_the_running_sum(
    seed: int, config: Compression, rounds: int, dim: int, scale: float
) -> None:
    r = rng(seed)
    ef = ErrorFeedback(dim)
    raw_sum = np.zeros(dim)
    sent_sum = np.zeros(dim)
    for t in range(rounds):
        update = r.standard_t(3, size=dim) * scale
        raw_sum += update
        round_seed = r.bytes(32)
        result = ef.compress(update, config, rng=r, seed=round_seed)
        # `sent` is exactly what the aggregator decodes from the message.
        decoded = to_dense(result.message, config=config, dim=dim, seed=round_seed)
        assert np.array_equal(decoded, result.sent)
        sent_sum += result.sent
        tolerance = 1e-9 * (np.abs(raw_sum).max() + np.abs(ef.residual).max() + scale) * (t + 1)
        assert np.abs(sent_sum + ef.residual - raw_sum).max() <= tolerance
    assert ef.rounds == rounds


def test_error_feedback_eventually_sends_everything() -> None:
    # A constant update of which top-1% is sent each round: with error feedback the average of
    # what was sent tends to the update (it is update - residual/rounds, and the residual stays
    # around |update|_1 / k ~ 80 here); without, the small coordinates are never sent.
    dim, rounds = 1000, 1600
    update = rng(9).normal(size=dim)
    config = Compression(mode=SparseMode.TOP_K, density=0.01, bits=8)
    ef = ErrorFeedback(dim)
    with_ef = sum(ef.compress(update, config, rng=rng(t)).sent for t in range(rounds)) / rounds
    without = sum(compress(update, config, rng=rng(t)).sent for t in range(rounds)) / rounds
    assert np.abs(with_ef - update).max() < 0.05 * np.abs(update).max()
    assert np.count_nonzero(without) <= 10 + 5  # only the same top ~10 ever move
    assert np.linalg.norm(without - update) > 0.9 * np.linalg.norm(update)


def test_error_feedback_save_load_continues_identically() -> None:
    dim = 500
    config = Compression(mode=SparseMode.TOP_K, density=0.05, bits=8)
    updates = rng(10).normal(size=(6, dim))
    straight = ErrorFeedback(dim)
    restarted = ErrorFeedback(dim)
    for t, u in enumerate(updates):
        a = straight.compress(u, config, rng=rng(t))
        b = restarted.compress(u, config, rng=rng(t))
        assert a.message == b.message
        # the device "restarts" after every round, keeping only the saved bytes
        restarted = ErrorFeedback.load(restarted.save(), dim=dim)
        assert np.array_equal(restarted.residual, straight.residual)
        assert restarted.rounds == straight.rounds
    restarted.compress(updates[0], config, rng=rng())  # the loaded residual is writable


def test_reclaim_puts_back_an_update_that_was_not_applied() -> None:
    dim = 300
    config = Compression(mode=SparseMode.RAND_K, density=0.1, bits=8, clip=1.0)
    ef = ErrorFeedback(dim)
    update = rng(11).normal(size=dim)
    result = ef.compress(update, config, rng=rng(), seed=SEED)
    ef.reclaim(result.sent)
    assert np.allclose(ef.residual, update, atol=1e-12)


def test_accumulate_commit_with_an_outside_quantizer() -> None:
    # The secure path: SecAgg scales by the FedAvg weight, clips and quantizes on its own; the
    # device commits what the aggregator will decode, in update units, and the sum is conserved.
    dim, k, weight, clip, bits = 400, 40, 0.25, 0.05, 10
    ef = ErrorFeedback(dim)
    r = rng(14)
    raw_sum, sent_sum = np.zeros(dim), np.zeros(dim)
    for _ in range(30):
        update = r.normal(scale=0.1, size=dim)
        raw_sum += update
        accumulated = ef.accumulate(update)
        idx = shared_coordinates(r.bytes(32), dim, k)
        grid = quantize(weight * accumulated[idx], clip=clip, bits=bits, rng=r)
        sent = scatter(idx, dequantize(grid, clip=clip, bits=bits) / weight, dim)
        ef.commit(sent)
        sent_sum += sent
    assert np.allclose(sent_sum + ef.residual, raw_sum, rtol=0, atol=1e-10)
    assert ef.rounds == 30
    with pytest.raises(CompressionError, match="without accumulate"):
        ef.commit(sent)


def test_residual_is_read_only() -> None:
    ef = ErrorFeedback(4)
    with pytest.raises(ValueError, match="read-only"):
        ef.residual[0] = 1.0


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not zstd at all",
        wire.encode(encode_dense(np.ones(3))),  # a different message type
        frame({"residual": arr([1.0, math.nan], "<f8"), "rounds": 1}, "sparse.residual"),
        frame({"residual": arr([1.0, 2.0], "<f4"), "rounds": 1}, "sparse.residual"),
        frame({"residual": arr([1.0, 2.0], "<f8"), "rounds": -1}, "sparse.residual"),
        frame({"residual": arr([], "<f8"), "rounds": 0}, "sparse.residual"),
        frame({"rounds": 0}, "sparse.residual"),
    ],
)
def test_hostile_residual_bytes_raise_wire_error(payload: bytes) -> None:
    with pytest.raises(wire.WireError):
        ErrorFeedback.load(payload)


def test_residual_for_another_model_is_refused() -> None:
    saved = ErrorFeedback(10).save()
    with pytest.raises(wire.ContextError, match="10 parameters"):
        ErrorFeedback.load(saved, dim=11)
    assert isinstance(wire.decode(saved), ResidualState)


def test_error_feedback_rejects_wrong_size_update() -> None:
    with pytest.raises(CompressionError, match="expected 10"):
        ErrorFeedback(10).compress(np.ones(11), CONFIGS[0], rng=rng())


# ------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": SparseMode.TOP_K, "density": 0.0}, "Compression.density"),
        ({"mode": SparseMode.TOP_K, "density": 1.5}, "Compression.density"),
        ({"mode": SparseMode.TOP_K, "density": math.nan}, "Compression.density"),
        ({"mode": SparseMode.TOP_K, "bits": 4}, "Compression.bits"),
        ({"mode": SparseMode.RAND_K, "bits": 0}, "Compression.bits"),
        ({"mode": SparseMode.RAND_K, "bits": 33}, "Compression.bits"),
        ({"mode": SparseMode.RAND_K, "clip": 0.0}, "Compression.clip"),
        ({"mode": SparseMode.DENSE, "density": 0.5}, "Compression.density"),
    ],
)
def test_compression_config_validates(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(wire.SchemaError) as caught:
        Compression(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_only_rand_k_is_secure_compatible() -> None:
    assert Compression(mode=SparseMode.RAND_K).secure_compatible
    assert not Compression(mode=SparseMode.TOP_K).secure_compatible
    assert not Compression(mode=SparseMode.DENSE).secure_compatible
    with pytest.raises(CompressionError, match="masks"):
        unpack_shared_sum(
            np.zeros(10, dtype=np.uint32),
            config=Compression(mode=SparseMode.TOP_K, density=0.1),
            dim=100,
            seed=SEED,
            count=1,
        )


def test_dense_update_roundtrip() -> None:
    x = rng(12).normal(size=1000)
    config = Compression(mode=SparseMode.DENSE)
    msg = decode_update(wire.encode(encode_dense(x)), config=config, dim=1000)
    assert isinstance(msg, DenseUpdate)
    got = to_dense(msg, config=config, dim=1000)
    assert np.abs(got - x).max() <= np.abs(x).max() * 2.0**-24
