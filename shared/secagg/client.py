"""The device side of SecAgg+: a sans-IO state machine.

What it owns: one device's part in one secure round — its round keys, the shares it deals and
holds, its masked contribution, and what it agrees to reveal.

    client = SecAggClient(config=..., round_id=..., device_id=..., signing_key=...,
                          verify_keys={device_id: ed25519_verify_key_bytes, ...},
                          round_seed=..., tickets={device_id: announced_ticket, ...},
                          draw=my_current_graph_draw, floor=PrivacyFloor(...),
                          random=keys.system_random, deadlines=...)
    client.set_input(update, weight=w, metrics=TrainingMetrics(...))   # any time before COLLECT
    send(client.start(now))                       # -> [Advertise]
    send(client.receive(message, now))            # Roster -> [Shares]; ShareInbox -> [MaskedInput]
                                                  # UnmaskRequest -> [Unmask]; Abort -> []
    send(client.tick(now))                        # gives up after the next stage's deadline

Every returned message goes to the aggregator. States and transitions are the table
`TRANSITIONS` below; `state`, `reason` and `contribution` are for the adapter and tests.

Rules it keeps:
- Sans-IO: no sockets, no clock (time comes in as `now`), no global RNG (bytes come from the
  injected `random`). Masks come only from `prg` (ChaCha20 keyed by derived 32-byte seeds).
- A message that is not for this device now (another round, another recipient, a stage that
  is over, a duplicate) raises RemoteProtocolError and changes nothing: MQTT redelivers and
  retains, so such messages are expected and harmless.
- A message that is for this device now but breaks the protocol (a neighbour's advert that
  does not verify, a request for both shares of one neighbour, too few live neighbours) raises
  RemoteProtocolError and moves to ABORTED: the device stops and forgets its round secrets
  rather than reveal anything under a misbehaving aggregator.
- For each neighbour the device reveals at most one of its two shares, ever.
- Its neighbours are its own to check: the roster must name U1 with draws that match the
  announced tickets (its own draw among them), and its adverts must be exactly this device's
  neighbours on the ring those draws give (`graph`). Anything else is refused.
- Its `PrivacyFloor` comes from the device's own configuration: it does not start in a cohort
  below the floor, deals no shares when too few devices advertised, and reveals no share for
  too few survivors, whatever the announcement's `min_survivors` says.
- A local misuse (start twice, input of the wrong shape) raises LocalProtocolError; the
  machine then stays in ERROR. Any other exception is a bug and also leaves it in ERROR.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import nacl.signing
import numpy as np

from fleetlearn.shared import protocol, wire
from fleetlearn.shared.ids import id_problem
from fleetlearn.shared.secagg import contribution, keys, packing, shamir
from fleetlearn.shared.secagg.config import PrivacyFloor, SecAggConfig, Stage, StageDeadlines
from fleetlearn.shared.secagg.contribution import TrainingMetrics
from fleetlearn.shared.secagg.errors import CryptoError, LocalProtocolError, RemoteProtocolError
from fleetlearn.shared.secagg.graph import NeighbourGraph, members_of
from fleetlearn.shared.secagg.messages import (
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
from fleetlearn.shared.secagg.prg import MaskExpander

AGGREGATOR = "aggregator"  # the only peer of a device; names it in RemoteProtocolError.sender


class ClientState(enum.Enum):
    INIT = "init"  # constructed, nothing sent
    ADVERTISE = "advertise"  # advert sent, waiting for the roster
    SHARE = "share"  # sealed shares sent, waiting for the share inbox
    NEED_INPUT = "need_input"  # inbox in, waiting for set_input() before masking
    COLLECT = "collect"  # masked input sent, waiting for the unmask request
    DONE = "done"  # unmask shares sent: this device's part is complete
    ABORTED = "aborted"  # stopped; `reason` says why. Round secrets are forgotten.
    ERROR = "error"  # local misuse or a bug; the machine refuses every further call


class ClientEvent(enum.Enum):
    START = "start"
    ROSTER = "roster"  # a valid roster arrived
    INBOX_READY = "inbox_ready"  # inbox arrived and the input is set: masked input sent
    INBOX_WAITING = "inbox_waiting"  # inbox arrived before the input
    INPUT = "input"  # input set while waiting for it: masked input sent
    UNMASK = "unmask"  # unmask request answered
    ABORT = "abort"  # Abort from the aggregator, a refusal, a timeout, being left behind
    LOCAL_ERROR = "local_error"


_LIVE = (
    ClientState.INIT,
    ClientState.ADVERTISE,
    ClientState.SHARE,
    ClientState.NEED_INPUT,
    ClientState.COLLECT,
)

TRANSITIONS: dict[tuple[ClientState, ClientEvent], ClientState] = {
    (ClientState.INIT, ClientEvent.START): ClientState.ADVERTISE,
    (ClientState.ADVERTISE, ClientEvent.ROSTER): ClientState.SHARE,
    (ClientState.SHARE, ClientEvent.INBOX_READY): ClientState.COLLECT,
    (ClientState.SHARE, ClientEvent.INBOX_WAITING): ClientState.NEED_INPUT,
    (ClientState.NEED_INPUT, ClientEvent.INPUT): ClientState.COLLECT,
    (ClientState.COLLECT, ClientEvent.UNMASK): ClientState.DONE,
    # An abort after DONE still matters to the device: the round produced nothing.
    **{(s, ClientEvent.ABORT): ClientState.ABORTED for s in (*_LIVE, ClientState.DONE)},
    **{(s, ClientEvent.LOCAL_ERROR): ClientState.ERROR for s in ClientState},
}

# The stage each waiting state waits for the aggregator to open; the message that opens it
# (shared.protocol) is the one the state expects.
_WAITS_FOR: dict[ClientState, Stage] = {
    ClientState.ADVERTISE: Stage.SHARE,
    ClientState.SHARE: Stage.COLLECT,
    ClientState.COLLECT: Stage.UNMASK,
}
_EXPECTS: dict[ClientState, type[wire.Message]] = {
    state: message
    for state, stage in _WAITS_FOR.items()
    if (message := protocol.opener(stage)) is not None
}

# The deadline after which a waiting state gives up: the reply to stage S is useless once
# stage S+1 has closed at the aggregator (NEED_INPUT owes its COLLECT answer itself).
_GIVE_UP_AT: dict[ClientState, Stage] = {**_WAITS_FOR, ClientState.NEED_INPUT: Stage.COLLECT}


@dataclass(frozen=True, slots=True)
class _RoundSecrets:
    share_private: bytes  # c_u: X25519 key for sealing and opening shares
    mask_private: bytes  # s_u: X25519 key for pairwise masks (shared with neighbours)
    seed: bytes  # b_u: self-mask secret (shared with neighbours)


def check_now(now: float) -> None:
    """Times are finite numbers in the adapter's clock."""
    if not isinstance(now, float | int) or isinstance(now, bool) or not math.isfinite(now):
        raise LocalProtocolError(f"now must be a finite number, got {now!r}")


class SecAggClient:
    """One device in one secure round. See the module docstring for the call sequence."""

    def __init__(
        self,
        *,
        config: SecAggConfig,
        round_id: int,
        device_id: str,
        signing_key: nacl.signing.SigningKey,
        verify_keys: Mapping[str, bytes],
        round_seed: bytes,
        tickets: Mapping[str, bytes],
        draw: bytes,
        floor: PrivacyFloor,
        random: keys.RandomSource,
        deadlines: StageDeadlines | None = None,
    ) -> None:
        if not isinstance(config, SecAggConfig):
            raise LocalProtocolError("config must be a SecAggConfig")
        if type(round_id) is not int or round_id < 0:
            raise LocalProtocolError(f"round_id must be an int >= 0, got {round_id!r}")
        if not isinstance(round_seed, bytes) or len(round_seed) != keys.KEY_BYTES:
            raise LocalProtocolError("round_seed must be 32 bytes")
        if not isinstance(signing_key, nacl.signing.SigningKey):
            raise LocalProtocolError("signing_key must be a nacl.signing.SigningKey")
        self._verify_keys = {d: keys.check_verify_key(d, k) for d, k in verify_keys.items()}
        for device in self._verify_keys:
            problem = id_problem(device)
            if problem:
                raise LocalProtocolError(f"roster id {device!r}: {problem}")
        if device_id not in self._verify_keys:
            raise LocalProtocolError(f"device {device_id!r} is not in the roster")
        if bytes(signing_key.verify_key) != self._verify_keys[device_id]:
            raise LocalProtocolError("signing_key does not match this device's roster verify key")
        if len(self._verify_keys) != config.cohort_size:
            raise LocalProtocolError(
                f"roster has {len(self._verify_keys)} devices; config.cohort_size is "
                f"{config.cohort_size}"
            )
        if set(tickets) != set(self._verify_keys) or any(
            not isinstance(t, bytes) or len(t) != keys.TICKET_BYTES for t in tickets.values()
        ):
            raise LocalProtocolError(
                f"tickets must map every cohort device to {keys.TICKET_BYTES} bytes"
            )
        if not isinstance(draw, bytes) or len(draw) != keys.DRAW_BYTES:
            raise LocalProtocolError(f"draw must be {keys.DRAW_BYTES} bytes")
        if not isinstance(floor, PrivacyFloor):
            raise LocalProtocolError("floor must be a PrivacyFloor")
        self.config = config
        self.round_id = round_id
        self.device_id = device_id
        self.deadlines = deadlines
        self._signing_key = signing_key
        self._round_seed = round_seed
        self._random = random
        self._tickets = tickets  # read only; not copied (n entries, and n devices in a simulator)
        self._draw = draw
        self.floor = floor
        self._cohort = tuple(sorted(self._verify_keys))
        # From the roster, once checked: U1, and the neighbours' Shamir x-coordinates. The
        # ring itself is not kept (n entries per device: a simulator runs 1000 of them).
        # A tuple, not a set: tuples of strings drop out of the garbage collector's tracking.
        self._advertisers: tuple[str, ...] = ()
        self._neighbours: frozenset[str] = frozenset()
        self._state = ClientState.INIT
        self._reason: str | None = None
        # Round secrets: made by start(), dropped when the device is done or stops.
        self._round_secrets: _RoundSecrets | None = None
        self._input: np.ndarray | None = None  # quantized contribution, until it is masked
        self._input_given = False
        self._adverts: dict[str, KeyAdvert] = {}  # neighbours in U1
        self._channels: dict[str, bytes] = {}  # neighbour -> X25519(c_u, c_v), seals both ways
        self._held: dict[str, tuple[int, int] | None] = {}  # neighbours in U2 -> (s, b) shares
        self._revealed: dict[str, str] = {}  # neighbour -> "seed" | "key": at most one, ever

    # ------------------------------------------------------------------------------ state

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def reason(self) -> str | None:
        """Why the device ABORTED (or entered ERROR)."""
        return self._reason

    @property
    def advertisers(self) -> tuple[str, ...]:
        """U1 as the roster named it, sorted (empty until the roster arrived and checked out)."""
        return self._advertisers

    @property
    def neighbours(self) -> frozenset[str]:
        """This device's neighbours in U1; empty until the roster arrived and checked out."""
        return self._neighbours

    @property
    def contribution(self) -> np.ndarray | None:
        """A copy of this device's own quantized contribution in Z_2^b, until it is masked.

        It never leaves the device unmasked; exposed so tests and local audits can check
        the aggregate against what went in.
        """
        return None if self._input is None else self._input.copy()

    def _transition(self, event: ClientEvent) -> None:
        try:
            self._state = TRANSITIONS[(self._state, event)]
        except KeyError:
            raise LocalProtocolError(
                f"no transition from {self._state.name} on {event.name}"
            ) from None

    @property
    def _secrets(self) -> _RoundSecrets:
        if self._round_secrets is None:
            raise LocalProtocolError(f"round secrets are gone in state {self._state.name}")
        return self._round_secrets

    @contextmanager
    def _guard(self, now: float | None = None) -> Iterator[None]:
        if self._state is ClientState.ERROR:
            raise LocalProtocolError(f"device state machine is in ERROR ({self._reason})")
        try:
            if now is not None:
                check_now(now)
            yield
        except RemoteProtocolError:
            raise  # the handler already decided whether it aborts
        except Exception as exc:
            self._forget()
            self._reason = f"{type(exc).__name__}: {exc}"
            self._state = ClientState.ERROR
            raise

    def _abort(self, reason: str) -> None:
        self._forget()
        self._reason = reason
        self._transition(ClientEvent.ABORT)

    def _refuse(self, problem: str) -> RemoteProtocolError:
        """The aggregator broke the protocol in a message meant for us: stop, forget, report."""
        stage = self._stage_name()
        self._abort(f"refused: {problem}")
        return RemoteProtocolError(problem, sender=AGGREGATOR, stage=stage)

    def _stage_name(self) -> str:
        return self._state.value

    def _forget(self) -> None:
        self._round_secrets = None
        self._channels = {}
        self._input = None
        self._held = {}

    # ----------------------------------------------------------------------------- inputs

    def set_input(
        self, vector: np.ndarray, *, weight: float, metrics: TrainingMetrics | None = None
    ) -> list[wire.Message]:
        """Give the device's update (the d shared coordinates, float) and its FedAvg weight.

        Quantizes at once. If the share inbox already arrived, returns the MaskedInput to send;
        otherwise returns [] and the masked input goes out when the inbox arrives. After the
        round ABORTED (training finished too late) this is a no-op returning [].
        """
        if self._state is ClientState.ABORTED:
            return []
        with self._guard():
            if self._input_given:
                raise LocalProtocolError("set_input was already called for this round")
            if self._state not in (
                ClientState.INIT,
                ClientState.ADVERTISE,
                ClientState.SHARE,
                ClientState.NEED_INPUT,
            ):
                raise LocalProtocolError(f"set_input is too late in state {self._state.name}")
            # Dither for stochastic rounding: device-local noise, seeded from the injected
            # source (never mask material; masks come from prg only).
            rng = np.random.default_rng(int.from_bytes(keys.draw(self._random, 32), "big"))
            self._input = contribution.encode(
                self.config,
                vector,
                weight=weight,
                metrics=metrics or TrainingMetrics(),
                rng=rng,
                seed=self._round_seed,
            )
            self._input_given = True
            if self._state is ClientState.NEED_INPUT:
                message = self._masked_input()
                self._transition(ClientEvent.INPUT)
                return [message]
            return []

    # ------------------------------------------------------------------------------ start

    def start(self, now: float) -> list[wire.Message]:
        """Generate this round's keys and return the signed Advertise, revealing the draw.

        Refuses (RemoteProtocolError, ABORTED, nothing revealed) a cohort below this device's
        floor, or an announcement whose ticket for this device is not the one of its draw."""
        with self._guard(now):
            if self._state is not ClientState.INIT:
                raise LocalProtocolError(f"start() in state {self._state.name}")
            problem = self.floor.cohort_problem(self.config.cohort_size) or (
                self.floor.noise_problem(self.config)
            )
            if problem:
                raise self._refuse(problem)
            if self._tickets[self.device_id] != keys.ticket_of(self.device_id, self._draw):
                raise self._refuse(
                    "the announcement's ticket for this device is not its current one"
                )
            share_private, share_public = keys.generate_keypair(self._random)
            mask_private, mask_public = keys.generate_keypair(self._random)
            seed = keys.draw(self._random, keys.KEY_BYTES)
            self._round_secrets = _RoundSecrets(share_private, mask_private, seed)
            commitment = keys.seed_commitment(seed)
            transcript = keys.advert_transcript(
                round_id=self.round_id,
                round_seed=self._round_seed,
                device_id=self.device_id,
                share_key=share_public,
                mask_key=mask_public,
                seed_commitment=commitment,
                draw=self._draw,
            )
            message = Advertise(
                round_id=self.round_id,
                sender=self.device_id,
                share_key=share_public,
                mask_key=mask_public,
                seed_commitment=commitment,
                draw=self._draw,
                signature=keys.sign(self._signing_key, transcript),
            )
            self._transition(ClientEvent.START)
            return [message]

    # ---------------------------------------------------------------------------- receive

    def receive(self, message: wire.Message, now: float) -> list[wire.Message]:
        """Handle one message from the aggregator; return what to send back."""
        with self._guard(now):
            if not isinstance(message, Roster | ShareInbox | UnmaskRequest | Abort):
                raise RemoteProtocolError(
                    f"{type(message).__name__} is not a message the aggregator sends",
                    sender=AGGREGATOR,
                    stage=self._stage_name(),
                )
            if message.round_id != self.round_id:
                raise RemoteProtocolError(
                    f"message for round {message.round_id}; this is round {self.round_id}",
                    sender=AGGREGATOR,
                    stage=self._stage_name(),
                )
            if isinstance(message, Roster | ShareInbox) and message.recipient != self.device_id:
                raise RemoteProtocolError(
                    f"{type(message).__name__} addressed to {message.recipient!r}",
                    sender=AGGREGATOR,
                    stage=self._stage_name(),
                )
            if isinstance(message, Abort):
                return self._on_abort(message)
            if isinstance(message, UnmaskRequest) and self._state in (
                ClientState.INIT,
                ClientState.ADVERTISE,
                ClientState.SHARE,
                ClientState.NEED_INPUT,
            ):
                # The aggregator moved past COLLECT without our masked input: we were dropped
                # (or excluded, e.g. for a bad advert) and can only stop.
                self._abort("left behind: the aggregator closed COLLECT without this device")
                return []
            expected = _EXPECTS.get(self._state)
            if expected is None or not isinstance(message, expected):
                raise RemoteProtocolError(
                    f"{type(message).__name__} is not expected in state {self._state.name}",
                    sender=AGGREGATOR,
                    stage=self._stage_name(),
                )
            if isinstance(message, Roster):
                return self._on_roster(message)
            if isinstance(message, ShareInbox):
                return self._on_inbox(message)
            return self._on_unmask_request(message)

    def tick(self, now: float) -> list[wire.Message]:
        """Give up when the aggregator's reply can no longer be useful."""
        with self._guard(now):
            stage = _GIVE_UP_AT.get(self._state)
            if stage is not None and self.deadlines is not None:
                deadline = self.deadlines.of(stage)
                if now >= deadline:
                    self._abort(
                        f"timed out in {self._state.name}: nothing from the aggregator by the "
                        f"{stage} deadline"
                    )
            return []

    # --------------------------------------------------------------------------- handlers

    def _on_abort(self, message: Abort) -> list[wire.Message]:
        if self._state not in (*_LIVE, ClientState.DONE):
            raise RemoteProtocolError(
                "Abort after the round ended for this device", sender=AGGREGATOR
            )
        self._abort(f"aborted by the aggregator: {message.reason}")
        return []

    def _on_roster(self, message: Roster) -> list[wire.Message]:
        graph = self._check_membership(message)
        me = self.device_id
        neighbours = frozenset(graph.of(me))
        got = {a.device_id for a in message.adverts}
        if got != neighbours:
            missing, extra = sorted(neighbours - got), sorted(got - neighbours)
            raise self._refuse(
                "the roster's adverts are not this device's neighbours on the ring of U1"
                + (f"; missing {missing[:3]}" if missing else "")
                + (f"; not neighbours {extra[:3]}" if extra else "")
            )
        adverts: dict[str, KeyAdvert] = {}
        for advert in message.adverts:
            v = advert.device_id
            transcript = keys.advert_transcript(
                round_id=self.round_id,
                round_seed=self._round_seed,
                device_id=v,
                share_key=advert.share_key,
                mask_key=advert.mask_key,
                seed_commitment=advert.seed_commitment,
                draw=advert.draw,
            )
            try:
                keys.verify(self._verify_keys[v], transcript, advert.signature)
            except CryptoError:
                raise self._refuse(
                    f"the advert of neighbour {v!r} does not carry its signature"
                ) from None
            if keys.ticket_of(v, advert.draw) != self._tickets[v]:
                raise self._refuse(f"the advert of neighbour {v!r} carries another draw")
            adverts[v] = advert
        self._advertisers = graph.members
        self._neighbours = neighbours
        t = self.config.threshold
        if len(adverts) < t:
            raise self._refuse(
                f"only {len(adverts)} neighbours among the {len(graph.members)} advertisers; "
                f"the threshold is {t}"
            )
        secrets = self._secrets
        recipients = sorted(adverts)
        xs = [graph.share_x(v) for v in recipients]
        dealt = shamir.split([secrets.mask_private, secrets.seed], xs, t, self._random)
        sealed = []
        channels: dict[str, bytes] = {}
        for v, (mask_share, seed_share) in zip(recipients, dealt, strict=True):
            try:
                agreed = keys.agree(secrets.share_private, adverts[v].share_key)
            except CryptoError as exc:
                raise self._refuse(f"neighbour {v!r}: {exc}") from None
            channels[v] = agreed
            plaintext = shamir.encode_share(mask_share) + shamir.encode_share(seed_share)
            ciphertext = keys.seal_share(
                plaintext,
                agreed=agreed,
                round_seed=self._round_seed,
                round_id=self.round_id,
                sender=self.device_id,
                recipient=v,
            )
            sealed.append(SealedShare(recipient=v, ciphertext=ciphertext))
        self._adverts = adverts
        self._channels = channels
        self._transition(ClientEvent.ROSTER)
        return [Shares(round_id=self.round_id, sender=self.device_id, shares=tuple(sealed))]

    def _check_membership(self, message: Roster) -> NeighbourGraph:
        """U1 and its draws from the roster, checked against the announcement and the floor;
        the ring they give. Any mismatch is the aggregator's: refused."""
        n = len(self._cohort)
        members = members_of(self._cohort, message.advertised)
        if members is None:
            raise self._refuse(f"the advertised bitmap does not fit a cohort of {n}")
        if self.device_id not in members:
            raise self._refuse("the roster leaves this device out of the advertisers")
        needed = self.floor.advertisers_needed(self.config)
        if len(members) < needed:
            raise self._refuse(
                f"only {len(members)} of {n} devices advertised; this device deals shares "
                f"only when at least {needed} did"
            )
        size = keys.DRAW_BYTES
        blob = message.draws
        tickets = self._tickets
        for device, ticket in zip(members, keys.tickets_of_draws(members, blob), strict=True):
            if ticket != tickets[device]:
                raise self._refuse(f"the draw of {device!r} does not match its announced ticket")
        mine = members.index(self.device_id)
        if blob[mine * size : (mine + 1) * size] != self._draw:
            raise self._refuse("the roster gives this device a draw that is not its own")
        return NeighbourGraph.from_roster(
            self._cohort, self.config.neighbours, members, message.advertised, blob
        )

    def _open(self, forwarded: ForwardedShare) -> tuple[int, int] | None:
        """Decrypt one forwarded share; None when it does not open (the sender's loss)."""
        v = forwarded.sender
        try:
            plaintext = keys.open_share(
                forwarded.ciphertext,
                agreed=self._channels[v],
                round_seed=self._round_seed,
                round_id=self.round_id,
                sender=v,
                recipient=self.device_id,
            )
            size = shamir.SHARE_BYTES
            return shamir.decode_share(plaintext[:size]), shamir.decode_share(plaintext[size:])
        except CryptoError:
            # A neighbour that sealed garbage only hurts the recovery of its own secrets; the
            # pair still masks with each other, so the sums stay consistent.
            return None

    def _on_inbox(self, message: ShareInbox) -> list[wire.Message]:
        senders = [s.sender for s in message.shares]
        strangers = [v for v in senders if v not in self._adverts]
        if strangers:
            raise self._refuse(f"shares from {strangers[:3]} who are not advertised neighbours")
        t = self.config.threshold
        if len(senders) < t:
            raise self._refuse(f"shares from only {len(senders)} neighbours; the threshold is {t}")
        self._held = {s.sender: self._open(s) for s in message.shares}
        if self._input is None:
            self._transition(ClientEvent.INBOX_WAITING)
            return []
        out = self._masked_input()
        self._transition(ClientEvent.INBOX_READY)
        return [out]

    def _masked_input(self) -> MaskedInput:
        """y = x + PRG(b_u) + sum_{v in U2, u<v} PRG(s_uv) - sum_{v in U2, u>v} PRG(s_uv)."""
        secrets = self._secrets
        if self._input is None:
            raise LocalProtocolError("no input to mask")
        cfg = self.config
        masked = self._input
        self._input = None  # masked in place below; the plain contribution is gone after this
        expander = MaskExpander(cfg.coordinates, cfg.word_bits)
        expander.add_into(
            masked,
            keys.self_mask_seed(
                secrets.seed,
                round_seed=self._round_seed,
                round_id=self.round_id,
                device_id=self.device_id,
            ),
        )
        for v in sorted(self._held):
            try:
                agreed = keys.agree(secrets.mask_private, self._adverts[v].mask_key)
            except CryptoError as exc:
                raise self._refuse(f"neighbour {v!r}: {exc}") from None
            seed = keys.pairwise_mask_seed(
                agreed,
                round_seed=self._round_seed,
                round_id=self.round_id,
                first=self.device_id,
                second=v,
            )
            if self.device_id < v:
                expander.add_into(masked, seed)
            else:
                expander.subtract_into(masked, seed)
        if cfg.field_bits < cfg.word_bits:
            masked &= masked.dtype.type(cfg.field_mask)
        return MaskedInput(
            round_id=self.round_id,
            sender=self.device_id,
            masked=packing.pack(masked, cfg.field_bits),
        )

    def _on_unmask_request(self, message: UnmaskRequest) -> list[wire.Message]:
        survivors, dropped = set(message.survivors), set(message.dropped)
        both = sorted(survivors & dropped & self._neighbours)
        if both:
            raise self._refuse(
                f"asked for both the seed share and the key share of {both[:3]}; a device "
                "reveals at most one share per neighbour"
            )
        if self.device_id not in survivors:
            self._abort("the aggregator did not count this device's masked input")
            return []
        strangers = sorted((survivors | dropped) - set(self._advertisers))
        if strangers:
            # Only advertisers can count towards the floor below.
            raise self._refuse(f"survivor list names {strangers[:3]}, who did not advertise")
        needed = self.floor.survivors_needed(self.config)
        if len(survivors) < needed:
            raise self._refuse(
                f"only {len(survivors)} survivors; at least {needed} are required before "
                "anything is unmasked"
            )
        live = survivors & self._neighbours
        if len(live) < self.config.threshold:
            raise self._refuse(
                f"only {len(live)} neighbours survived; the threshold is {self.config.threshold}"
            )
        listed = (survivors | dropped) & self._neighbours
        unknown = sorted(listed - set(self._held))
        if unknown:
            raise self._refuse(f"neighbours {unknown[:3]} never sent this device their shares")
        unlisted = sorted(set(self._held) - listed)
        if unlisted:
            raise self._refuse(f"neighbours {unlisted[:3]} are neither survivors nor dropped")
        seed_shares, key_shares = [], []
        for v in sorted(self._held):
            kind = "seed" if v in survivors else "key"
            if self._revealed.get(v, kind) != kind:
                raise self._refuse(f"already revealed the other share of {v!r}")
            held = self._held[v]
            if held is None:
                continue  # the share never decrypted; nothing to reveal
            mask_share, seed_share = held
            self._revealed[v] = kind
            if kind == "seed":
                seed_shares.append(RevealedShare(owner=v, share=shamir.encode_share(seed_share)))
            else:
                key_shares.append(RevealedShare(owner=v, share=shamir.encode_share(mask_share)))
        self._forget()
        self._transition(ClientEvent.UNMASK)
        return [
            Unmask(
                round_id=self.round_id,
                sender=self.device_id,
                seed_shares=tuple(seed_shares),
                key_shares=tuple(key_shares),
            )
        ]
