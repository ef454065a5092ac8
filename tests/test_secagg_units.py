"""Unit tests of the SecAgg building blocks: config, PRG, Shamir, graph, packing, keys,
messages, contribution encoding, and the state machines' transition tables."""

from __future__ import annotations

import dataclasses
import math
import random as pyrandom

import nacl.bindings
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.shared import cost as cost_fields
from fleetlearn.shared import wire
from fleetlearn.shared.compression import CompressionError
from fleetlearn.shared.cost import Cost
from fleetlearn.shared.errors import ConfigError, FleetlearnError
from fleetlearn.shared.secagg import contribution, keys, packing, shamir
from fleetlearn.shared.secagg.client import TRANSITIONS as CLIENT_TRANSITIONS
from fleetlearn.shared.secagg.client import ClientEvent, ClientState, SecAggClient
from fleetlearn.shared.secagg.config import (
    EXTRA_COORDINATES,
    PrivacyFloor,
    SecAggConfig,
    StageDeadlines,
    abort_probability,
    default_neighbours,
    suggest_neighbours,
)
from fleetlearn.shared.secagg.contribution import TrainingMetrics
from fleetlearn.shared.secagg.errors import (
    CryptoError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SecAggConfigError,
    SecAggError,
    ThresholdError,
)
from fleetlearn.shared.secagg.graph import NeighbourGraph, members_of, membership_bitmap
from fleetlearn.shared.secagg.messages import (
    SEALED_SHARE_BYTES,
    Abort,
    Advertise,
    ForwardedShare,
    KeyAdvert,
    MaskedInput,
    RevealedShare,
    Roster,
    SealedShare,
    ShareInbox,
    Shares,
    Unmask,
    UnmaskRequest,
)
from fleetlearn.shared.secagg.prg import MaskExpander, chacha20_keystream
from fleetlearn.shared.secagg.server import TRANSITIONS as SERVER_TRANSITIONS
from fleetlearn.shared.secagg.server import SecAggServer, ServerEvent, ServerState
from tests.secagg_support import deterministic_random, graph_draws, identities, tickets_of

FAST = settings(max_examples=60, deadline=None)

# ------------------------------------------------------------------------------------ errors


def test_error_hierarchy() -> None:
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(ProtocolError, SecAggError)
    assert issubclass(ThresholdError, SecAggError)
    assert issubclass(SecAggError, FleetlearnError)
    assert issubclass(SecAggConfigError, ConfigError)
    # a config decoded off the wire must turn into the decoder's SchemaError
    assert issubclass(SecAggConfigError, ValueError)
    err = RemoteProtocolError("bad", sender="dev-1", stage="share")
    assert err.sender == "dev-1"
    assert "dev-1" in str(err)
    assert "share" in str(err)


# ------------------------------------------------------------------------------------ config


def test_config_defaults() -> None:
    config = SecAggConfig.create(cohort_size=1000, dimension=10)
    assert (config.neighbours, config.threshold) == (20, 11)
    assert config.field_bits == 16 + 10
    assert config.min_survivors == config.threshold
    assert config.packed_bytes == math.ceil((10 + len(EXTRA_COORDINATES)) * 26 / 8)
    # With cost reports, 16-bit words hold each 32-bit cost figure in two.
    reported = SecAggConfig.create(cohort_size=1000, dimension=10, cost_report=True)
    assert reported.cost_limbs == 2
    assert reported.cost_words == 8
    assert reported.packed_bytes == math.ceil((10 + len(EXTRA_COORDINATES) + 8) * 26 / 8)
    for n in range(3, 200):
        k = default_neighbours(n)
        assert 2 <= k <= n - 1
        assert (n * k) % 2 == 0
        assert abs(k - 2 * math.log2(n)) <= 1.5 or k == n - 1


def test_field_bits_too_small_names_the_fix() -> None:
    with pytest.raises(SecAggConfigError, match=r"need field_bits >= .*26.*quant_bits <= 10"):
        SecAggConfig.create(cohort_size=1000, dimension=10, field_bits=20)


@pytest.mark.parametrize(
    ("overrides", "key", "text"),
    [
        ({"cohort_size": 11, "neighbours": 5}, "neighbours", "use 4 or 6"),
        ({"cohort_size": 10, "neighbours": 10}, "neighbours", "2..9"),
        ({"cohort_size": 10, "neighbours": 6, "threshold": 3}, "threshold", "k/2 < t"),
        ({"cohort_size": 10, "neighbours": 6, "threshold": 7}, "threshold", "4..6"),
        ({"cohort_size": 2}, "cohort_size", "3.."),
        ({"cohort_size": 10, "min_survivors": 1}, "min_survivors", "2..10"),
        ({"cohort_size": 10, "max_samples": 1 << 20}, "max_samples", "raise field_bits"),
        ({"cohort_size": 10, "clip": -1.0}, "clip", "> 0"),
        ({"cohort_size": 10, "dimension": 0}, "dimension", ">= 1"),
        ({"cohort_size": 10, "dimension": 10_000_000}, "dimension", "wire limit"),
        ({"cohort_size": 10, "quant_bits": 62}, "field_bits", "<= 64"),
    ],
)
def test_config_refusals(overrides: dict[str, object], key: str, text: str) -> None:
    args: dict[str, object] = {"cohort_size": 10, "dimension": 5, **overrides}
    with pytest.raises(SecAggConfigError, match=text) as info:
        SecAggConfig.create(**args)  # type: ignore[arg-type]
    assert info.value.key == key


def test_suggest_neighbours_meets_its_risk() -> None:
    k, t = suggest_neighbours(1000, 0.1)
    assert abort_probability(1000, k, t, 0.1) <= 1e-3
    assert abort_probability(1000, k - 2, (k - 2) // 2 + 1, 0.1) > 1e-3
    k30, _ = suggest_neighbours(1000, 0.3)
    assert k30 > k
    assert suggest_neighbours(10, 0.6) == (9, 5)  # falls back to classic SecAgg


def test_deadlines_must_increase() -> None:
    StageDeadlines(advertise=1.0, share=2.0, collect=3.0, unmask=4.0)
    with pytest.raises(SecAggConfigError, match="later than the share deadline"):
        StageDeadlines(advertise=1.0, share=2.0, collect=2.0, unmask=4.0)
    with pytest.raises(SecAggConfigError, match="finite"):
        StageDeadlines(advertise=math.nan, share=2.0, collect=3.0, unmask=4.0)


# --------------------------------------------------------------------------------------- PRG

RFC8439_ZERO_KEY_BLOCK0 = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)
RFC8439_ZERO_KEY_BLOCK1 = bytes.fromhex(
    "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed"
    "29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f"
)
# RFC 8439 section 2.3.2: key 00..1f, nonce 000000090000004a00000000, block counter 1.
RFC8439_232_BLOCK = bytes.fromhex(
    "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
)


def test_prg_matches_rfc8439_vectors() -> None:
    assert chacha20_keystream(bytes(32), 128) == RFC8439_ZERO_KEY_BLOCK0 + RFC8439_ZERO_KEY_BLOCK1
    nonce = bytes.fromhex("000000090000004a00000000")
    counter_nonce = (1).to_bytes(4, "little") + nonce
    assert chacha20_keystream(bytes(range(32)), 64, counter_nonce=counter_nonce) == (
        RFC8439_232_BLOCK
    )


def test_mask_words_are_the_chacha20_keystream() -> None:
    expected = RFC8439_ZERO_KEY_BLOCK0 + RFC8439_ZERO_KEY_BLOCK1
    words32 = MaskExpander(32, 32).expand(bytes(32))
    assert words32.tolist() == list(np.frombuffer(expected, dtype="<u4"))
    words64 = MaskExpander(16, 64).expand(bytes(32))
    assert words64.tolist() == list(np.frombuffer(expected, dtype="<u8"))


def test_prg_agrees_with_libsodium() -> None:
    key, nonce = bytes(range(1, 33)), bytes(range(12))
    # libsodium's IETF AEAD encrypts with the ChaCha20 keystream from block counter 1.
    sealed = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(bytes(1000), None, nonce, key)
    ours = chacha20_keystream(key, 1000, counter_nonce=(1).to_bytes(4, "little") + nonce)
    assert sealed[:1000] == ours


def test_expander_reuses_its_buffer_and_folds_masks() -> None:
    expander = MaskExpander(1000, 32)
    first = expander.expand(b"\x01" * 32)
    again = expander.expand(b"\x02" * 32)
    assert first is again  # preallocated: no new buffer per mask
    acc = np.zeros(1000, dtype=np.uint32)
    expander.add_into(acc, b"\x03" * 32)
    expander.subtract_into(acc, b"\x03" * 32)
    assert not acc.any()
    with pytest.raises(ValueError, match="32 bytes"):
        expander.expand(b"\x00" * 16)


# ------------------------------------------------------------------------------------ Shamir


def _is_probable_prime(p: int) -> bool:
    d, s = p - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47):
        x = pow(a, d, p)
        if x in (1, p - 1):
            continue
        for _ in range(s - 1):
            x = x * x % p
            if x == p - 1:
                break
        else:
            return False
    return True


def test_field_holds_a_full_32_byte_secret() -> None:
    assert shamir.PRIME > 1 << 256
    assert _is_probable_prime(shamir.PRIME)
    # Curve25519's prime would not do: this secret is above it.
    assert int.from_bytes(b"\xff" * 32, "big") > (1 << 255) - 19


@FAST
@given(
    st.binary(min_size=32, max_size=32),
    st.integers(1, 8),
    st.integers(0, 8),
    st.randoms(use_true_random=False),
)
def test_any_t_shares_rebuild_the_secret(
    secret: bytes, t: int, extra: int, rnd: pyrandom.Random
) -> None:
    xs = rnd.sample(range(1, 200), t + extra)
    shares = shamir.split([secret, b"\xff" * 32], xs, t, deterministic_random(secret.hex()))
    points = [(x, row[0]) for x, row in zip(xs, shares, strict=True)]
    subset = rnd.sample(points, t)
    assert shamir.secret_from_element(shamir.reconstruct(subset, t)) == secret
    other = [(x, row[1]) for x, row in zip(xs, shares, strict=True)]
    assert shamir.reconstruct(rnd.sample(other, t), t) == int.from_bytes(b"\xff" * 32, "big")
    if t > 1:
        # t-1 shares interpolate a different polynomial: they do not give the secret.
        assert shamir.reconstruct(subset[: t - 1], t - 1) != int.from_bytes(secret, "big")
        with pytest.raises(ThresholdError):
            shamir.reconstruct(subset[: t - 1], t)


def test_coefficients_are_drawn_without_bias() -> None:
    # The first draw masks to exactly 2^521 - 1 = p and must be rejected; the second is used.
    draws = iter([b"\xff" * 66, b"\x00" * 65 + b"\x05"])
    assert shamir.random_element(lambda n: next(draws)) == 5


def test_lagrange_coefficients_are_cached() -> None:
    shamir.lagrange_at_zero.cache_clear()
    first = shamir.lagrange_at_zero((1, 5, 9))
    assert shamir.lagrange_at_zero((1, 5, 9)) is first
    assert shamir.lagrange_at_zero.cache_info().hits == 1
    # f(x) = 7 + 3x: f(1)=10, f(5)=22 -> f(0)=7
    assert shamir.reconstruct([(1, 10), (5, 22)], 2) == 7


def test_share_decoding_refuses_non_field_values() -> None:
    with pytest.raises(CryptoError):
        shamir.decode_share(shamir.PRIME.to_bytes(66, "big"))
    with pytest.raises(CryptoError):
        shamir.decode_share(b"\x00" * 65)
    with pytest.raises(CryptoError):
        shamir.secret_from_element(1 << 256)
    with pytest.raises(CryptoError, match="same x"):
        shamir.reconstruct([(3, 1), (3, 2)], 2)


# ------------------------------------------------------------------------------------- graph


def _draws(devices: list[str], label: bytes) -> dict[str, bytes]:
    return {d: keys.new_draw(deterministic_random(f"{label!r}/{d}")) for d in devices}


@FAST
@given(st.integers(3, 60), st.data())
def test_graph_is_k_regular_and_symmetric(n: int, data: st.DataObject) -> None:
    k = data.draw(st.sampled_from([k for k in range(2, n) if (n * k) % 2 == 0]))
    label = data.draw(st.binary(min_size=1, max_size=8))
    cohort = [f"d{i}" for i in range(n)]
    draws = _draws(cohort, label)
    graph = NeighbourGraph(cohort, k, draws)
    for u in cohort:
        neighbours = graph.of(u)
        assert len(set(neighbours)) == k
        assert u not in neighbours
        for v in neighbours:
            assert u in graph.of(v)
    # Every party derives the same graph, whatever order it lists the roster in.
    again = NeighbourGraph(list(reversed(cohort)), k, dict(reversed(list(draws.items()))))
    assert all(again.of(u) == graph.of(u) for u in cohort)
    if k == n - 1:
        assert all(set(graph.of(u)) == set(cohort) - {u} for u in cohort)


@FAST
@given(st.integers(3, 40), st.data())
def test_graph_over_any_advertisers_is_symmetric_with_the_documented_degree(
    n: int, data: st.DataObject
) -> None:
    k = data.draw(st.integers(2, n - 1))
    cohort = [f"d{i}" for i in range(n)]
    u1 = data.draw(st.sets(st.sampled_from(cohort), min_size=1))
    draws = _draws(cohort, b"any")
    graph = NeighbourGraph(cohort, k, {d: draws[d] for d in u1})
    m = len(u1)
    degree = m - 1 if m - 1 <= k else k - 1 if (m * k) % 2 else k
    for u in u1:
        assert len(set(graph.of(u))) == degree
        assert set(graph.of(u)) <= u1 - {u}
        assert all(u in graph.of(v) for v in graph.of(u))
    # Shamir x-coordinates follow the cohort, not U1.
    assert [graph.share_x(u) for u in sorted(cohort)[:1]] == [1]


def test_graph_depends_on_every_draw_and_on_nothing_else() -> None:
    cohort = [f"d{i}" for i in range(50)]
    draws = _draws(cohort, b"a")
    a = NeighbourGraph(cohort, 6, draws)
    assert NeighbourGraph(cohort, 6, dict(draws)).ring == a.ring
    # One device's draw reorders the whole ring.
    b = NeighbourGraph(cohort, 6, {**draws, "d17": _draws(["d17"], b"other")["d17"]})
    assert sum(a.of(u) != b.of(u) for u in cohort) > 25
    # So does leaving one advertiser out.
    c = NeighbourGraph(cohort, 6, {d: v for d, v in draws.items() if d != "d17"})
    assert sum(set(a.of(u)) - {"d17"} != set(c.of(u)) for u in cohort if u != "d17") > 25
    assert [a.share_x(u) for u in sorted(cohort)] == list(range(1, 51))


def test_graph_from_a_roster_is_the_same_graph() -> None:
    cohort = [f"d{i:02d}" for i in range(20)]
    draws = _draws(cohort, b"roster")
    u1 = tuple(d for d in sorted(cohort) if d not in ("d03", "d11"))
    graph = NeighbourGraph(cohort, 4, {d: draws[d] for d in u1})
    same = NeighbourGraph.from_roster(
        cohort, 4, u1, membership_bitmap(sorted(cohort), u1), b"".join(draws[d] for d in u1)
    )
    assert same.ring == graph.ring
    assert all(same.of(u) == graph.of(u) for u in u1)
    with pytest.raises(SecAggConfigError):
        NeighbourGraph.from_roster(cohort, 4, u1, b"", b"")


def test_graph_refuses_impossible_degrees_and_strangers() -> None:
    draws = _draws([f"d{i}" for i in range(5)], b"x")
    with pytest.raises(SecAggConfigError):
        NeighbourGraph([f"d{i}" for i in range(5)], 5, draws)
    with pytest.raises(SecAggConfigError):
        NeighbourGraph(["a", "a", "b"], 2, {})
    with pytest.raises(SecAggConfigError, match="not in the cohort"):
        NeighbourGraph(["a", "b", "c"], 2, {"z": b"\x00" * 16})
    with pytest.raises(SecAggConfigError, match="16 bytes"):
        NeighbourGraph(["a", "b", "c"], 2, {"a": b"\x00" * 15})


def test_membership_bitmap_round_trips_and_refuses_misfits() -> None:
    cohort = tuple(f"d{i:02d}" for i in range(11))
    members = ("d00", "d03", "d10")
    bitmap = membership_bitmap(cohort, members)
    assert len(bitmap) == 2
    assert members_of(cohort, bitmap) == members
    assert members_of(cohort, bitmap + b"\x00") is None
    assert members_of(cohort, (1 << 11).to_bytes(2, "little")) is None


def test_tickets_commit_to_draws_and_the_ring_seed_to_all_of_them() -> None:
    draw = keys.new_draw(deterministic_random("t"))
    ticket = keys.ticket_of("dev-1", draw)
    assert len(ticket) == keys.TICKET_BYTES
    assert keys.ticket_of("dev-2", draw) != ticket  # bound to the device
    assert keys.ticket_of("dev-1", keys.new_draw(deterministic_random("u"))) != ticket
    other = keys.new_draw(deterministic_random("v"))
    assert keys.tickets_of_draws(["dev-1", "dev-2"], draw + other) == [
        ticket,
        keys.ticket_of("dev-2", other),
    ]
    with pytest.raises(CryptoError):
        keys.ticket_of("dev-1", draw[:8])
    with pytest.raises(CryptoError):
        keys.tickets_of_draws(["dev-1"], draw + other)
    seed = keys.ring_seed(b"\x03", draw + other)
    assert keys.ring_seed(b"\x03", other + draw) != seed
    assert keys.ring_seed(b"\x05", draw + other) != seed


# ----------------------------------------------------------------------------------- packing


@FAST
@given(st.integers(1, 64), st.integers(0, 70), st.data())
def test_packing_is_exactly_b_bits_per_value(bits: int, count: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=count, max_size=count))
    array = np.array(values, dtype=np.uint64)
    packed = packing.pack(array, bits)
    reference = sum(v << (i * bits) for i, v in enumerate(values))
    assert packed == reference.to_bytes(math.ceil(count * bits / 8), "little")
    assert packing.unpack(packed, bits, count).tolist() == values


def test_unpack_refuses_wrong_lengths_and_padding() -> None:
    packed = packing.pack(np.arange(5, dtype=np.uint32), 13)  # 65 bits -> 9 bytes
    assert len(packed) == 9
    with pytest.raises(ValueError, match="expected 9"):
        packing.unpack(packed[:-1], 13, 5)
    with pytest.raises(ValueError, match="expected 9"):
        packing.unpack(packed + b"\x00", 13, 5)
    with pytest.raises(ValueError, match="padding"):
        packing.unpack(packed[:-1] + bytes([packed[-1] | 0x80]), 13, 5)
    with pytest.raises(ValueError, match="does not fit"):
        packing.pack(np.array([1 << 13], dtype=np.uint32), 13)


# -------------------------------------------------------------------------------------- keys


def test_derivations_are_separated_by_label_round_and_pair() -> None:
    secret, seed = b"\x11" * 32, b"\x22" * 32
    pair = keys.pairwise_mask_seed(secret, round_seed=seed, round_id=1, first="a", second="b")
    assert pair == keys.pairwise_mask_seed(
        secret, round_seed=seed, round_id=1, first="b", second="a"
    )
    others = {
        keys.pairwise_mask_seed(secret, round_seed=seed, round_id=2, first="a", second="b"),
        keys.pairwise_mask_seed(secret, round_seed=b"\x23" * 32, round_id=1, first="a", second="b"),
        keys.pairwise_mask_seed(secret, round_seed=seed, round_id=1, first="a", second="c"),
        keys.self_mask_seed(secret, round_seed=seed, round_id=1, device_id="a"),
        keys.derive(keys.LABEL_SHARE_ENCRYPTION, secret, round_seed=seed, context=b""),
    }
    assert pair not in others
    assert len(others) == 5


def test_share_encryption_is_directional_and_authenticated() -> None:
    a_private, a_public = keys.generate_keypair(deterministic_random("a"))
    b_private, b_public = keys.generate_keypair(deterministic_random("b"))
    agreed = keys.agree(a_private, b_public)
    assert agreed == keys.agree(b_private, a_public)
    common = {"agreed": agreed, "round_seed": b"\x00" * 32, "round_id": 3}
    sealed = keys.seal_share(b"share", sender="a", recipient="b", **common)  # type: ignore[arg-type]
    assert keys.open_share(sealed, sender="a", recipient="b", **common) == b"share"  # type: ignore[arg-type]
    with pytest.raises(CryptoError):
        keys.open_share(sealed, sender="b", recipient="a", **common)  # type: ignore[arg-type]
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    with pytest.raises(CryptoError):
        keys.open_share(tampered, sender="a", recipient="b", **common)  # type: ignore[arg-type]


def test_low_order_keys_are_refused() -> None:
    private, public = keys.generate_keypair(deterministic_random("x"))
    assert keys.is_usable_public_key(public)
    for bad in (bytes(32), (1).to_bytes(32, "little")):
        assert not keys.is_usable_public_key(bad)
        with pytest.raises(CryptoError, match="low order"):
            keys.agree(private, bad)


def test_advert_signatures_bind_every_field() -> None:
    signer = identities(1)["dev-0000"]
    fields = {
        "round_id": 4,
        "round_seed": b"\x01" * 32,
        "device_id": "dev-0000",
        "share_key": b"\x02" * 32,
        "mask_key": b"\x03" * 32,
        "seed_commitment": b"\x04" * 32,
        "draw": b"\x05" * 16,
    }
    signature = keys.sign(signer, keys.advert_transcript(**fields))  # type: ignore[arg-type]
    keys.verify(bytes(signer.verify_key), keys.advert_transcript(**fields), signature)  # type: ignore[arg-type]
    for name, value in fields.items():
        changed = dict(fields)
        changed[name] = (
            value + 1
            if isinstance(value, int)
            else (value + "x" if isinstance(value, str) else b"\x09" * len(value))
        )
        with pytest.raises(CryptoError):
            keys.verify(bytes(signer.verify_key), keys.advert_transcript(**changed), signature)  # type: ignore[arg-type]


def test_random_source_is_checked() -> None:
    with pytest.raises(LocalProtocolError):
        keys.draw(lambda n: b"short", 32)


# ---------------------------------------------------------------------------------- messages

ADVERT = {
    "share_key": b"\x01" * 32,
    "mask_key": b"\x02" * 32,
    "seed_commitment": b"\x03" * 32,
    "draw": b"\x06" * 16,
    "signature": b"\x04" * 64,
}
SEALED = b"\x05" * SEALED_SHARE_BYTES
SHARE = b"\x00" * 66

EXAMPLES: list[wire.Message] = [
    Advertise(round_id=1, sender="dev-1", **ADVERT),
    Roster(
        round_id=1,
        recipient="dev-1",
        advertised=b"\x03",
        draws=b"\x07" * 32,
        adverts=(KeyAdvert(device_id="dev-2", **ADVERT),),
    ),
    Shares(round_id=1, sender="dev-1", shares=(SealedShare(recipient="dev-2", ciphertext=SEALED),)),
    ShareInbox(
        round_id=1, recipient="dev-1", shares=(ForwardedShare(sender="dev-2", ciphertext=SEALED),)
    ),
    MaskedInput(round_id=1, sender="dev-1", masked=b"\x01\x02\x03"),
    UnmaskRequest(round_id=1, survivors=("dev-1", "dev-2"), dropped=("dev-3",)),
    Unmask(
        round_id=1,
        sender="dev-1",
        seed_shares=(RevealedShare(owner="dev-2", share=SHARE),),
        key_shares=(RevealedShare(owner="dev-3", share=SHARE),),
    ),
    Abort(round_id=1, reason="too few devices"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_messages_round_trip_on_the_wire(message: wire.Message) -> None:
    decoded = wire.decode(wire.encode(message))
    assert decoded == message
    assert type(message).TAG.startswith("secagg.")


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (
            lambda: Advertise(round_id=1, sender="dev-1", **{**ADVERT, "share_key": b"\x01"}),
            "share_key",
        ),
        (lambda: Advertise(round_id=-1, sender="dev-1", **ADVERT), "round_id"),
        (lambda: Advertise(round_id=1, sender="dev/1", **ADVERT), "sender"),
        (lambda: SealedShare(recipient="dev-2", ciphertext=b"\x00" * 10), "ciphertext"),
        (
            lambda: Shares(
                round_id=1,
                sender="dev-1",
                shares=(SealedShare(recipient="d", ciphertext=SEALED),) * 2,
            ),
            "shares",
        ),
        (lambda: UnmaskRequest(round_id=1, survivors=("a", "a"), dropped=()), "survivors"),
        (lambda: RevealedShare(owner="dev-2", share=b"\x00" * 65), "share"),
        (lambda: Abort(round_id=1, reason=""), "reason"),
        (lambda: Advertise(round_id=1, sender="dev-1", **{**ADVERT, "draw": b"\x01"}), "draw"),
        (
            lambda: Roster(
                round_id=1, recipient="dev-1", advertised=b"\x07", draws=b"\x00" * 32, adverts=()
            ),
            "draws",
        ),
        (lambda: MaskedInput(round_id=1, sender="dev-1", masked="text"), "masked"),
    ],
)
def test_messages_validate_when_built(build: object, field: str) -> None:
    with pytest.raises(wire.SchemaError) as info:
        build()  # type: ignore[operator]
    assert info.value.field is not None
    assert field in info.value.field


# ------------------------------------------------------------------------------ contribution


def test_contribution_layout_and_refusals() -> None:
    config = SecAggConfig.create(
        cohort_size=10, dimension=4, max_weight=10.0, max_samples=100, cost_report=True
    )
    rng = np.random.default_rng(0)
    metrics = TrainingMetrics(loss=0.5, correct=7, samples=9, local_correct=8)
    vector = np.array([-1.0, 0.0, 0.5, 1.0], dtype=np.float32)
    encoded = contribution.encode(config, vector, weight=10.0, metrics=metrics, rng=rng)
    assert encoded.dtype == np.dtype("<u4")
    assert encoded.shape == (4 + 5 + 4 * 2,)
    levels = (1 << config.quant_bits) - 1
    assert encoded[0] == 0
    assert encoded[3] == levels
    assert encoded[6:9].tolist() == [7, 9, 8]  # counts travel exactly
    assert encoded[4] == (1 << config.float_extra_bits) - 1  # weight == max_weight
    assert encoded[9:].tolist() == [0] * 8  # no cost reported: four figures of two zero limbs
    for bad in (
        {"vector": vector[:3]},
        {"vector": np.array([np.nan, 0, 0, 0], dtype=np.float32)},
        {"vector": np.arange(4)},
        {"weight": 11.0},
        {"metrics": TrainingMetrics(samples=101)},
    ):
        kwargs = {"vector": vector, "weight": 1.0, "metrics": metrics, **bad}
        with pytest.raises(LocalProtocolError):
            contribution.encode(config, rng=rng, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        TrainingMetrics(correct=3, samples=2)
    with pytest.raises(LocalProtocolError):
        TrainingMetrics(local_correct=3, samples=2)


def test_decode_detects_an_impossible_sum() -> None:
    config = SecAggConfig.create(cohort_size=10, dimension=2, quant_bits=8, cost_report=True)
    survivors = ("a", "b")
    cost = [0] * (4 * config.cost_limbs)  # 8-bit limbs here: four per figure
    assert config.cost_limbs == 4
    fine = np.array([10, 510, 0, 0, 1, 2, 2, *cost], dtype=np.uint32)
    assert contribution.decode(config, fine, survivors).correct == 1
    assert contribution.decode(config, fine, survivors).local_accuracy == 1.0
    too_big = np.array([511, 0, 0, 0, 1, 2, 0, *cost], dtype=np.uint32)  # > 2 * 255
    with pytest.raises(CompressionError):
        contribution.decode(config, too_big, survivors)
    for counts in ([3, 2, 0], [0, 2, 3]):  # more hits than rows
        total = np.array([0, 0, 0, 0, *counts, *cost], dtype=np.uint32)
        with pytest.raises(CompressionError):
            contribution.decode(config, total, survivors)
    # A cost word, or a cost sum, beyond what two honest reports can make.
    limb_too_big = fine.copy()
    limb_too_big[-1] = 2 * 255 + 1
    with pytest.raises(CompressionError):
        contribution.decode(config, limb_too_big, survivors)
    cpu_too_big = fine.copy()
    cpu_too_big[7 + 3] = 255  # the top limb of the CPU milliseconds: 255 * 2^24 ms
    with pytest.raises(CompressionError):
        contribution.decode(config, cpu_too_big, survivors)


def test_cost_reports_reach_the_aggregator_only_as_exact_sums() -> None:
    """Each device's cost rides in its masked vector as integers in limbs; the decoded sums
    are the reports' sums in milliseconds, bytes and millijoules, exactly."""
    config = SecAggConfig.create(
        cohort_size=20, dimension=3, max_weight=10.0, max_samples=100, cost_report=True
    )
    rng = np.random.default_rng(5)
    reports = [
        Cost(cpu_s=0.25 * i, bytes_up=1000.0 + i, bytes_down=50_000.0 * i, energy_j=0.5 + i)
        for i in range(7)
    ]
    mask = (1 << config.field_bits) - 1
    total = np.zeros(config.coordinates, dtype=np.uint64)
    for report in reports:
        metrics = TrainingMetrics(cost=report)
        words = contribution.encode(config, np.zeros(3), weight=1.0, metrics=metrics, rng=rng)
        total = (total + words.astype(np.uint64)) & mask
    result = contribution.decode(config, total.astype(np.uint32), tuple("abcdefg"))
    assert result.cost.devices == 7
    for name in cost_fields.FIELDS:
        exact = sum(getattr(r, name) for r in reports)
        assert getattr(result.cost, name) == pytest.approx(exact, abs=1e-9), name
    # A round that asks for no reports lays out no cost words and decodes to none.
    plain = dataclasses.replace(config, cost_report=False)
    assert plain.coordinates == config.coordinates - config.cost_words
    words = contribution.encode(
        plain, np.zeros(3), weight=1.0, metrics=TrainingMetrics(cost=reports[3]), rng=rng
    )
    assert words.shape == (plain.coordinates,)
    assert contribution.decode(plain, words, ("a",)).cost is None
    # The largest report of every device at once still sums without wrapping.
    biggest = Cost(
        cpu_s=cost_fields.MAX_CPU_S,
        bytes_up=cost_fields.MAX_BYTES,
        bytes_down=cost_fields.MAX_BYTES,
        energy_j=cost_fields.MAX_ENERGY_J,
    )
    total = np.zeros(config.coordinates, dtype=np.uint64)
    for _ in range(20):
        words = contribution.encode(
            config, np.zeros(3), weight=1.0, metrics=TrainingMetrics(cost=biggest), rng=rng
        )
        total = (total + words.astype(np.uint64)) & mask
    result = contribution.decode(config, total.astype(np.uint32), tuple(f"d{i}" for i in range(20)))
    assert result.cost.cpu_s == 20 * cost_fields.MAX_CPU_S
    assert result.cost.energy_j == 20 * cost_fields.MAX_ENERGY_J


# ---------------------------------------------------------------------------- state machines


def test_transition_tables_are_closed() -> None:
    client_targets = set(CLIENT_TRANSITIONS.values())
    assert ClientState.DONE in client_targets
    assert ClientState.ABORTED in client_targets
    # Nothing leaves ABORTED or ERROR except into ERROR.
    for (state, event), target in CLIENT_TRANSITIONS.items():
        if state in (ClientState.ABORTED, ClientState.ERROR):
            assert event is ClientEvent.LOCAL_ERROR
            assert target is ClientState.ERROR
    for (state, event), target in SERVER_TRANSITIONS.items():
        if state in (ServerState.DONE, ServerState.ABORTED, ServerState.ERROR):
            assert event is ServerEvent.LOCAL_ERROR
            assert target is ServerState.ERROR


def _machines() -> tuple[SecAggServer, SecAggClient]:
    config = SecAggConfig.create(cohort_size=4, dimension=3)
    ids = identities(4)
    verify = {d: bytes(k.verify_key) for d, k in ids.items()}
    deadlines = StageDeadlines.evenly(0.0, 10.0)
    draws = graph_draws(list(ids), b"m")
    server = SecAggServer(
        config=config,
        round_id=1,
        round_seed=b"\x00" * 32,
        verify_keys=verify,
        tickets=tickets_of(draws),
        deadlines=deadlines,
    )
    client = SecAggClient(
        config=config,
        round_id=1,
        device_id="dev-0000",
        signing_key=ids["dev-0000"],
        verify_keys=verify,
        round_seed=b"\x00" * 32,
        tickets=tickets_of(draws),
        draw=draws["dev-0000"],
        floor=PrivacyFloor.minimal(),
        random=deterministic_random("m"),
        deadlines=deadlines,
    )
    return server, client


def test_local_misuse_leaves_the_client_in_error_for_good() -> None:
    _, client = _machines()
    client.start(0.0)
    with pytest.raises(LocalProtocolError, match="start"):
        client.start(0.0)
    assert client.state is ClientState.ERROR
    with pytest.raises(LocalProtocolError, match="ERROR"):
        client.tick(1.0)
    with pytest.raises(LocalProtocolError, match="ERROR"):
        client.receive(Abort(round_id=1, reason="x"), 1.0)


def test_bad_input_is_local_misuse() -> None:
    _, client = _machines()
    with pytest.raises(LocalProtocolError):
        client.set_input(np.zeros(2, dtype=np.float32), weight=1.0)
    assert client.state is ClientState.ERROR


def test_server_refuses_bad_time_and_stays_in_error() -> None:
    server, _ = _machines()
    with pytest.raises(LocalProtocolError, match="finite"):
        server.tick(math.inf)
    assert server.state is ServerState.ERROR
    with pytest.raises(LocalProtocolError):
        server.tick(1.0)


def test_client_gives_up_after_the_next_deadline() -> None:
    _, client = _machines()
    client.start(0.0)
    assert client.tick(15.0) == []
    assert client.state is ClientState.ADVERTISE  # the roster may still come until 20
    client.tick(20.0)
    assert client.state is ClientState.ABORTED
    assert client.reason is not None
    assert "timed out" in client.reason


def test_server_closes_stages_at_deadlines() -> None:
    server, _ = _machines()
    assert server.deadline == 10.0
    assert server.tick(9.9) == []
    out = server.tick(10.0)
    assert server.state is ServerState.ABORTED
    assert server.reason is not None
    assert server.reason.startswith("ADVERTISE: only 0 devices")
    assert [type(o.message) for o in out] == [Abort]
    assert out[0].to is None
    assert set(server.dropped) == set(server.cohort)


def test_a_deferred_close_waits_for_tick_and_sends_the_same() -> None:
    config = SecAggConfig.create(cohort_size=4, dimension=3)
    ids = identities(4)
    verify = {d: bytes(k.verify_key) for d, k in ids.items()}
    deadlines = StageDeadlines.evenly(0.0, 10.0)
    draws = graph_draws(list(ids), b"defer")

    def server() -> SecAggServer:
        return SecAggServer(
            config=config,
            round_id=1,
            round_seed=b"\x01" * 32,
            verify_keys=verify,
            tickets=tickets_of(draws),
            deadlines=deadlines,
        )

    adverts = []
    for d, key in sorted(ids.items()):
        client = SecAggClient(
            config=config,
            round_id=1,
            device_id=d,
            signing_key=key,
            verify_keys=verify,
            round_seed=b"\x01" * 32,
            tickets=tickets_of(draws),
            draw=draws[d],
            floor=PrivacyFloor.minimal(),
            random=deterministic_random(f"defer/{d}"),
            deadlines=deadlines,
        )
        adverts += client.start(0.0)
    eager, deferred = server(), server()
    for message in adverts[:-1]:
        assert eager.receive(message, 1.0) == []
        assert deferred.receive(message, 1.0, close=False) == []
        assert not deferred.close_due
    rosters = eager.receive(adverts[-1], 1.0)
    assert eager.state is ServerState.SHARE
    assert len(rosters) == 4
    # The last advert completes the stage; it stays open until tick(), before its deadline.
    assert deferred.receive(adverts[-1], 1.0, close=False) == []
    assert deferred.close_due
    assert deferred.state is ServerState.ADVERTISE
    out = deferred.tick(2.0)
    assert deferred.state is ServerState.SHARE
    assert not deferred.close_due
    assert [(o.to, wire.encode(o.message)) for o in out] == [
        (o.to, wire.encode(o.message)) for o in rosters
    ]
    assert deferred.tick(2.0) == []  # SHARE waits for shares or its deadline
