"""Hypothesis strategies for shared.secagg's wire messages (valid instances only).

Random fields almost never have the exact key, signature, ciphertext and share sizes these
messages require, so the generic strategies of tests/wire_strategies.py discard every draw;
`STRATEGIES` (keyed by tag, the shape of wire_strategies.EXPLICIT) builds valid ones. The
garbage tests also use them as "well-formed but wrong" input for the state machines.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

from fleetlearn.shared import wire
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

ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-_.:"
ids = st.one_of(
    st.text(ID_ALPHABET, min_size=1, max_size=12).map(lambda s: "d" + s),
    st.integers(0, 12).map(lambda i: f"dev-{i:04d}"),  # names a test cohort actually uses
)
rounds = st.one_of(st.integers(0, 3), st.integers(0, 2**63 - 1))


def _exact(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


key_adverts = st.builds(
    KeyAdvert,
    device_id=ids,
    share_key=_exact(32),
    mask_key=_exact(32),
    seed_commitment=_exact(32),
    draw=_exact(16),
    signature=_exact(64),
)
revealed = st.builds(RevealedShare, owner=ids, share=_exact(66))


def _unique(items: st.SearchStrategy, key: Callable) -> st.SearchStrategy:  # type: ignore[type-arg]
    return st.lists(items, max_size=6, unique_by=key).map(tuple)


@st.composite
def _roster_draw(draw: st.DrawFn) -> wire.Message:
    bitmap = draw(st.binary(max_size=3))
    members = int.from_bytes(bitmap, "little").bit_count()
    return Roster(
        round_id=draw(rounds),
        recipient=draw(ids),
        advertised=bitmap,
        draws=draw(_exact(16 * members)),
        adverts=draw(_unique(key_adverts, lambda a: a.device_id)),
    )


def _rosters() -> st.SearchStrategy[wire.Message]:
    return _roster_draw()


STRATEGIES: dict[str, Callable[[], st.SearchStrategy[wire.Message]]] = {
    "secagg.advertise": lambda: st.builds(
        Advertise,
        round_id=rounds,
        sender=ids,
        share_key=_exact(32),
        mask_key=_exact(32),
        seed_commitment=_exact(32),
        draw=_exact(16),
        signature=_exact(64),
    ),
    "secagg.roster": _rosters,
    "secagg.shares": lambda: st.builds(
        Shares,
        round_id=rounds,
        sender=ids,
        shares=_unique(
            st.builds(SealedShare, recipient=ids, ciphertext=_exact(SEALED_SHARE_BYTES)),
            lambda s: s.recipient,
        ),
    ),
    "secagg.inbox": lambda: st.builds(
        ShareInbox,
        round_id=rounds,
        recipient=ids,
        shares=_unique(
            st.builds(ForwardedShare, sender=ids, ciphertext=_exact(SEALED_SHARE_BYTES)),
            lambda s: s.sender,
        ),
    ),
    "secagg.masked": lambda: st.builds(
        MaskedInput, round_id=rounds, sender=ids, masked=st.binary(max_size=200)
    ),
    "secagg.survivors": lambda: st.builds(
        UnmaskRequest,
        round_id=rounds,
        survivors=_unique(ids, lambda s: s),
        dropped=_unique(ids, lambda s: s),
    ),
    "secagg.unmask": lambda: st.builds(
        Unmask,
        round_id=rounds,
        sender=ids,
        seed_shares=_unique(revealed, lambda r: r.owner),
        key_shares=_unique(revealed, lambda r: r.owner),
    ),
    "secagg.abort": lambda: st.builds(
        Abort, round_id=rounds, reason=st.text(min_size=1, max_size=60)
    ),
}
