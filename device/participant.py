"""A device's part in the fleet's rounds, sans-IO.

The participant reads the three things the aggregator publishes for it — model releases, round
announcements, and its round's addressed and cohort-wide messages — and answers with actions
for the adapter (`device.agent`) to carry out:

    Send(topic, payload)        publish this
    LoadModel(model, manifest)  a verified release: load it into a fresh interpreter
    Train(round_id, plan)       train the loaded model on local data, then call trained()
    PublishStatus()             republish the retained status: `ticket` changed
    Note(kind, text)            something to report; `kind` (NoteKind) says what, for the
                                adapter to act on (a refused release goes in the status)

Rules:
- A release is loaded only after its signature, manifest and content hash verify against the
  aggregator key from provisioning, and only if it is newer than the loaded one and not older
  than `min_version`, the newest version this device ever accepted (the adapter persists it,
  so a restart cannot be rolled back to an older, validly signed release). A refused release
  leaves the previous model in place and is reported, never silently dropped.
- The device joins a round only when it is in the cohort and runs the round's model version.
  Secure rounds go through `SecAggClient`; plain rounds send a compressed `PlainUpdate`.
- Timing: the announcement's stage limits are durations. The device counts each one from when
  it saw the stage open (the announcement, then the roster, the share inbox, the unmask
  request) on its own clock, and gives up waiting once the aggregator must have moved on
  (`shared.stagetime.give_up_at`); clocks are never compared across machines.
- Secure rounds also need the announcement to carry this device's current graph ticket and to
  meet its own `PrivacyFloor` (from its configuration, never from the announcement); otherwise
  it does not join and says why. The participant owns the secret draw behind the ticket: once
  an advert revealed it, it draws a fresh one and asks for the status to be republished, so
  a draw is never used twice.
- Error feedback: what a round did not transmit (unsent coordinates, clipping) is kept for the
  next round; an update that never reached an aggregate (round aborted, device not a survivor)
  is given back with `reclaim`. The adapter persists `feedback.save()` between restarts.
- Cost (shared.cost): `meter` tallies the payload bytes of every release and round message
  this device receives and of every round message it sends, and the CPU time of its training
  (`LocalResult.cpu_s`, measured by the adapter); each update carries the tally since the
  previous one, inside the masked vector in secure rounds. Local DP updates carry none.
- No I/O, no clock, no global RNG: `now` and a random-bytes source are passed in.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from fleetlearn.shared import compression, privacy, protocol, tflite, topics, wire
from fleetlearn.shared.cost import Cost, CostMeter, EnergyModel
from fleetlearn.shared.release import ModelRelease, verify_release
from fleetlearn.shared.rounds import (
    MAX_EVAL_CLASSES,
    PlainUpdate,
    RoundAnnounce,
    RoundMode,
    RoundState,
    staleness_weight,
)
from fleetlearn.shared.secagg import keys as sk
from fleetlearn.shared.secagg import messages as sm
from fleetlearn.shared.secagg.client import ClientState, SecAggClient
from fleetlearn.shared.secagg.config import PrivacyFloor, Stage
from fleetlearn.shared.secagg.contribution import TrainingMetrics
from fleetlearn.shared.secagg.errors import ProtocolError, SecAggError
from fleetlearn.shared.stagetime import give_up_at


@dataclass(frozen=True, slots=True)
class Send:
    topic: str
    payload: bytes
    retain: bool = False
    expiry: int | None = protocol.ROUND_MESSAGE_EXPIRY


@dataclass(frozen=True, slots=True)
class LoadModel:
    model: bytes
    manifest: tflite.ModelManifest
    release: bytes = b""  # the signed release as received, for the adapter to persist


@dataclass(frozen=True, slots=True)
class Train:
    round_id: int
    announce: RoundAnnounce


@dataclass(frozen=True, slots=True)
class PublishStatus:
    """The retained status is out of date (a new graph ticket): publish it again."""


class NoteKind(enum.Enum):
    """What a Note reports. Adapters act on the kind, never on the wording of `text`."""

    RELEASE_REFUSED = "release_refused"  # a release was not loaded; the previous model stays
    ROUND_SKIPPED = "round_skipped"  # an announcement this device does not join, and why
    ROUND_LEFT = "round_left"  # it left (or gave up on) a round it was in; the round goes on
    MESSAGE_IGNORED = "message_ignored"  # a round message not for now; nothing changed


@dataclass(frozen=True, slots=True)
class Note:
    kind: NoteKind
    text: str


Action = Send | LoadModel | Train | PublishStatus | Note


@dataclass(frozen=True, slots=True)
class LocalResult:
    """What local training produced, in the manifest's flat layout."""

    update: np.ndarray  # trained weights - release weights, float32/64, full dimension
    weight: float  # FedAvg weight: examples trained on
    # Federated evaluation on the device's held-out rows (`samples` of them; 0: none held out):
    loss: float  # mean loss of the release as it is (the global model)
    correct: int  # rows the global model classified right
    samples: int
    local_correct: int = 0  # rows the device's own trained model classified right
    # The global model per class of its outputs, on the same rows: rows with each label, hits.
    class_samples: tuple[int, ...] = ()
    class_correct: tuple[int, ...] = ()
    cpu_s: float = 0.0  # CPU seconds the training took on this device (the adapter measures)


# A secure round's client, waiting: in which stage, and whether it already sent its message
# for it (then it waits for the aggregator to open the next stage).
_WAITING: dict[ClientState, tuple[Stage, bool]] = {
    ClientState.ADVERTISE: (Stage.ADVERTISE, True),
    ClientState.SHARE: (Stage.SHARE, True),
    ClientState.NEED_INPUT: (Stage.COLLECT, False),
    ClientState.COLLECT: (Stage.COLLECT, True),
}


@dataclass(frozen=True, slots=True)
class _Invitation:
    """Secure asynchronous rounds: an invitation this device trains for."""

    round_id: int  # the round that invited it
    announce: RoundAnnounce  # what to train: that announcement's release and plan


@dataclass(frozen=True, slots=True)
class _Held:
    """Secure asynchronous rounds: a trained update waiting for a group."""

    result: LocalResult
    base_version: int  # the release it was trained from


@dataclass(slots=True)
class _Round:
    announce: RoundAnnounce
    opened: dict[Stage, float]  # when this device saw each stage open, on its own clock
    client: SecAggClient | None
    sent: np.ndarray | None = None  # what error feedback committed, to reclaim on failure
    trained: bool = False
    counted: bool | None = None  # True: in the aggregate; False: reclaimed
    cost: Cost | None = None  # the cost report the update carries, given back on failure


class Participant:
    def __init__(
        self,
        *,
        fleet: str,
        device_id: str,
        identity: SigningKey,
        aggregator_key: VerifyKey,
        registry: Mapping[str, bytes],
        random: Callable[[int], bytes],
        feedback: compression.ErrorFeedback | None = None,
        min_version: int = 1,
        floor: PrivacyFloor | None = None,
        energy: EnergyModel | None = None,
    ) -> None:
        self.fleet = topics.check_id(fleet, "fleet id")
        # The newest release version this device ever accepted: nothing older is loaded.
        self.min_version = max(1, int(min_version))
        self.device_id = topics.check_id(device_id)
        self._identity = identity
        self._aggregator_key = aggregator_key
        self._registry = dict(registry)
        self._random = random
        self.floor = floor or PrivacyFloor()
        # The secret behind `ticket`: revealed in one advert only, then replaced.
        self._draw = sk.new_draw(random)
        self.feedback = feedback
        self.manifest: tflite.ModelManifest | None = None
        self._release_digest = b""
        self._round: _Round | None = None
        self._last_round = -1
        # Secure asynchronous rounds: the invitation being trained for, the newest invitation
        # taken, and the trained update waiting for a group.
        self._invitation: _Invitation | None = None
        self._last_invitation = -1
        self._held: _Held | None = None
        self.refused: list[str] = []  # why releases were refused, newest last
        # What went into SecAgg per round: (coordinates, values, weight), for local audit and
        # tests; the last few rounds only.
        self.inputs: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        self.rounds_joined = 0
        self.meter = CostMeter(energy)

    @property
    def model_version(self) -> int:
        return 0 if self.manifest is None else self.manifest.version

    @property
    def ticket(self) -> bytes:
        """The commitment to the current graph draw, for the retained status."""
        return sk.ticket_of(self.device_id, self._draw)

    @property
    def round(self) -> RoundAnnounce | None:
        return None if self._round is None else self._round.announce

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(int.from_bytes(self._random(16), "big"))

    # ---------------------------------------------------------------------------- releases

    def on_model(self, payload: bytes, now: float) -> list[Action]:
        self.meter.received(len(payload))
        try:
            release = wire.decode(payload, ModelRelease)
        except wire.WireError as exc:
            return self._refuse(f"unreadable release ({exc})")
        version = release.manifest.version
        digest = hashlib.sha256(payload).digest()
        if version == self.model_version and digest == self._release_digest:
            return []  # the very same release again (retained, after a reconnect)
        try:
            model, manifest = verify_release(
                release, self._aggregator_key, min_version=max(self.min_version, self.model_version)
            )
        except tflite.ModelError as exc:
            return self._refuse(f"release v{version} refused: {exc}")
        if self.manifest is not None and manifest.version == self.model_version:
            if manifest.content_hash == self.manifest.content_hash:
                self._release_digest = digest  # the same model, released again
                return []
            return self._refuse(
                f"release v{version} refused: a different model with the loaded version"
            )
        if self.manifest is not None and manifest.model_id != self.manifest.model_id:
            return self._refuse(
                f"release v{version} is model {manifest.model_id!r}, not {self.manifest.model_id!r}"
            )
        self.manifest = manifest
        self.min_version = manifest.version
        self._release_digest = digest
        dim = tflite.layout_size(manifest.layout)
        if self.feedback is None or self.feedback.dim != dim:
            self.feedback = compression.ErrorFeedback(dim)
        return [LoadModel(model, manifest, payload)]

    def _refuse(self, why: str) -> list[Action]:
        self.refused.append(why)
        del self.refused[:-20]  # the newest reasons are what a status shows; keep memory flat
        return [Note(NoteKind.RELEASE_REFUSED, why)]

    # ------------------------------------------------------------------------------ rounds

    def on_round(self, payload: bytes, now: float) -> list[Action]:
        self.meter.received(len(payload))
        try:
            announce = wire.decode(payload, RoundAnnounce)
        except wire.WireError as exc:
            return [Note(NoteKind.ROUND_SKIPPED, f"unreadable round announcement ({exc})")]
        current = self._round
        if announce.mode is RoundMode.ASYNC:
            return self._on_async(announce, now)
        if announce.mode is RoundMode.ASYNC_SECURE:
            return self._on_async_secure(announce, now)
        if current is not None and current.announce.mode is RoundMode.ASYNC:
            self._end_round(counted=False)  # the fleet went back to rounds: drop the invitation
            current = None
        self._invitation = self._held = None  # likewise
        if announce.state is not RoundState.OPEN:
            if current is not None and current.announce.round_id == announce.round_id:
                self._end_round(counted=announce.state is RoundState.CLOSED and self._survived())
            return []
        if announce.round_id <= self._last_round or self.device_id not in announce.cohort:
            return []
        if announce.model_version != self.model_version:
            return [
                Note(
                    NoteKind.ROUND_SKIPPED,
                    f"round {announce.round_id} trains model v{announce.model_version}; "
                    f"this device has v{self.model_version}",
                )
            ]
        if current is not None:
            self._end_round(counted=False)  # a new round supersedes one we never saw end
        self._last_round = announce.round_id
        floor = self.floor.min_noise
        if announce.mode is RoundMode.PLAIN and floor and announce.training.local_noise < floor:
            why = (
                f"round {announce.round_id}: not joining: a plain round with local noise "
                f"{announce.training.local_noise:g}; this device demands {floor:g}"
            )
            return [Note(NoteKind.ROUND_SKIPPED, why)]
        out: list[Action] = [Train(announce.round_id, announce)]
        if announce.mode is RoundMode.SECURE:
            joined = self._join_secure(announce, now)
            if self._round is None or self._round.announce.round_id != announce.round_id:
                return joined  # not joining: says why
            return out + joined
        self._round = _Round(announce, {Stage.COLLECT: now}, None)
        self.rounds_joined += 1
        return out

    def _join_secure(self, announce: RoundAnnounce, now: float) -> list[Action]:
        """Start this device's SecAgg+ client for `announce` (its advert), or say why not."""
        assert announce.secagg is not None
        try:
            keys = {d: self._registry[d] for d in announce.cohort}
        except KeyError as exc:
            why = f"round {announce.round_id}: cohort member {exc} is not provisioned"
            return [Note(NoteKind.ROUND_SKIPPED, why)]
        try:
            client = SecAggClient(
                config=announce.secagg,
                round_id=announce.round_id,
                device_id=self.device_id,
                signing_key=self._identity,
                verify_keys=keys,
                round_seed=announce.seed,
                tickets=announce.ticket_map(),
                draw=self._draw,
                floor=self.floor,
                random=self._random,
                deadlines=None,  # this participant applies the round's limits (tick)
            )
            advert = client.start(now)
        except ProtocolError as exc:
            # Below this device's floor, or not its current ticket: nothing was revealed.
            return [Note(NoteKind.ROUND_SKIPPED, f"round {announce.round_id}: not joining: {exc}")]
        out: list[Action] = list(self._sends(advert))
        # The advert revealed the draw: never use it again.
        self._draw = sk.new_draw(self._random)
        out.append(PublishStatus())
        self._round = _Round(announce, {Stage.ADVERTISE: now}, client)
        self.rounds_joined += 1
        return out

    def _on_async(self, announce: RoundAnnounce, now: float) -> list[Action]:
        """An asynchronous round's announcement (shared.rounds): invitations, not rounds.
        A new invitation trains on the announced release (the adapter waits for it to load
        if it is still on its way); a standing one goes on; none cancels what is pending.
        Its end (CLOSED or ABORTED) changes nothing: the next announcement says who trains."""
        if announce.state is not RoundState.OPEN or announce.round_id <= self._last_round:
            return []  # over, or seen already (a retained announcement comes again)
        current = self._round
        self._last_round = announce.round_id
        invited = announce.invitation(self.device_id)
        if current is not None and (
            current.announce.mode is not RoundMode.ASYNC or invited != current.announce.round_id
        ):
            self._end_round(counted=False)  # no longer invited (lapsed), or re-invited anew
            current = None
        if current is not None or invited != announce.round_id:
            return []  # still training for a standing invitation, or not invited
        if announce.model_version < self.model_version:
            return []  # an announcement older than the release this device runs
        floor = self.floor.min_noise
        if floor and announce.training.local_noise < floor:
            why = (
                f"round {announce.round_id}: not joining: local noise "
                f"{announce.training.local_noise:g}; this device demands {floor:g}"
            )
            return [Note(NoteKind.ROUND_SKIPPED, why)]
        self._round = _Round(announce, {Stage.COLLECT: now}, None)
        self.rounds_joined += 1
        return [Train(announce.round_id, announce)]

    # ------------------------------------------------------------- secure asynchronous

    @property
    def ready_version(self) -> int:
        """Secure asynchronous rounds: the base version of the trained update this device
        holds for a group (0: none), for its status."""
        return 0 if self._held is None else self._held.base_version

    def _on_async_secure(self, announce: RoundAnnounce, now: float) -> list[Action]:
        """A secure asynchronous announcement (shared.rounds): invitations to train, and a
        group whose held updates this round sums. Every announcement is read whole, also one
        seen before (a call and the round that follows share a round id)."""
        run = self._round
        if announce.state is not RoundState.OPEN:
            if run is not None and run.announce.round_id == announce.round_id:
                self._end_round(counted=announce.state is RoundState.CLOSED and self._survived())
            return []
        out: list[Action] = []
        held = self._held
        if held is not None and (run is None or run.announce.round_id != announce.round_id):
            staleness = announce.model_version - held.base_version
            if staleness > announce.max_staleness:
                # Too old for any group from now on: drop it, so that the aggregator may
                # invite this device again (its status says it holds nothing).
                self._held = None
                why = (
                    f"round {announce.round_id}: the held update from v{held.base_version} is "
                    f"{staleness} releases old (max_staleness {announce.max_staleness}); dropped"
                )
                out += [Note(NoteKind.ROUND_SKIPPED, why), PublishStatus()]
        invited = announce.invitation(self.device_id)
        current = self._invitation
        if current is not None and invited != current.round_id:
            self._invitation = None  # lapsed, or replaced by a newer invitation
        if (
            invited is not None
            # A new invitation, or the same one again for a device that has nothing under way:
            # calls between two rounds share the next round's id, so a lapsed invitation is
            # renewed under the id it had.
            and invited >= self._last_invitation
            and self._invitation is None
            and self._held is None
            and announce.model_version >= self.model_version
        ):
            self._last_invitation = invited
            self._invitation = _Invitation(invited, announce)
            self.rounds_joined += 1
            out.append(Train(invited, announce))
        if self.device_id in announce.cohort and (
            run is None or run.announce.round_id != announce.round_id
        ):
            out += self._join_group(announce, now)
        return out

    def untrained(self, round_id: int) -> list[Action]:
        """The adapter could not train for `round_id` (no model, training failed). An
        asynchronous invitation is given up, so that the next one is taken; synchronous
        rounds are left to their deadlines."""
        invitation = self._invitation
        if invitation is not None and invitation.round_id == round_id:
            self._invitation = None
        run = self._round
        if (
            run is not None
            and run.announce.mode is RoundMode.ASYNC
            and run.announce.round_id == round_id
            and not run.trained
        ):
            self._round = None
        return []

    def _hold(self, invitation: _Invitation, result: LocalResult) -> list[Action]:
        """Training for an invitation finished: keep the update for a group, and say so."""
        self._invitation = None
        if not np.all(np.isfinite(result.update)) or not result.weight > 0:
            why = f"invitation {invitation.round_id}: training diverged; nothing to contribute"
            return [Note(NoteKind.ROUND_LEFT, why)]
        self._held = _Held(result, invitation.announce.model_version)
        return [PublishStatus()]

    def _join_group(self, announce: RoundAnnounce, now: float) -> list[Action]:
        """Contribute the held update to this round's SecAgg+ group, discounted for its
        staleness (the aggregator only sees the sum)."""
        held = self._held
        rid = announce.round_id
        if held is None:
            return [Note(NoteKind.ROUND_SKIPPED, f"round {rid}: no update held for a group")]
        staleness = announce.model_version - held.base_version
        if not 0 <= staleness <= announce.max_staleness:
            self._held = None
            why = (
                f"round {rid}: the held update from v{held.base_version} is {staleness} "
                f"releases old (max_staleness {announce.max_staleness}); dropped"
            )
            return [Note(NoteKind.ROUND_SKIPPED, why), PublishStatus()]
        joined = self._join_secure(announce, now)
        run = self._round
        if run is None or run.announce.round_id != rid:
            return joined  # not joining (its floor, its ticket): the update stays held
        discount = staleness_weight(staleness, announce.staleness_exponent)
        result = dataclasses.replace(held.result, update=held.result.update * discount)
        return joined + self._answer(run, result)

    def _spent(self, outs: list[wire.Message]) -> list[Action]:
        """Once the masked input went out, the held update is spent: the aggregator can
        unmask the sum it is in without this device, so it must never go into another."""
        if self._held is not None and any(isinstance(m, sm.MaskedInput) for m in outs):
            self._held = None
            return [PublishStatus()]
        return []

    def on_message(self, topic: topics.Topic, payload: bytes, now: float) -> list[Action]:
        """An inbox or survivors message of a secure round."""
        self.meter.received(len(payload))
        run = self._round
        if run is None or run.client is None or topic.round_id != run.announce.round_id:
            return []
        expect = protocol.downlink(topic.kind)
        try:
            message = wire.decode(payload, expect, context={"round_id": run.announce.round_id})
            outs = run.client.receive(message, now)
        except (wire.WireError, ProtocolError) as exc:
            if run.client.state not in (ClientState.ABORTED, ClientState.ERROR):
                why = f"round {run.announce.round_id}: ignored a message ({exc})"
                return [Note(NoteKind.MESSAGE_IGNORED, why)]
            # The aggregator's message made this device leave the round (below its floor, an
            # inconsistent roster...): it forgot its secrets. Its status shows it is alive and
            # out by its own choice, so the aggregator does not count it as stalled.
            self._end_round(counted=False)
            why = f"round {run.announce.round_id}: refused: {exc}"
            return [Note(NoteKind.ROUND_LEFT, why), PublishStatus()]
        except SecAggError as exc:
            self._end_round(counted=False)
            why = f"round {topic.round_id} failed on this device: {exc}"
            return [Note(NoteKind.ROUND_LEFT, why)]
        actions: list[Action] = self._sends(outs) + self._spent(outs)
        opens = protocol.OPENS.get(type(message))
        if opens is not None:
            run.opened.setdefault(opens, now)
        if isinstance(message, sm.UnmaskRequest):
            run.counted = self.device_id in message.survivors
        if run.client.state in (ClientState.ABORTED, ClientState.ERROR):
            why = f"round {run.announce.round_id}: {run.client.reason}"
            actions.append(Note(NoteKind.ROUND_LEFT, why))
            self._end_round(counted=False)
        elif run.client.state is ClientState.DONE:
            self._end_round(counted=bool(run.counted))
        return actions

    def trained(self, round_id: int, result: LocalResult, now: float) -> list[Action]:
        """Local training for `round_id` finished (the adapter ran it off the event loop)."""
        self.meter.cpu(result.cpu_s)
        invitation = self._invitation
        if invitation is not None and invitation.round_id == round_id:
            return self._hold(invitation, result)
        run = self._round
        if run is None or run.announce.round_id != round_id or run.trained:
            return []  # the round ended while we trained
        return self._answer(run, result)

    def _answer(self, run: _Round, result: LocalResult) -> list[Action]:
        """Send what the round takes from this local result: a plain update, or the masked
        input through SecAgg+."""
        run.trained = True
        ann = run.announce
        round_id = ann.round_id
        if self.feedback is None or self.feedback.dim != result.update.shape[0]:
            why = f"round {round_id}: update has {result.update.shape[0]} values"
            return [Note(NoteKind.ROUND_LEFT, why)]
        if not np.all(np.isfinite(result.update)) or not result.weight > 0:
            self._end_round(counted=False)
            why = f"round {round_id}: training diverged; update not sent"
            return [Note(NoteKind.ROUND_LEFT, why)]
        samples = min(result.samples, ann.training.max_samples)
        weight = float(min(result.weight, ann.training.max_samples))
        loss = result.loss if math.isfinite(result.loss) else 0.0
        use_feedback = ann.training.error_feedback
        if run.client is None and ann.training.local_dp:
            return self._send_local_dp(run, result)
        if run.client is None:
            if use_feedback:
                compressed = self.feedback.compress(
                    result.update, ann.compression, rng=self._rng(), seed=ann.seed
                )
            else:
                compressed = compression.compress(
                    result.update, ann.compression, rng=self._rng(), seed=ann.seed
                )
            run.sent = compressed.sent if use_feedback else None
            asynchronous = ann.mode is RoundMode.ASYNC
            message = PlainUpdate(
                round_id=round_id,
                sender=self.device_id,
                update=compressed.message,
                weight=weight,
                loss=loss,
                correct=min(result.correct, samples),
                samples=samples,
                local_correct=min(result.local_correct, samples),
                **_class_counts(result, samples),
                base_version=ann.model_version if asynchronous else 0,
                cost=self._report(run),
            )
            run.counted = True  # plain rounds have no survivor list; aborts reclaim it
            if asynchronous:
                self._round = None  # the invitation is answered
            return self._sends([message])
        cfg = ann.secagg
        assert cfg is not None
        dim = self.feedback.dim
        acc = (
            self.feedback.accumulate(result.update)
            if use_feedback
            else np.asarray(result.update, dtype=np.float64)
        )
        idx = (
            compression.shared_coordinates(ann.seed, dim, cfg.dimension)
            if ann.compression.mode is compression.SparseMode.RAND_K
            else np.arange(dim)
        )
        vector = acc[idx]
        # What the aggregate receives from us, in update units (their stochastic rounding and
        # any noise are zero-mean and are not fed back): the clipped, weight-scaled values;
        # with distributed DP, the update clipped to the noise's L2 clip, every device alike.
        if cfg.noise is not None:
            weight = cfg.max_weight
            sent_values = privacy.clip_l2(vector, cfg.noise.clip)
        else:
            scale = weight / cfg.max_weight
            sent_values = np.clip(vector * scale, -cfg.clip, cfg.clip) / scale
        if use_feedback:
            run.sent = compression.scatter(idx, sent_values, dim)
            self.feedback.commit(run.sent)
        self.inputs[round_id] = (idx, vector.astype(np.float64), weight)
        for old in sorted(self.inputs)[:-4]:
            del self.inputs[old]
        metrics = TrainingMetrics(
            loss=min(loss, cfg.max_loss),
            correct=min(result.correct, samples),
            samples=samples,
            local_correct=min(result.local_correct, samples),
            **_class_counts(result, samples),
            cost=self._report(run) or Cost(),
        )
        try:
            outs = run.client.set_input(vector.astype(np.float64), weight=weight, metrics=metrics)
        except SecAggError as exc:
            self._end_round(counted=False)
            return [Note(NoteKind.ROUND_LEFT, f"round {round_id}: {exc}")]
        return self._sends(outs) + self._spent(outs)

    def _send_local_dp(self, run: _Round, result: LocalResult) -> list[Action]:
        """Local DP (docs/privacy.md): the update clipped and noised here, before anything
        leaves the device; no weight and no evaluation figures, which carry no noise. A plan
        with local DP never has error feedback (the aggregator refuses that combination;
        a device ignores it rather than feed noise back)."""
        ann = run.announce
        plan = ann.training
        rng = self._rng()  # the device's own random source, never shared
        update = privacy.clip_l2(np.asarray(result.update, dtype=np.float64), plan.local_clip)
        update = update + rng.normal(0.0, plan.local_noise * plan.local_clip, update.shape)
        compressed = compression.compress(update, ann.compression, rng=rng, seed=ann.seed)
        message = PlainUpdate(
            round_id=ann.round_id,
            sender=self.device_id,
            update=compressed.message,
            weight=1.0,
            loss=0.0,
            correct=0,
            samples=0,
            local_correct=0,
            base_version=ann.model_version if ann.mode is RoundMode.ASYNC else 0,
        )
        run.sent = None
        run.counted = True
        if ann.mode is RoundMode.ASYNC:
            self._round = None
        return self._sends([message])

    def tick(self, now: float) -> list[Action]:
        run = self._round
        if run is None or run.client is None:
            return []
        try:
            run.client.tick(now)
        except SecAggError as exc:
            self._end_round(counted=False)
            return [Note(NoteKind.ROUND_LEFT, f"round {run.announce.round_id}: {exc}")]
        if run.client.state in (ClientState.ABORTED, ClientState.ERROR):
            reason = run.client.reason
            self._end_round(counted=False)
            return [Note(NoteKind.ROUND_LEFT, f"round {run.announce.round_id}: {reason}")]
        waiting = _WAITING.get(run.client.state)
        if waiting is not None:
            stage, answered = waiting
            opened = run.opened.get(stage)
            times = run.announce.times
            if opened is not None and now >= give_up_at(times, stage, opened, answered=answered):
                self._end_round(counted=False)  # the client and its round secrets go with it
                why = (
                    "the aggregator did not open the next stage within the hard limits"
                    if answered
                    else "the local update was not ready within the stage's hard limit"
                )
                why = f"round {run.announce.round_id}: timed out in {stage.value}: {why}"
                return [Note(NoteKind.ROUND_LEFT, why)]
        return []

    # ---------------------------------------------------------------------------- helpers

    def _survived(self) -> bool:
        run = self._round
        return run is not None and (run.counted is True or run.client is None)

    def _end_round(self, *, counted: bool) -> None:
        run = self._round
        if run is None:
            return
        if not counted and run.sent is not None and self.feedback is not None:
            self.feedback.reclaim(run.sent)
        if not counted and run.cost is not None:
            self.meter.give_back(run.cost)  # it reached no aggregate: the next report has it
        self._round = None

    def _report(self, run: _Round) -> Cost | None:
        """The cost report for this round's update, if the round asks for one."""
        if not run.announce.training.cost_report:
            return None
        run.cost = self.meter.take()
        return run.cost

    def _sends(self, messages: list[wire.Message]) -> list[Action]:
        """Each message on the device topic the protocol gives it, under this device's id."""
        out: list[Action] = []
        for msg in messages:
            route = protocol.ROUTE_OF[type(msg)]
            assert isinstance(
                msg, sm.Advertise | sm.Shares | sm.MaskedInput | sm.Unmask | PlainUpdate
            )
            topic = topics.per_device(self.fleet, msg.round_id, route.kind, self.device_id)
            payload = wire.encode(msg)
            self.meter.sent(len(payload))
            out.append(Send(topic, payload, expiry=route.expiry))
        return out


def _class_counts(result: LocalResult, samples: int) -> dict[str, tuple[int, ...]]:
    """The per-class counts to report, or none when they do not fit the totals sent (rows
    beyond `samples`, or more hits than `correct`): a count never outgrows its total."""
    if not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool)
        for v in (*result.class_samples, *result.class_correct)
    ):
        return {"class_samples": (), "class_correct": ()}
    rows = tuple(int(v) for v in result.class_samples)  # numpy integers travel as ints
    hits = tuple(int(v) for v in result.class_correct)
    fits = (
        len(rows) == len(hits) <= MAX_EVAL_CLASSES
        and sum(rows) <= samples
        and sum(hits) <= min(result.correct, samples)
        and all(0 <= h <= r for h, r in zip(hits, rows, strict=True))
    )
    if not fits:
        return {"class_samples": (), "class_correct": ()}
    return {"class_samples": rows, "class_correct": hits}
