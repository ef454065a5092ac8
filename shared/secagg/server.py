"""The aggregator side of SecAgg+: a sans-IO state machine that learns only the sum.

What it owns: one secure round at the aggregator — which devices are in at each stage (U1 ⊇ U2
⊇ U3), the routing of adverts and sealed shares, the running sum of masked inputs, and the
unmasking that turns it into the sum of the survivors' contributions.

    server = SecAggServer(config=..., round_id=..., round_seed=...,
                          verify_keys={device_id: ed25519_verify_key_bytes, ...},  # the cohort
                          tickets={device_id: announced_ticket, ...},             # the cohort
                          deadlines=StageDeadlines(...))   # or None: the adapter decides
    for out in server.receive(message, now):   # message decoded with expect=TO_AGGREGATOR
        publish(out.message, to=out.to)        # out.to: tuple of device ids, or None = cohort
    for out in server.tick(now): ...           # call at (or after) server.deadline
    server.receive(message, now, close=False)  # leave a completed stage for tick() to close
    server.close_problem()                     # why closing the stage now would abort, or None
    for out in server.close_stage(now): ...    # close it now, with whoever answered
    server.state / .stage / .result / .reason / .dropped / .waiting_for()

Stages: ADVERTISE (collect signed keys: U1) -> SHARE (route sealed shares: U2) -> COLLECT (sum
masked inputs: U3) -> UNMASK (collect shares, rebuild b_u of survivors and s_v of the dropped,
strip the masks) -> DONE, or ABORTED with a reason at any stage. A stage closes when every
device expected has answered, or at its deadline via tick(); UNMASK also closes as soon as every
secret it needs has t shares. Without deadlines (`deadlines=None`) the adapter applies its own
timing (aggregator.engine: soft and hard limits) and closes a stage early with close_stage().
The transitions are the table `TRANSITIONS`.

Rules it keeps:
- Sans-IO: no sockets, no clock (`now` is passed in), no randomness needed at all.
- An advert whose graph draw does not open the device's announced ticket is refused like a bad
  signature. The neighbour graph is the ring over U1 seeded by all those draws (`graph`), built
  when ADVERTISE closes; every roster carries U1 and all its draws so devices can rebuild it.
- A message that is wrong for its sender (not in the cohort, another round or stage, late,
  duplicate, bad signature or draw, wrong neighbours or lengths, bad share) raises
  RemoteProtocolError naming that sender, and changes nothing: every check runs before any
  state is touched. The round goes on for everyone else.
- Every survivor must keep >= t live neighbours at every stage (and every dropped device whose
  masks must be removed must keep t neighbours holding its shares), else ABORTED saying who.
- Reconstructed secrets are checked against what the device committed to (its mask public key,
  its self-mask seed commitment) before they touch the sum.
- A LocalProtocolError (misuse by the adapter) or any unexpected exception leaves ERROR for good.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from fleetlearn.shared import protocol, wire
from fleetlearn.shared.compression.errors import CompressionError
from fleetlearn.shared.ids import id_problem
from fleetlearn.shared.rounds import RoundMode
from fleetlearn.shared.secagg import contribution, keys, packing, shamir
from fleetlearn.shared.secagg.config import SecAggConfig, Stage, StageDeadlines
from fleetlearn.shared.secagg.contribution import SecAggResult
from fleetlearn.shared.secagg.errors import (
    CryptoError,
    LocalProtocolError,
    RemoteProtocolError,
    ThresholdError,
)
from fleetlearn.shared.secagg.graph import NeighbourGraph, membership_bitmap
from fleetlearn.shared.secagg.messages import (
    MAX_REASON,
    Abort,
    Advertise,
    ForwardedShare,
    KeyAdvert,
    MaskedInput,
    Roster,
    ShareInbox,
    Shares,
    Unmask,
    UnmaskRequest,
)
from fleetlearn.shared.secagg.prg import MaskExpander


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message for the adapter to deliver. `to` is a tuple of device ids, or None for the
    whole cohort (one publish on a cohort-wide topic)."""

    message: wire.Message
    to: tuple[str, ...] | None

    @property
    def to_cohort(self) -> bool:
        return self.to is None


class ServerState(enum.Enum):
    ADVERTISE = "advertise"  # collecting signed adverts
    SHARE = "share"  # collecting sealed shares
    COLLECT = "collect"  # collecting masked inputs
    UNMASK = "unmask"  # collecting revealed shares
    DONE = "done"  # `result` holds the sum
    ABORTED = "aborted"  # `reason` says why
    ERROR = "error"  # local misuse or a bug; every further call is refused


class ServerEvent(enum.Enum):
    CLOSE = "close"  # the stage closed with enough devices to go on
    FAIL = "fail"  # the threshold (or a reconstruction) failed: no result this round
    LOCAL_ERROR = "local_error"


_LIVE = (ServerState.ADVERTISE, ServerState.SHARE, ServerState.COLLECT, ServerState.UNMASK)

TRANSITIONS: dict[tuple[ServerState, ServerEvent], ServerState] = {
    (ServerState.ADVERTISE, ServerEvent.CLOSE): ServerState.SHARE,
    (ServerState.SHARE, ServerEvent.CLOSE): ServerState.COLLECT,
    (ServerState.COLLECT, ServerEvent.CLOSE): ServerState.UNMASK,
    (ServerState.UNMASK, ServerEvent.CLOSE): ServerState.DONE,
    **{(s, ServerEvent.FAIL): ServerState.ABORTED for s in _LIVE},
    **{(s, ServerEvent.LOCAL_ERROR): ServerState.ERROR for s in ServerState},
}

# Each live state collects one protocol stage; what a device sends in it is the protocol's.
STAGE_OF: dict[ServerState, Stage] = {
    ServerState.ADVERTISE: Stage.ADVERTISE,
    ServerState.SHARE: Stage.SHARE,
    ServerState.COLLECT: Stage.COLLECT,
    ServerState.UNMASK: Stage.UNMASK,
}
_ACCEPTS: dict[ServerState, type[wire.Message]] = {
    state: protocol.answer(stage, RoundMode.SECURE) for state, stage in STAGE_OF.items()
}

_NAMES_IN_REASON = 5  # how many device ids an abort reason lists before "and N more"


def _names(devices: set[str] | list[str]) -> str:
    ordered = sorted(devices)
    shown = ", ".join(ordered[:_NAMES_IN_REASON])
    more = len(ordered) - _NAMES_IN_REASON
    return shown + (f" and {more} more" if more > 0 else "")


class SecAggServer:
    """The aggregator in one secure round. See the module docstring for the call sequence."""

    def __init__(
        self,
        *,
        config: SecAggConfig,
        round_id: int,
        round_seed: bytes,
        verify_keys: Mapping[str, bytes],
        tickets: Mapping[str, bytes],
        deadlines: StageDeadlines | None,
    ) -> None:
        if not isinstance(config, SecAggConfig):
            raise LocalProtocolError("config must be a SecAggConfig")
        if type(round_id) is not int or round_id < 0:
            raise LocalProtocolError(f"round_id must be an int >= 0, got {round_id!r}")
        if not isinstance(round_seed, bytes) or len(round_seed) != keys.KEY_BYTES:
            raise LocalProtocolError("round_seed must be 32 bytes")
        if deadlines is not None and not isinstance(deadlines, StageDeadlines):
            raise LocalProtocolError("deadlines must be a StageDeadlines or None")
        self._verify_keys = {d: keys.check_verify_key(d, k) for d, k in verify_keys.items()}
        if len(self._verify_keys) != config.cohort_size:
            raise LocalProtocolError(
                f"roster has {len(self._verify_keys)} devices; config.cohort_size is "
                f"{config.cohort_size}"
            )
        for device in self._verify_keys:
            problem = id_problem(device)
            if problem:
                raise LocalProtocolError(f"roster id {device!r}: {problem}")
        if set(tickets) != set(self._verify_keys) or any(
            not isinstance(t, bytes) or len(t) != keys.TICKET_BYTES for t in tickets.values()
        ):
            raise LocalProtocolError(
                f"tickets must map every cohort device to {keys.TICKET_BYTES} bytes"
            )
        self.config = config
        self.round_id = round_id
        self.deadlines = deadlines
        self._round_seed = round_seed
        self._tickets = dict(tickets)
        self._cohort = tuple(sorted(self._verify_keys))
        self._in_cohort = frozenset(self._cohort)
        # The graph exists once ADVERTISE closed: the ring over U1, seeded by all their draws.
        self._graph = NeighbourGraph(self._cohort, config.neighbours, {})
        self._state = ServerState.ADVERTISE
        self._reason: str | None = None
        self._result: SecAggResult | None = None
        # Contributions in the unmasked sum once the masks came off, even if it is then
        # refused as corrupt: the aggregator has seen it (its privacy charge counts them).
        self.unmasked: int | None = None
        self._dropped: dict[str, Stage] = {}
        # ADVERTISE
        self._adverts: dict[str, KeyAdvert] = {}
        self._u1: frozenset[str] = frozenset()
        # SHARE
        self._sealed: dict[str, dict[str, bytes]] = {}  # sender -> recipient -> ciphertext
        self._u2: frozenset[str] = frozenset()
        # COLLECT
        self._sum: np.ndarray | None = None
        self._masked_from: set[str] = set()
        self._u3: frozenset[str] = frozenset()
        # UNMASK
        self._seed_points: dict[str, list[tuple[int, int]]] = {}  # survivor -> shares of b_u
        self._key_points: dict[str, list[tuple[int, int]]] = {}  # dropped -> shares of s_v
        self._responders: set[str] = set()
        self._short = 0  # secrets that still have fewer than t shares

    # ------------------------------------------------------------------------------ state

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def stage(self) -> Stage | None:
        """The stage being collected, or None once DONE/ABORTED/ERROR."""
        return STAGE_OF.get(self._state)

    @property
    def deadline(self) -> float | None:
        """When tick() will close the current stage (None: only close_stage() or completion)."""
        stage = self.stage
        return None if stage is None or self.deadlines is None else self.deadlines.of(stage)

    @property
    def result(self) -> SecAggResult | None:
        return self._result

    @property
    def reason(self) -> str | None:
        """Why the round ABORTED (or why the machine is in ERROR)."""
        return self._reason

    @property
    def dropped(self) -> Mapping[str, Stage]:
        """Device -> the stage whose message it did not deliver in time.

        Devices dropped at UNMASK had their masked input counted: they are in the result.
        """
        return dict(self._dropped)

    @property
    def cohort(self) -> tuple[str, ...]:
        return self._cohort

    @property
    def graph(self) -> NeighbourGraph:
        """The neighbour graph over U1 (empty until ADVERTISE closed)."""
        return self._graph

    @property
    def advertised(self) -> frozenset[str]:
        """U1, once ADVERTISE closed."""
        return self._u1

    @property
    def sharers(self) -> frozenset[str]:
        """U2, once SHARE closed."""
        return self._u2

    @property
    def survivors(self) -> frozenset[str]:
        """U3, once COLLECT closed: the devices whose contributions are in the sum."""
        return self._u3

    def waiting_for(self) -> frozenset[str]:
        """Devices whose message for the current stage has not arrived yet."""
        if self._state is ServerState.ADVERTISE:
            return frozenset(self.cohort) - self._adverts.keys()
        if self._state is ServerState.SHARE:
            return self._u1 - self._sealed.keys()
        if self._state is ServerState.COLLECT:
            return self._u2 - self._masked_from
        if self._state is ServerState.UNMASK:
            return self._u3 - self._responders
        return frozenset()

    def _transition(self, event: ServerEvent) -> None:
        try:
            self._state = TRANSITIONS[(self._state, event)]
        except KeyError:
            raise LocalProtocolError(
                f"no transition from {self._state.name} on {event.name}"
            ) from None

    @contextmanager
    def _guard(self, now: float) -> Iterator[None]:
        if self._state is ServerState.ERROR:
            raise LocalProtocolError(f"aggregator state machine is in ERROR ({self._reason})")
        try:
            if not isinstance(now, float | int) or isinstance(now, bool) or not math.isfinite(now):
                raise LocalProtocolError(f"now must be a finite number, got {now!r}")
            yield
        except RemoteProtocolError:
            raise  # validation failed before anything changed
        except Exception as exc:
            self._reason = f"{type(exc).__name__}: {exc}"
            self._state = ServerState.ERROR
            raise

    def _abort(self, reason: str) -> list[Outbound]:
        if len(reason) > MAX_REASON:
            reason = reason[: MAX_REASON - 3] + "..."
        self._reason = reason
        self._sum = None
        self._sealed = {}
        self._transition(ServerEvent.FAIL)
        return [Outbound(Abort(round_id=self.round_id, reason=reason), None)]

    # ---------------------------------------------------------------------------- receive

    def receive(self, message: wire.Message, now: float, *, close: bool = True) -> list[Outbound]:
        """Take one device message (already decoded); return what to send.

        With close=False, a message that completes its stage leaves the stage open with
        `close_due` set, and the caller closes it with tick(): an adapter can then take
        messages on one thread and leave the (much longer) stage close to another."""
        with self._guard(now):
            sender = self._check_context(message, now)
            if isinstance(message, Advertise):
                self._on_advertise(message, sender)
            elif isinstance(message, Shares):
                self._on_shares(message, sender)
            elif isinstance(message, MaskedInput):
                self._on_masked(message, sender)
            elif isinstance(message, Unmask):
                self._on_unmask(message, sender)
            if close and self._stage_complete():
                return self._close_stage()
            return []

    @property
    def close_due(self) -> bool:
        """The current stage has everything it waits for; tick() closes it."""
        return self._state in _LIVE and self._stage_complete()

    def tick(self, now: float) -> list[Outbound]:
        """Close every stage whose deadline is at or before `now`, and a stage that is
        complete (see receive(close=False))."""
        with self._guard(now):
            out: list[Outbound] = []
            while self._state in _LIVE:
                deadline = self.deadline
                if (deadline is None or now < deadline) and not self._stage_complete():
                    break
                out += self._close_stage()
            return out

    def close_problem(self) -> str | None:
        """Why closing the current stage now would abort the round, or None if it can go on.

        Changes nothing. An adapter with its own timing asks this before closing a stage that
        is not complete yet (e.g. after a soft limit): the same checks the close makes."""
        if self._state is ServerState.ADVERTISE:
            # The ring exists only once U1 is fixed (it is seeded by U1's draws): check the
            # ring these advertisers would get, keeping the current one.
            current = self._graph
            try:
                self._graph = self._ring(frozenset(self._adverts))
                return self._neighbourhood_problem(frozenset(self._adverts), "advertised keys")
            finally:
                self._graph = current
        if self._state is ServerState.SHARE:
            return self._neighbourhood_problem(frozenset(self._sealed), "shared their secrets")
        if self._state is ServerState.COLLECT:
            u3 = frozenset(self._masked_from)
            return self._neighbourhood_problem(u3, "sent masked inputs") or self._orphan_problem(u3)
        if self._state is ServerState.UNMASK:
            return None if self._short == 0 else f"{self._short} secrets lack t shares"
        return f"the round is over ({self._state.name})"

    def close_stage(self, now: float) -> list[Outbound]:
        """Close the current stage now with whoever answered (the adapter's limit passed):
        the next stage's messages, or an Abort if too few answered."""
        with self._guard(now):
            if self._state not in _LIVE:
                raise LocalProtocolError(f"no stage to close in {self._state.name}")
            return self._close_stage()

    def _check_context(self, message: wire.Message, now: float) -> str:
        """Who sent `message`, if it belongs here now; RemoteProtocolError otherwise."""
        sender = getattr(message, "sender", None)
        stage = self.stage.value if self.stage else self._state.value
        if not isinstance(message, Advertise | Shares | MaskedInput | Unmask):
            raise RemoteProtocolError(
                f"{type(message).__name__} is not a message devices send to the aggregator",
                sender=sender if isinstance(sender, str) else None,
                stage=stage,
            )
        sender = message.sender

        def reject(problem: str) -> RemoteProtocolError:
            return RemoteProtocolError(problem, sender=sender, stage=stage)

        if message.round_id != self.round_id:
            raise reject(f"message for round {message.round_id}; this is round {self.round_id}")
        if sender not in self._in_cohort:
            raise reject("not in this round's cohort")
        if self._state not in _LIVE:
            raise reject(f"the round is over ({self._state.name})")
        expected = _ACCEPTS[self._state]
        if not isinstance(message, expected):
            raise reject(
                f"{type(message).__name__} belongs to stage "
                f"{protocol.ANSWERS[type(message)].value}; the round is in {stage}"
            )
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            raise reject(f"late: {stage} closed at {deadline}")
        return sender

    # --------------------------------------------------------------------------- handlers

    def _on_advertise(self, message: Advertise, sender: str) -> None:
        def reject(problem: str) -> RemoteProtocolError:
            return RemoteProtocolError(problem, sender=sender, stage=Stage.ADVERTISE.value)

        if sender in self._adverts:
            raise reject("duplicate advert")
        transcript = keys.advert_transcript(
            round_id=self.round_id,
            round_seed=self._round_seed,
            device_id=sender,
            share_key=message.share_key,
            mask_key=message.mask_key,
            seed_commitment=message.seed_commitment,
            draw=message.draw,
        )
        try:
            keys.verify(self._verify_keys[sender], transcript, message.signature)
        except CryptoError:
            raise reject(
                "advert signature does not verify with the device's identity key"
            ) from None
        if keys.ticket_of(sender, message.draw) != self._tickets[sender]:
            raise reject("graph draw does not match the device's announced ticket")
        if message.share_key == message.mask_key:
            raise reject("share_key and mask_key must be different keys")
        for name in ("share_key", "mask_key"):
            if not keys.is_usable_public_key(getattr(message, name)):
                raise reject(f"{name} is a low-order X25519 point")
        self._adverts[sender] = message.advert()

    def _on_shares(self, message: Shares, sender: str) -> None:
        def reject(problem: str) -> RemoteProtocolError:
            return RemoteProtocolError(problem, sender=sender, stage=Stage.SHARE.value)

        if sender not in self._u1:
            raise reject("did not advertise in this round")
        if sender in self._sealed:
            raise reject("duplicate shares")
        expected = self._graph.live(sender, self._u1)
        got = {s.recipient for s in message.shares}
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise reject(
                "shares must go to exactly its advertised neighbours"
                + (f"; missing {missing[:3]}" if missing else "")
                + (f"; not neighbours {extra[:3]}" if extra else "")
            )
        self._sealed[sender] = {s.recipient: s.ciphertext for s in message.shares}

    def _on_masked(self, message: MaskedInput, sender: str) -> None:
        def reject(problem: str) -> RemoteProtocolError:
            return RemoteProtocolError(problem, sender=sender, stage=Stage.COLLECT.value)

        if sender not in self._u2:
            raise reject("did not take part in SHARE")
        if sender in self._masked_from:
            raise reject("duplicate masked input")
        cfg = self.config
        try:
            vector = packing.unpack(message.masked, cfg.field_bits, cfg.coordinates)
        except ValueError as exc:
            raise reject(f"masked vector: {exc}") from None
        if self._sum is None:
            raise LocalProtocolError("no accumulator in COLLECT")
        # Masked vectors add in any order and grouping, so the sum is kept running.
        np.add(self._sum, vector.astype(self._sum.dtype, copy=False), out=self._sum)
        self._masked_from.add(sender)

    def _on_unmask(self, message: Unmask, sender: str) -> None:
        def reject(problem: str) -> RemoteProtocolError:
            return RemoteProtocolError(problem, sender=sender, stage=Stage.UNMASK.value)

        if sender not in self._u3:
            raise reject("is not a survivor of this round")
        if sender in self._responders:
            raise reject("duplicate unmask")
        neighbours = self._graph.live(sender, self._u2)
        decoded: list[tuple[dict[str, list[tuple[int, int]]], str, int]] = []
        for field, items, allowed in (
            ("seed_shares", message.seed_shares, neighbours & self._u3),
            ("key_shares", message.key_shares, neighbours - self._u3),
        ):
            for item in items:
                if item.owner not in allowed:
                    kind = "surviving" if field == "seed_shares" else "dropped"
                    raise reject(f"{field}: {item.owner!r} is not a {kind} neighbour")
                try:
                    value = shamir.decode_share(item.share)
                except CryptoError as exc:
                    raise reject(f"{field} of {item.owner!r}: {exc}") from None
                target = self._seed_points if field == "seed_shares" else self._key_points
                decoded.append((target, item.owner, value))
        x = self._graph.share_x(sender)
        t = self.config.threshold
        for target, owner, value in decoded:
            points = target[owner]
            points.append((x, value))
            if len(points) == t:
                self._short -= 1
        self._responders.add(sender)

    # ------------------------------------------------------------------------ stage close

    def _stage_complete(self) -> bool:
        # Counts, not waiting_for(): it runs after every message, and the handlers only ever
        # record senders from the stage's expected set, so equal sizes mean nobody is missing.
        state = self._state
        if state is ServerState.ADVERTISE:
            return len(self._adverts) == len(self._cohort)
        if state is ServerState.SHARE:
            return len(self._sealed) == len(self._u1)
        if state is ServerState.COLLECT:
            return len(self._masked_from) == len(self._u2)
        if state is ServerState.UNMASK:
            return self._short == 0 or len(self._responders) == len(self._u3)
        return False

    def _close_stage(self) -> list[Outbound]:
        if self._state is ServerState.ADVERTISE:
            return self._close_advertise()
        if self._state is ServerState.SHARE:
            return self._close_share()
        if self._state is ServerState.COLLECT:
            return self._close_collect()
        if self._state is ServerState.UNMASK:
            return self._close_unmask()
        raise LocalProtocolError(f"no stage to close in {self._state.name}")

    def _mark_dropped(self, devices: set[str] | frozenset[str], stage: Stage) -> None:
        for device in devices:
            self._dropped.setdefault(device, stage)

    def _neighbourhood_problem(self, alive: frozenset[str], what: str) -> str | None:
        """Why `alive` cannot go on: too few of them, or one has < t live neighbours."""
        cfg = self.config
        if len(alive) < cfg.min_survivors:
            return f"only {len(alive)} devices {what}; at least {cfg.min_survivors} are required"
        thin = {u for u in alive if len(self._graph.live(u, alive)) < cfg.threshold}
        if thin:
            return (
                f"{len(thin)} of the {len(alive)} devices that {what} kept fewer than "
                f"t={cfg.threshold} live neighbours "
                f"(of k={cfg.neighbours}): {_names(thin)}"
            )
        return None

    def _orphan_problem(self, u3: frozenset[str]) -> str | None:
        """Why the masks of devices that shared but sent no masked input cannot be removed."""
        t = self.config.threshold
        thin = set()
        for v in self._u2 - u3:
            live = self._graph.live(v, u3)  # none: it had no surviving neighbour to remove
            if live and len(live) < t:
                thin.add(v)
        if thin:
            return (
                f"the masks of {len(thin)} dropped devices cannot be removed: fewer "
                f"than t={t} of their neighbours survived: {_names(thin)}"
            )
        return None

    def _ring(self, u1: frozenset[str]) -> NeighbourGraph:
        """The neighbour ring over advertisers `u1`, seeded by their committed draws."""
        draws = {u: self._adverts[u].draw for u in u1}
        return NeighbourGraph(self._cohort, self.config.neighbours, draws)

    def _close_advertise(self) -> list[Outbound]:
        u1 = frozenset(self._adverts)
        self._mark_dropped(frozenset(self.cohort) - u1, Stage.ADVERTISE)
        self._u1 = u1
        draws = {u: self._adverts[u].draw for u in u1}
        self._graph = self._ring(u1)
        problem = self._neighbourhood_problem(u1, "advertised keys")
        if problem:
            return self._abort(f"ADVERTISE: {problem}")
        # The same U1 and draws for everyone (16 bytes per advertiser), built once.
        members = tuple(sorted(u1))
        advertised = membership_bitmap(self._cohort, members)
        all_draws = b"".join(draws[u] for u in members)
        out = []
        for u in members:
            adverts = tuple(self._adverts[v] for v in self._graph.of(u))
            roster = Roster(
                round_id=self.round_id,
                recipient=u,
                advertised=advertised,
                draws=all_draws,
                adverts=adverts,
            )
            out.append(Outbound(roster, (u,)))
        self._transition(ServerEvent.CLOSE)
        return out

    def _close_share(self) -> list[Outbound]:
        u2 = frozenset(self._sealed)
        self._mark_dropped(self._u1 - u2, Stage.SHARE)
        self._u2 = u2
        problem = self._neighbourhood_problem(u2, "shared their secrets")
        if problem:
            return self._abort(f"SHARE: {problem}")
        out = []
        for u in sorted(u2):
            forwarded = tuple(
                ForwardedShare(sender=v, ciphertext=self._sealed[v][u])
                for v in sorted(self._graph.live(u, u2))
            )
            inbox = ShareInbox(round_id=self.round_id, recipient=u, shares=forwarded)
            out.append(Outbound(inbox, (u,)))
        self._sealed = {}
        self._sum = np.zeros(self.config.coordinates, dtype=f"<u{self.config.word_bits // 8}")
        self._transition(ServerEvent.CLOSE)
        return out

    def _close_collect(self) -> list[Outbound]:
        u3 = frozenset(self._masked_from)
        dropped = self._u2 - u3
        self._mark_dropped(dropped, Stage.COLLECT)
        self._u3 = u3
        problem = self._neighbourhood_problem(u3, "sent masked inputs")
        if problem:
            return self._abort(f"COLLECT: {problem}")
        problem = self._orphan_problem(u3)
        if problem:
            return self._abort(f"COLLECT: {problem}")
        # A dropped device's pairwise masks are in its surviving neighbours' inputs; removing
        # them needs its key s_v, rebuilt from t of those same neighbours.
        orphaned = {v for v in dropped if self._graph.live(v, u3)}
        self._seed_points = {u: [] for u in u3}
        self._key_points = {v: [] for v in orphaned}
        self._short = len(self._seed_points) + len(self._key_points)
        request = UnmaskRequest(
            round_id=self.round_id, survivors=tuple(sorted(u3)), dropped=tuple(sorted(dropped))
        )
        self._transition(ServerEvent.CLOSE)
        return [Outbound(request, None)]

    def _close_unmask(self) -> list[Outbound]:
        self._mark_dropped(self._u3 - self._responders, Stage.UNMASK)
        t = self.config.threshold
        short_seeds = {u for u, p in self._seed_points.items() if len(p) < t}
        short_keys = {v for v, p in self._key_points.items() if len(p) < t}
        if short_seeds or short_keys:
            parts = []
            if short_seeds:
                parts.append(f"self-mask seeds of {_names(short_seeds)}")
            if short_keys:
                parts.append(f"mask keys of dropped {_names(short_keys)}")
            return self._abort(
                f"UNMASK: fewer than t={t} neighbours answered for the " + "; ".join(parts)
            )
        try:
            total = self._unmask()
            self.unmasked = len(self._u3)
            result = contribution.decode(
                self.config, total, tuple(sorted(self._u3)), seed=self._round_seed
            )
        except (ThresholdError, CryptoError, CompressionError) as exc:
            return self._abort(f"UNMASK: {exc}")
        self._result = result
        self._sum = None
        self._transition(ServerEvent.CLOSE)
        return []

    def _unmask(self) -> np.ndarray:
        """Strip every mask from the running sum; returns it reduced mod 2^b."""
        if self._sum is None:
            raise LocalProtocolError("no accumulator in UNMASK")
        cfg, t = self.config, self.config.threshold
        total = self._sum
        expander = MaskExpander(cfg.coordinates, cfg.word_bits)
        for u in sorted(self._seed_points):
            seed = shamir.secret_from_element(shamir.reconstruct(self._seed_points[u], t))
            if keys.seed_commitment(seed) != self._adverts[u].seed_commitment:
                raise CryptoError(
                    f"shares of {u!r}'s self-mask seed do not match its commitment "
                    "(a neighbour revealed a bad share)"
                )
            expander.subtract_into(
                total,
                keys.self_mask_seed(
                    seed, round_seed=self._round_seed, round_id=self.round_id, device_id=u
                ),
            )
        for v in sorted(self._key_points):
            private = shamir.secret_from_element(shamir.reconstruct(self._key_points[v], t))
            if keys.public_key_of(private) != self._adverts[v].mask_key:
                raise CryptoError(
                    f"shares of dropped {v!r}'s mask key do not match its advertised key "
                    "(a neighbour revealed a bad share)"
                )
            for w in sorted(self._graph.live(v, self._u3)):
                seed = keys.pairwise_mask_seed(
                    keys.agree(private, self._adverts[w].mask_key),
                    round_seed=self._round_seed,
                    round_id=self.round_id,
                    first=v,
                    second=w,
                )
                # w added +mask when w < v and -mask otherwise; undo exactly that.
                if w < v:
                    expander.subtract_into(total, seed)
                else:
                    expander.add_into(total, seed)
        if cfg.field_bits < cfg.word_bits:
            total &= total.dtype.type(cfg.field_mask)
        return total
