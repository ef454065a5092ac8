"""Key material of one round: agreement, signed advertisements, derivation, share encryption.

What it owns: every use of a cryptographic primitive in SecAgg apart from mask expansion
(`prg`) and Shamir arithmetic (`shamir`).

Rules it keeps:
- Primitives come from pynacl (X25519, Ed25519) and `cryptography` (HKDF-SHA256,
  ChaCha20-Poly1305, SHA-256; hashlib's OpenSSL SHA-256 where a hash is taken per device of
  the cohort, for speed). Nothing here is home-made.
- Randomness only from the injected `RandomSource` (a callable returning n fresh bytes); the
  machines take one from their adapter. `system_random` is the OS CSPRNG for adapters to pass.
- Every derived key has its own label, and every label, round and party that a key belongs to
  is inside the HKDF info (length-prefixed), so no key can be reused for another purpose, round
  or pair. Keys per round are fresh, so a round's keys reveal nothing about another round.
- A bad value from a peer raises `CryptoError`; the caller knows who sent it.
- A graph draw is committed by its ticket before the round and revealed once, in the device's
  signed advert; the neighbour ring is seeded by all advertisers' draws (`ring_seed`).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence

import nacl.bindings
import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetlearn.shared.secagg.errors import CryptoError, LocalProtocolError

RandomSource = Callable[[int], bytes]
"""Returns n fresh uniformly random bytes. Injected, so tests can make rounds deterministic."""

system_random: RandomSource = secrets.token_bytes

KEY_BYTES = 32  # X25519 keys, HKDF outputs, mask seeds, self-mask secrets
SIGNATURE_BYTES = 64  # Ed25519
COMMITMENT_BYTES = 32  # SHA-256
AEAD_TAG_BYTES = 16  # Poly1305
DRAW_BYTES = 16  # a device's secret graph draw: 128 bits, never reused
TICKET_BYTES = 16  # the published commitment to a draw

_PREFIX = b"fleetlearn/secagg/v1/"
LABEL_ADVERT = _PREFIX + b"advertise"
LABEL_PAIRWISE_MASK = _PREFIX + b"pairwise-mask"
LABEL_SELF_MASK = _PREFIX + b"self-mask"
LABEL_SHARE_ENCRYPTION = _PREFIX + b"share-encryption"
LABEL_SEED_COMMITMENT = _PREFIX + b"self-mask-commitment"
LABEL_GRAPH_TICKET = _PREFIX + b"graph-ticket"
LABEL_NEIGHBOUR_RING = _PREFIX + b"neighbour-ring"

# A share-encryption key is derived for one direction of one pair in one round and seals
# exactly one message, so a fixed nonce never repeats under a key.
_FIXED_NONCE = b"\x00" * 12


def draw(random: RandomSource, count: int) -> bytes:
    """`count` bytes from the injected source, checked (a broken source is a local bug)."""
    data = random(count)
    if not isinstance(data, bytes) or len(data) != count:
        raise LocalProtocolError(
            f"random source returned {type(data).__name__} of length "
            f"{len(data) if isinstance(data, bytes | bytearray) else '?'}; expected {count} bytes"
        )
    return data


def frame(*parts: bytes) -> bytes:
    """Unambiguous concatenation: each part prefixed by its 4-byte length."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def encode_id(device_id: str) -> bytes:
    return device_id.encode("utf-8")


def encode_round(round_id: int) -> bytes:
    return round_id.to_bytes(8, "big")


# ------------------------------------------------------------------------------------ X25519


def generate_keypair(random: RandomSource) -> tuple[bytes, bytes]:
    """A fresh X25519 (private, public) pair from 32 injected random bytes."""
    private = draw(random, KEY_BYTES)
    return private, nacl.bindings.crypto_scalarmult_base(private)


def public_key_of(private: bytes) -> bytes:
    return nacl.bindings.crypto_scalarmult_base(private)


def agree(private: bytes, public: bytes) -> bytes:
    """The X25519 shared secret. Refuses low-order public keys (all-zero output)."""
    if len(public) != KEY_BYTES or len(private) != KEY_BYTES:
        raise CryptoError("X25519 keys are 32 bytes")
    try:
        return nacl.bindings.crypto_scalarmult(private, public)
    except nacl.exceptions.CryptoError:
        # libsodium refuses when the result is the all-zero point: the peer's key has low
        # order and would make the "shared" secret public.
        raise CryptoError("public key has low order; no secret can be agreed with it") from None


# Any valid scalar works for the low-order test: the result is zero for every scalar exactly
# when the point has small order.
_PROBE_SCALAR = hashlib.sha256(_PREFIX + b"low-order-probe").digest()


def is_usable_public_key(public: bytes) -> bool:
    try:
        agree(_PROBE_SCALAR, public)
    except CryptoError:
        return False
    return True


# ------------------------------------------------------------------------ signed advertisements


def advert_transcript(
    *,
    round_id: int,
    round_seed: bytes,
    device_id: str,
    share_key: bytes,
    mask_key: bytes,
    seed_commitment: bytes,
    draw: bytes,
) -> bytes:
    """What a device signs: its round keys and graph draw, bound to the round, the round seed
    and its id."""
    return frame(
        LABEL_ADVERT,
        encode_round(round_id),
        round_seed,
        encode_id(device_id),
        share_key,
        mask_key,
        seed_commitment,
        draw,
    )


# ------------------------------------------------------------------------- graph draw / ticket


def new_draw(random: RandomSource) -> bytes:
    """A fresh secret graph draw. Published only as its ticket until the device advertises."""
    return draw(random, DRAW_BYTES)


_TICKET_HASH = hashlib.sha256(frame(LABEL_GRAPH_TICKET))


def _ticket(ident: bytes, graph_draw: bytes) -> bytes:
    digest = _TICKET_HASH.copy()
    digest.update(len(ident).to_bytes(4, "big") + ident)
    digest.update(graph_draw)  # fixed size: the framing stays unambiguous
    return digest.digest()[:TICKET_BYTES]


def ticket_of(device_id: str, graph_draw: bytes) -> bytes:
    """The public commitment to `graph_draw` that the device puts in its retained status."""
    if len(graph_draw) != DRAW_BYTES:
        raise CryptoError(f"a graph draw is {DRAW_BYTES} bytes, got {len(graph_draw)}")
    return _ticket(encode_id(device_id), graph_draw)


def tickets_of_draws(device_ids: Sequence[str], draws: bytes) -> list[bytes]:
    """The ticket of each device's DRAW_BYTES slice of `draws`, in order: what a device checks
    for every advertiser in its roster (about 1.5 ms for 1000)."""
    if len(draws) != DRAW_BYTES * len(device_ids):
        raise CryptoError(f"expected {DRAW_BYTES} bytes of draw per device")
    # _ticket inlined: the call overhead was half the time at n = 1000.
    copy, out = _TICKET_HASH.copy, []
    for i, device in enumerate(device_ids):
        ident = encode_id(device)
        digest = copy()
        digest.update(len(ident).to_bytes(4, "big") + ident)
        digest.update(draws[i * DRAW_BYTES : (i + 1) * DRAW_BYTES])
        out.append(digest.digest()[:TICKET_BYTES])
    return out


def ring_seed(advertised: bytes, draws: bytes) -> bytes:
    """The seed of a round's neighbour ring: SHA-256 over who advertised (the cohort bitmap)
    and all their draws, in cohort order. Unknown to everyone until the last advert."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(frame(LABEL_NEIGHBOUR_RING, advertised, draws))
    return digest.finalize()


def sign(signing_key: nacl.signing.SigningKey, transcript: bytes) -> bytes:
    return bytes(signing_key.sign(transcript).signature)


def verify(verify_key: bytes, transcript: bytes, signature: bytes) -> None:
    """Raise CryptoError unless `signature` is the device's Ed25519 signature on `transcript`."""
    try:
        nacl.signing.VerifyKey(verify_key).verify(transcript, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        raise CryptoError("advertisement signature does not verify") from None


def check_verify_key(device_id: str, verify_key: object) -> bytes:
    """A roster's Ed25519 verify key, as bytes; raises LocalProtocolError when unusable."""
    if isinstance(verify_key, nacl.signing.VerifyKey):
        verify_key = bytes(verify_key)
    if not isinstance(verify_key, bytes) or len(verify_key) != KEY_BYTES:
        raise LocalProtocolError(f"verify key of {device_id!r} must be 32 bytes of Ed25519")
    return verify_key


# ---------------------------------------------------------------------------- key derivation


def derive(label: bytes, secret: bytes, *, round_seed: bytes, context: bytes) -> bytes:
    """HKDF-SHA256: 32 bytes for `label`, salted with the round seed, bound to `context`."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=round_seed,
        info=frame(label, context),
    ).derive(secret)


def pairwise_mask_seed(
    agreed: bytes, *, round_seed: bytes, round_id: int, first: str, second: str
) -> bytes:
    """Seed of the mask two neighbours share. Both derive it; the pair is ordered so they agree."""
    low, high = sorted((first, second))
    context = frame(encode_round(round_id), encode_id(low), encode_id(high))
    return derive(LABEL_PAIRWISE_MASK, agreed, round_seed=round_seed, context=context)


def self_mask_seed(secret: bytes, *, round_seed: bytes, round_id: int, device_id: str) -> bytes:
    """Seed of a device's self mask, from its per-round secret b_u."""
    context = frame(encode_round(round_id), encode_id(device_id))
    return derive(LABEL_SELF_MASK, secret, round_seed=round_seed, context=context)


def seed_commitment(secret: bytes) -> bytes:
    """SHA-256 commitment to b_u, so the aggregator can check the b_u it reconstructs.

    b_u is 32 uniformly random bytes, so the hash reveals nothing usable about it.
    """
    digest = hashes.Hash(hashes.SHA256())
    digest.update(frame(LABEL_SEED_COMMITMENT, secret))
    return digest.finalize()


# ---------------------------------------------------------------------- share encryption (AEAD)


def _share_aead(
    agreed: bytes, round_seed: bytes, round_id: int, sender: str, recipient: str
) -> tuple[ChaCha20Poly1305, bytes]:
    # Directional: u->v and v->u get different keys although they share one X25519 secret.
    context = frame(encode_round(round_id), encode_id(sender), encode_id(recipient))
    key = derive(LABEL_SHARE_ENCRYPTION, agreed, round_seed=round_seed, context=context)
    return ChaCha20Poly1305(key), context


def seal_share(
    plaintext: bytes,
    *,
    agreed: bytes,
    round_seed: bytes,
    round_id: int,
    sender: str,
    recipient: str,
) -> bytes:
    aead, aad = _share_aead(agreed, round_seed, round_id, sender, recipient)
    return aead.encrypt(_FIXED_NONCE, plaintext, aad)


def open_share(
    ciphertext: bytes,
    *,
    agreed: bytes,
    round_seed: bytes,
    round_id: int,
    sender: str,
    recipient: str,
) -> bytes:
    aead, aad = _share_aead(agreed, round_seed, round_id, sender, recipient)
    try:
        return aead.decrypt(_FIXED_NONCE, ciphertext, aad)
    except InvalidTag:
        raise CryptoError(f"share from {sender!r} does not open (wrong key or tampered)") from None
