"""SecAgg+ wire messages: one frozen, validated dataclass per message of the protocol.

What it owns: the shape of everything the secure round sends, with the stage it belongs to.
`shared.wire` turns them into bytes and back; nothing else does.

    stage      device -> aggregator                 aggregator -> device(s)
    ADVERTISE  Advertise      "secagg.advertise"    Roster        "secagg.roster"   (per device)
    SHARE      Shares         "secagg.shares"       ShareInbox    "secagg.inbox"    (per device)
    COLLECT    MaskedInput    "secagg.masked"       UnmaskRequest "secagg.survivors" (cohort)
    UNMASK     Unmask         "secagg.unmask"       -
    any        -                                    Abort         "secagg.abort"    (cohort)

Rules: a message that exists is structurally valid (ids, key/signature/ciphertext/share sizes,
no id twice in a list); whether it fits the round (its round id, stage, sender, neighbours,
vector length) is judged by the state machines, which know the round. Client-to-aggregator
messages carry `sender`, so adapters can pass `context={"sender": topic_id}` to `wire.decode`.
"""

from __future__ import annotations

from typing import ClassVar

from fleetlearn.shared import wire
from fleetlearn.shared.secagg.config import Stage
from fleetlearn.shared.secagg.keys import (
    AEAD_TAG_BYTES,
    COMMITMENT_BYTES,
    DRAW_BYTES,
    KEY_BYTES,
    SIGNATURE_BYTES,
)
from fleetlearn.shared.secagg.shamir import SHARE_BYTES

# One sealed share carries two field elements: the share of s_u (mask key) and of b_u (seed).
SEALED_SHARE_BYTES = 2 * SHARE_BYTES + AEAD_TAG_BYTES
MAX_REASON = 512


def _require_round(round_id: object) -> None:
    wire.require(
        type(round_id) is int and 0 <= round_id < 1 << 63, "round_id", "must be an int >= 0"
    )


def _require_bytes(value: object, size: int, field: str) -> None:
    if type(value) is not bytes:
        raise wire.SchemaError(f"expected bytes, got {type(value).__name__}", field=field)
    if len(value) != size:  # not wire.require: its message would be formatted every time
        raise wire.SchemaError(f"must be {size} bytes, got {len(value)}", field=field)


def _require_tuple(value: object, field: str) -> None:
    wire.require(type(value) is tuple, field, f"expected a tuple, got {type(value).__name__}")


# ----------------------------------------------------------------------------------- ADVERTISE


@wire.record
class KeyAdvert(wire.Record):
    """A device's signed round keys, as the aggregator forwards them to its neighbours."""

    device_id: str
    share_key: bytes  # X25519 public key c_u: agreement for share encryption
    mask_key: bytes  # X25519 public key s_u: agreement for pairwise masks
    seed_commitment: bytes  # SHA-256 commitment to the self-mask secret b_u
    draw: bytes  # the graph draw its announced ticket commits to: its place on the ring
    signature: bytes  # Ed25519 by the device's identity key over keys.advert_transcript

    def __post_init__(self) -> None:
        wire.require_id(self.device_id, "device_id")
        _require_bytes(self.share_key, KEY_BYTES, "share_key")
        _require_bytes(self.mask_key, KEY_BYTES, "mask_key")
        _require_bytes(self.seed_commitment, COMMITMENT_BYTES, "seed_commitment")
        _require_bytes(self.draw, DRAW_BYTES, "draw")
        _require_bytes(self.signature, SIGNATURE_BYTES, "signature")


@wire.message("secagg.advertise")
class Advertise(wire.Message):
    """Stage 1, device -> aggregator: this device's two round public keys and its graph draw
    (revealed here for the first and only time), signed."""

    STAGE: ClassVar[Stage] = Stage.ADVERTISE

    round_id: int
    sender: str
    share_key: bytes
    mask_key: bytes
    seed_commitment: bytes
    draw: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _require_round(self.round_id)
        wire.require_id(self.sender, "sender")
        _require_bytes(self.share_key, KEY_BYTES, "share_key")
        _require_bytes(self.mask_key, KEY_BYTES, "mask_key")
        _require_bytes(self.seed_commitment, COMMITMENT_BYTES, "seed_commitment")
        _require_bytes(self.draw, DRAW_BYTES, "draw")
        _require_bytes(self.signature, SIGNATURE_BYTES, "signature")

    def advert(self) -> KeyAdvert:
        return KeyAdvert(
            device_id=self.sender,
            share_key=self.share_key,
            mask_key=self.mask_key,
            seed_commitment=self.seed_commitment,
            draw=self.draw,
            signature=self.signature,
        )


@wire.message("secagg.roster")
class Roster(wire.Message):
    """Stage 1, aggregator -> one device: who advertised (U1) with their graph draws, and the
    signed adverts of this device's neighbours among them.

    `advertised` is a bitmap over the sorted cohort (bit i of the little-endian integer is the
    i-th device) and `draws` the U1 members' draws concatenated in that order: 16 bytes per
    advertiser, so every device can check each draw against its announced ticket and rebuild
    the ring. Adverts are per device (k of them, O(k) signatures to verify), and must be
    exactly the recipient's neighbours in that ring.
    """

    STAGE: ClassVar[Stage] = Stage.ADVERTISE

    round_id: int
    recipient: str
    advertised: bytes
    draws: bytes
    adverts: tuple[KeyAdvert, ...]

    def __post_init__(self) -> None:
        _require_round(self.round_id)
        wire.require_id(self.recipient, "recipient")
        wire.require(type(self.advertised) is bytes, "advertised", "expected bytes")
        wire.require(type(self.draws) is bytes, "draws", "expected bytes")
        if (
            len(self.draws) % DRAW_BYTES
            or len(self.draws) // DRAW_BYTES
            != int.from_bytes(self.advertised, "little").bit_count()
        ):
            raise wire.SchemaError(
                f"must hold {DRAW_BYTES} bytes per device the bitmap marks", field="draws"
            )
        _require_tuple(self.adverts, "adverts")
        wire.require(
            all(type(a) is KeyAdvert for a in self.adverts), "adverts", "expected KeyAdvert items"
        )
        wire.require_unique((a.device_id for a in self.adverts), "adverts")


# --------------------------------------------------------------------------------------- SHARE


@wire.record
class SealedShare(wire.Record):
    """Shares of the sender's s_u and b_u for one neighbour, AEAD-sealed to that neighbour."""

    recipient: str
    ciphertext: bytes

    def __post_init__(self) -> None:
        wire.require_id(self.recipient, "recipient")
        _require_bytes(self.ciphertext, SEALED_SHARE_BYTES, "ciphertext")


@wire.message("secagg.shares")
class Shares(wire.Message):
    """Stage 2, device -> aggregator: one sealed share per neighbour in U1."""

    STAGE: ClassVar[Stage] = Stage.SHARE

    round_id: int
    sender: str
    shares: tuple[SealedShare, ...]

    def __post_init__(self) -> None:
        _require_round(self.round_id)
        wire.require_id(self.sender, "sender")
        _require_tuple(self.shares, "shares")
        wire.require(
            all(type(s) is SealedShare for s in self.shares), "shares", "expected SealedShare items"
        )
        wire.require_unique((s.recipient for s in self.shares), "shares")


@wire.record
class ForwardedShare(wire.Record):
    """A sealed share as the aggregator forwards it, naming who sealed it."""

    sender: str
    ciphertext: bytes

    def __post_init__(self) -> None:
        wire.require_id(self.sender, "sender")
        _require_bytes(self.ciphertext, SEALED_SHARE_BYTES, "ciphertext")


@wire.message("secagg.inbox")
class ShareInbox(wire.Message):
    """Stage 2, aggregator -> one device: the shares its neighbours in U2 sealed to it.

    The senders are exactly the neighbours this device must mask with.
    """

    STAGE: ClassVar[Stage] = Stage.SHARE

    round_id: int
    recipient: str
    shares: tuple[ForwardedShare, ...]

    def __post_init__(self) -> None:
        _require_round(self.round_id)
        wire.require_id(self.recipient, "recipient")
        _require_tuple(self.shares, "shares")
        wire.require(
            all(type(s) is ForwardedShare for s in self.shares),
            "shares",
            "expected ForwardedShare items",
        )
        wire.require_unique((s.sender for s in self.shares), "shares")


# ------------------------------------------------------------------------------------- COLLECT


@wire.message("secagg.masked")
class MaskedInput(wire.Message):
    """Stage 3, device -> aggregator: the masked contribution, b bits per coordinate."""

    STAGE: ClassVar[Stage] = Stage.COLLECT

    round_id: int
    sender: str
    masked: bytes

    def __post_init__(self) -> None:
        _require_round(self.round_id)
        wire.require_id(self.sender, "sender")
        wire.require(type(self.masked) is bytes, "masked", "expected bytes")


@wire.message("secagg.survivors")
class UnmaskRequest(wire.Message):
    """Stage 3 -> 4, aggregator -> cohort: who survived (U3) and who dropped after sharing.

    A device reveals its share of b_v for neighbours listed in `survivors` and its share of s_v
    for neighbours listed in `dropped`; never both for one neighbour.
    """

    STAGE: ClassVar[Stage] = Stage.COLLECT

    round_id: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def __post_init__(self) -> None:
        _require_round(self.round_id)
        _require_tuple(self.survivors, "survivors")
        _require_tuple(self.dropped, "dropped")
        wire.require_ids(self.survivors, "survivors")
        wire.require_ids(self.dropped, "dropped")


# -------------------------------------------------------------------------------------- UNMASK


@wire.record
class RevealedShare(wire.Record):
    """One share value revealed to the aggregator; `owner` is the device whose secret it is."""

    owner: str
    share: bytes

    def __post_init__(self) -> None:
        wire.require_id(self.owner, "owner")
        _require_bytes(self.share, SHARE_BYTES, "share")


@wire.message("secagg.unmask")
class Unmask(wire.Message):
    """Stage 4, device -> aggregator: seed shares of surviving and key shares of dropped
    neighbours."""

    STAGE: ClassVar[Stage] = Stage.UNMASK

    round_id: int
    sender: str
    seed_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]

    def __post_init__(self) -> None:
        _require_round(self.round_id)
        wire.require_id(self.sender, "sender")
        for field in ("seed_shares", "key_shares"):
            items = getattr(self, field)
            _require_tuple(items, field)
            wire.require(
                all(type(s) is RevealedShare for s in items), field, "expected RevealedShare items"
            )
            wire.require_unique((s.owner for s in items), field)


# ----------------------------------------------------------------------------------- any stage


@wire.message("secagg.abort")
class Abort(wire.Message):
    """Aggregator -> cohort: the round is over without a result, and why."""

    round_id: int
    reason: str

    def __post_init__(self) -> None:
        _require_round(self.round_id)
        wire.require(
            type(self.reason) is str and 0 < len(self.reason) <= MAX_REASON,
            "reason",
            f"must be a non-empty string of at most {MAX_REASON} characters",
        )


# What each side accepts: pass as `expect=` to wire.decode.
TO_AGGREGATOR: tuple[type[wire.Message], ...] = (Advertise, Shares, MaskedInput, Unmask)
TO_DEVICE: tuple[type[wire.Message], ...] = (Roster, ShareInbox, UnmaskRequest, Abort)
