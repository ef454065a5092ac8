"""Acceptance 3: the security properties, each tested on the machines themselves.

- a device asked for both the seed share and the key share of one neighbour refuses;
- a bad signature on a key advertisement excludes that device (the round goes on without it);
- a message from another round or stage is rejected, by the aggregator and by a device;
- the same inputs in two rounds give different masked vectors;
- masks come from ChaCha20 only: numpy's generators are unusable while masking and the masked
  vector is recomputed independently from the keystream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest

from fleetlearn.shared import wire
from fleetlearn.shared.secagg import keys, packing
from fleetlearn.shared.secagg.client import ClientState, SecAggClient
from fleetlearn.shared.secagg.config import PrivacyFloor, SecAggConfig, Stage, StageDeadlines
from fleetlearn.shared.secagg.errors import RemoteProtocolError
from fleetlearn.shared.secagg.graph import NeighbourGraph, membership_bitmap
from fleetlearn.shared.secagg.harness import DeviceInput
from fleetlearn.shared.secagg.messages import (
    Advertise,
    MaskedInput,
    Roster,
    ShareInbox,
    Shares,
    Unmask,
    UnmaskRequest,
)
from fleetlearn.shared.secagg.prg import chacha20_keystream
from fleetlearn.shared.secagg.server import Outbound, SecAggServer, ServerState
from tests.secagg_support import (
    deterministic_random,
    graph_draws,
    identities,
    make_inputs,
    run_round,
    tickets_of,
)

SEED = b"\x05" * 32
CONFIG = SecAggConfig.create(cohort_size=8, dimension=16, neighbours=4, max_weight=5.0)


class Round:
    """Server and clients wired by hand (no harness), so a test can stop at any point."""

    def __init__(self, config: SecAggConfig = CONFIG, round_id: int = 1, seed: bytes = SEED):
        self.config = config
        self.ids = identities(config.cohort_size)
        verify = {d: bytes(k.verify_key) for d, k in self.ids.items()}
        deadlines = StageDeadlines.evenly(0.0, 10.0)
        self.draws = graph_draws(list(self.ids), seed + round_id.to_bytes(4, "big"))
        self.tickets = tickets_of(self.draws)
        self.server = SecAggServer(
            config=config,
            round_id=round_id,
            round_seed=seed,
            verify_keys=verify,
            tickets=self.tickets,
            deadlines=deadlines,
        )
        self.clients = {
            d: SecAggClient(
                config=config,
                round_id=round_id,
                device_id=d,
                signing_key=key,
                verify_keys=verify,
                round_seed=seed,
                tickets=self.tickets,
                draw=self.draws[d],
                floor=PrivacyFloor.minimal(),
                random=deterministic_random(f"sec/{round_id}/{d}"),
                deadlines=deadlines,
            )
            for d, key in self.ids.items()
        }
        # The ring every party derives once everyone advertised.
        self.graph = NeighbourGraph(list(self.ids), config.neighbours, self.draws)
        self.inputs: dict[str, DeviceInput] = make_inputs(config, list(self.ids), 9)
        self.sent: dict[str, list[wire.Message]] = {d: [] for d in self.ids}
        self.contributions: dict[str, np.ndarray] = {}

    def give_inputs(self) -> None:
        for d, client in self.clients.items():
            given = self.inputs[d]
            client.set_input(given.vector, weight=given.weight, metrics=given.metrics)
            contribution = client.contribution
            assert contribution is not None
            self.contributions[d] = contribution

    def to_server(self, device: str, messages: list[wire.Message]) -> list[Outbound]:
        out: list[Outbound] = []
        for message in messages:
            self.sent[device].append(message)
            out += self.server.receive(message, 1.0)
        return out

    def to_devices(self, outbound: list[Outbound]) -> Iterator[tuple[str, wire.Message]]:
        for out in outbound:
            for device in out.to or self.server.cohort:
                yield device, out.message

    def until_unmask_request(self) -> UnmaskRequest:
        pending = [o for d, c in self.clients.items() for o in self.to_server(d, c.start(0.0))]
        while pending:
            following: list[Outbound] = []
            for device, message in self.to_devices(pending):
                if isinstance(message, UnmaskRequest):
                    return message
                following += self.to_server(device, self.clients[device].receive(message, 1.0))
            pending = following
        raise AssertionError(f"no unmask request; server {self.server.state} {self.server.reason}")

    def finish(self, request: UnmaskRequest) -> None:
        for device, client in self.clients.items():
            if self.server.state is not ServerState.UNMASK:
                break  # closed early: every secret already had t shares
            self.to_server(device, client.receive(request, 2.0))


# -------------------------------------------------------------------------- both shares refused


def test_device_refuses_to_reveal_both_shares_of_a_neighbour() -> None:
    rnd = Round()
    rnd.give_inputs()
    honest = rnd.until_unmask_request()
    device = "dev-0000"
    client = rnd.clients[device]
    neighbour = sorted(client.neighbours)[0]
    greedy = UnmaskRequest(round_id=1, survivors=honest.survivors, dropped=(neighbour,))
    with pytest.raises(RemoteProtocolError, match="both the seed share and the key share") as info:
        client.receive(greedy, 2.0)
    assert info.value.sender == "aggregator"
    assert client.state is ClientState.ABORTED
    # It stopped: nothing more comes out of it, whatever it is asked next.
    with pytest.raises(RemoteProtocolError):
        client.receive(honest, 2.0)
    assert rnd.sent[device][-1].__class__ is MaskedInput


def test_device_never_reveals_the_other_share_later() -> None:
    rnd = Round()
    rnd.give_inputs()
    honest = rnd.until_unmask_request()
    client = rnd.clients["dev-0001"]
    neighbour = sorted(client.neighbours)[0]
    # The aggregator claims the neighbour dropped: the device reveals its key share...
    claim = UnmaskRequest(
        round_id=1,
        survivors=tuple(d for d in honest.survivors if d != neighbour),
        dropped=(neighbour,),
    )
    (answer,) = client.receive(claim, 2.0)
    assert isinstance(answer, Unmask)
    assert [s.owner for s in answer.key_shares] == [neighbour]
    assert neighbour not in {s.owner for s in answer.seed_shares}
    # ...and asked again with the neighbour as a survivor, it reveals nothing more.
    with pytest.raises(RemoteProtocolError, match="not expected"):
        client.receive(honest, 2.0)
    assert client.state is ClientState.DONE


def test_device_refuses_when_too_few_neighbours_survive() -> None:
    rnd = Round()
    rnd.give_inputs()
    honest = rnd.until_unmask_request()
    client = rnd.clients["dev-0002"]
    gone = sorted(client.neighbours)[: CONFIG.neighbours - CONFIG.threshold + 1]
    thin = UnmaskRequest(
        round_id=1,
        survivors=tuple(d for d in honest.survivors if d not in gone),
        dropped=tuple(gone),
    )
    with pytest.raises(RemoteProtocolError, match="threshold"):
        client.receive(thin, 2.0)
    assert client.state is ClientState.ABORTED


# ----------------------------------------------------------------------------- bad signatures


def _flip_signature(target: str):  # type: ignore[no-untyped-def]
    def uplink(device: str, message: wire.Message) -> list[wire.Message]:
        if device == target and isinstance(message, Advertise):
            bad = bytes([message.signature[0] ^ 0x01]) + message.signature[1:]
            return [dataclasses.replace(message, signature=bad)]
        return [message]

    return uplink


def test_bad_advert_signature_excludes_the_device() -> None:
    config = SecAggConfig.create(cohort_size=10, dimension=12)
    run = run_round(config, uplink=_flip_signature("dev-0003"))
    server = run.server
    assert server.state is ServerState.DONE, server.reason
    assert "dev-0003" not in server.advertised
    assert server.dropped["dev-0003"] is Stage.ADVERTISE
    result = server.result
    assert result is not None
    assert "dev-0003" not in result.survivors
    assert np.array_equal(result.vector, run.expected[: config.dimension])
    (rejection,) = [error for sender, error in run.rejected if sender == "dev-0003"]
    assert isinstance(rejection, RemoteProtocolError)
    assert "signature" in str(rejection)
    # Anything else refused was an unmask answer arriving after the early close.
    assert all("round is over" in str(e) for s, e in run.rejected if s != "dev-0003")


def test_advert_signed_by_another_identity_is_refused() -> None:
    rnd = Round()
    ids = rnd.ids
    _, share_key = keys.generate_keypair(deterministic_random("c"))
    _, mask_key = keys.generate_keypair(deterministic_random("s"))
    commitment = keys.seed_commitment(b"\x00" * 32)
    transcript = keys.advert_transcript(
        round_id=1,
        round_seed=SEED,
        device_id="dev-0002",
        share_key=share_key,
        mask_key=mask_key,
        seed_commitment=commitment,
        draw=rnd.draws["dev-0002"],
    )
    forged = Advertise(
        round_id=1,
        sender="dev-0002",
        share_key=share_key,
        mask_key=mask_key,
        seed_commitment=commitment,
        draw=rnd.draws["dev-0002"],
        signature=keys.sign(ids["dev-0001"], transcript),
    )
    with pytest.raises(RemoteProtocolError, match="signature") as info:
        rnd.server.receive(forged, 1.0)
    assert info.value.sender == "dev-0002"
    assert "dev-0002" in rnd.server.waiting_for()


def test_signed_low_order_key_is_refused() -> None:
    rnd = Round()
    (advert,) = rnd.clients["dev-0004"].start(0.0)
    assert isinstance(advert, Advertise)
    low = bytes(32)
    transcript = keys.advert_transcript(
        round_id=1,
        round_seed=SEED,
        device_id="dev-0004",
        share_key=advert.share_key,
        mask_key=low,
        seed_commitment=advert.seed_commitment,
        draw=advert.draw,
    )
    signed = dataclasses.replace(
        advert, mask_key=low, signature=keys.sign(rnd.ids["dev-0004"], transcript)
    )
    with pytest.raises(RemoteProtocolError, match="low-order"):
        rnd.server.receive(signed, 1.0)


def test_device_refuses_a_roster_with_a_bad_neighbour_signature() -> None:
    rnd = Round()
    device = "dev-0000"
    adverts = {d: c.start(0.0)[0] for d, c in rnd.clients.items()}
    neighbours = sorted(rnd.graph.of(device))
    records = []
    for v in neighbours:
        advert = adverts[v]
        assert isinstance(advert, Advertise)
        record = advert.advert()
        if v == neighbours[0]:
            record = dataclasses.replace(record, signature=bytes(64))
        records.append(record)
    roster = Roster(
        round_id=1,
        recipient=device,
        advertised=membership_bitmap(rnd.graph.cohort, rnd.graph.members),
        draws=b"".join(rnd.draws[d] for d in rnd.graph.members),
        adverts=tuple(records),
    )
    with pytest.raises(RemoteProtocolError, match="signature"):
        rnd.clients[device].receive(roster, 1.0)
    assert rnd.clients[device].state is ClientState.ABORTED


# --------------------------------------------------------------------- other round, other stage


def test_aggregator_rejects_other_rounds_and_stages() -> None:
    old = Round(round_id=1)
    new = Round(round_id=2)
    replayed = old.clients["dev-0000"].start(0.0)[0]
    assert isinstance(replayed, Advertise)
    with pytest.raises(RemoteProtocolError, match="round 1; this is round 2"):
        new.server.receive(replayed, 1.0)
    # Rewriting the round id does not help: the signature binds the round.
    with pytest.raises(RemoteProtocolError, match="signature"):
        new.server.receive(dataclasses.replace(replayed, round_id=2), 1.0)
    early = Shares(round_id=2, sender="dev-0001", shares=())
    with pytest.raises(RemoteProtocolError, match="belongs to stage share"):
        new.server.receive(early, 1.0)
    late = Unmask(round_id=2, sender="dev-0001", seed_shares=(), key_shares=())
    with pytest.raises(RemoteProtocolError, match="belongs to stage unmask"):
        new.server.receive(late, 1.0)
    assert new.server.state is ServerState.ADVERTISE
    assert new.server.waiting_for() == frozenset(new.server.cohort)
    # After the deadline the same valid advert is late.
    fresh = new.clients["dev-0000"].start(0.0)[0]
    with pytest.raises(RemoteProtocolError, match="late"):
        new.server.receive(fresh, 10.0)


def test_device_rejects_other_rounds_and_stages_without_changing_state() -> None:
    rnd = Round()
    client = rnd.clients["dev-0000"]
    client.start(0.0)
    wrong_round = Roster(round_id=9, recipient="dev-0000", advertised=b"", draws=b"", adverts=())
    wrong_stage = ShareInbox(round_id=1, recipient="dev-0000", shares=())
    not_mine = Roster(round_id=1, recipient="dev-0001", advertised=b"", draws=b"", adverts=())
    for message, text in (
        (wrong_round, "round 9"),
        (wrong_stage, "not expected in state ADVERTISE"),
        (not_mine, "addressed to"),
    ):
        with pytest.raises(RemoteProtocolError, match=text):
            client.receive(message, 1.0)
        assert client.state is ClientState.ADVERTISE


# --------------------------------------------------------------- fresh masks in every round


def _masked_vectors(run_id: int, seed: bytes, same_randomness: bool) -> dict[str, np.ndarray]:
    captured: dict[str, np.ndarray] = {}

    def uplink(device: str, message: wire.Message) -> list[wire.Message]:
        if isinstance(message, MaskedInput):
            captured[device] = packing.unpack(message.masked, CONFIG.field_bits, CONFIG.coordinates)
        return [message]

    inputs = make_inputs(CONFIG, list(identities(CONFIG.cohort_size)), 123)
    run_round(
        CONFIG,
        round_id=run_id,
        round_seed=seed,
        inputs=inputs,
        uplink=uplink,
        random_for=(lambda d: deterministic_random(f"fixed/{d}")) if same_randomness else None,
    )
    return captured


@pytest.mark.parametrize("same_randomness", [False, True])
def test_same_inputs_in_two_rounds_give_different_masked_vectors(same_randomness: bool) -> None:
    first = _masked_vectors(1, b"\x01" * 32, same_randomness)
    second = _masked_vectors(2, b"\x02" * 32, same_randomness)
    assert first.keys() == second.keys()
    assert len(first) == CONFIG.cohort_size
    for device in first:
        equal = np.mean(first[device] == second[device])
        assert equal < 0.05, (device, equal)


# ------------------------------------------------------------------------- masks from ChaCha20


def test_masking_never_touches_numpy_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = Round()
    rnd.give_inputs()  # quantization dither may use a numpy Generator; masks may not

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("numpy random generator used on the masking path")

    for name in (
        "default_rng",
        "Generator",
        "RandomState",
        "PCG64",
        "PCG64DXSM",
        "MT19937",
        "Philox",
        "SFC64",
        "SeedSequence",
        "random",
        "rand",
        "randn",
        "randint",
        "bytes",
        "seed",
        "random_sample",
        "integers",
    ):
        monkeypatch.setattr(np.random, name, forbidden, raising=False)
    request = rnd.until_unmask_request()
    rnd.finish(request)
    result = rnd.server.result
    assert rnd.server.state is ServerState.DONE
    assert result is not None
    expected = sum(c.astype(np.uint64) for c in rnd.contributions.values())
    assert np.array_equal(result.vector, expected[: CONFIG.dimension] & CONFIG.field_mask)


def test_masked_vector_is_input_plus_chacha20_keystreams() -> None:
    rnd = Round()
    rnd.give_inputs()
    device = "dev-0005"
    client = rnd.clients[device]
    rnd.until_unmask_request()
    secrets = client._round_secrets  # white box: recompute the masks independently
    assert secrets is not None
    masked_message = next(m for m in rnd.sent[device] if isinstance(m, MaskedInput))
    words = CONFIG.coordinates
    nbytes = 4 * words

    def stream(seed: bytes) -> np.ndarray:
        return np.frombuffer(chacha20_keystream(seed, nbytes), dtype="<u4").astype(np.int64)

    total = rnd.contributions[device].astype(np.int64)
    total += stream(
        keys.self_mask_seed(secrets.seed, round_seed=SEED, round_id=1, device_id=device)
    )
    for v, advert in sorted(client._adverts.items()):
        seed = keys.pairwise_mask_seed(
            keys.agree(secrets.mask_private, advert.mask_key),
            round_seed=SEED,
            round_id=1,
            first=device,
            second=v,
        )
        total += stream(seed) if device < v else -stream(seed)
    expected = (total % (1 << CONFIG.field_bits)).astype(np.uint64)
    got = packing.unpack(masked_message.masked, CONFIG.field_bits, words)
    assert np.array_equal(got, expected)


def test_client_modules_do_not_import_numpy_random_for_masks() -> None:
    """Static guard: the masking path's modules never name numpy's random module."""
    import inspect

    from fleetlearn.shared.secagg import graph, prg, server, shamir
    from fleetlearn.shared.secagg import keys as keys_module

    for module in (prg, keys_module, shamir, graph, server):
        assert "np.random" not in inspect.getsource(module), module.__name__
    source = inspect.getsource(SecAggClient)
    assert source.count("np.random") == 1  # the quantization dither, in set_input only
    assert "np.random" in inspect.getsource(SecAggClient.set_input)
