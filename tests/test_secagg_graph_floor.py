"""Issue 13, found 5 and 6: the aggregator cannot choose neighbours, and devices keep a floor.

- Grinding the round seed moves nobody: the ring is seeded by the devices' committed draws.
- A roster built from a graph the aggregator would like (its colluders as a victim's
  neighbours), or with a substituted draw, is refused by the honest device, which forgets its
  round secrets and sends nothing.
- A draw that does not open its announced ticket is refused by the aggregator and by neighbours.
- Colluding devices cannot place themselves: the ring is seeded by every advertiser's draw.
- What is left to the aggregator, choosing U1, gives only another random ring, and no device
  accepts a U1 below its floor.
- The floor on cohort size and survivors is the device's own: a lower announcement does not
  lower it, and a survivor list below it makes the device stop without revealing a share.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from fleetlearn.shared.secagg import keys
from fleetlearn.shared.secagg.client import ClientState, SecAggClient
from fleetlearn.shared.secagg.config import PrivacyFloor, SecAggConfig, StageDeadlines
from fleetlearn.shared.secagg.errors import RemoteProtocolError
from fleetlearn.shared.secagg.graph import NeighbourGraph, membership_bitmap
from fleetlearn.shared.secagg.messages import (
    Advertise,
    KeyAdvert,
    Roster,
    Shares,
    Unmask,
    UnmaskRequest,
)
from fleetlearn.shared.secagg.server import Outbound, SecAggServer, ServerState
from tests.secagg_support import (
    deterministic_random,
    graph_draws,
    identities,
    make_inputs,
    tickets_of,
)

SEED = b"\x0b" * 32


class Cohort:
    """One round's parties, wired by hand so a test can play the aggregator."""

    def __init__(
        self,
        n: int,
        *,
        neighbours: int | None = None,
        min_survivors: int | None = None,
        draws: dict[str, bytes] | None = None,
    ) -> None:
        self.config = SecAggConfig.create(
            cohort_size=n,
            dimension=8,
            neighbours=neighbours,
            min_survivors=min_survivors,
            max_weight=5.0,
        )
        self.ids = identities(n)
        self.verify = {d: bytes(k.verify_key) for d, k in self.ids.items()}
        self.draws = draws if draws is not None else graph_draws(list(self.ids), b"cohort")
        self.tickets = tickets_of(self.draws)
        self.deadlines = StageDeadlines.evenly(0.0, 10.0)

    def server(self, seed: bytes = SEED) -> SecAggServer:
        return SecAggServer(
            config=self.config,
            round_id=1,
            round_seed=seed,
            verify_keys=self.verify,
            tickets=self.tickets,
            deadlines=self.deadlines,
        )

    def client(
        self, device: str, floor: PrivacyFloor | None = None, seed: bytes = SEED
    ) -> SecAggClient:
        return SecAggClient(
            config=self.config,
            round_id=1,
            device_id=device,
            signing_key=self.ids[device],
            verify_keys=self.verify,
            round_seed=seed,
            tickets=self.tickets,
            draw=self.draws[device],
            floor=floor or PrivacyFloor.minimal(),
            random=deterministic_random(f"graph/{device}"),
            deadlines=self.deadlines,
        )

    def adverts(self, seed: bytes = SEED) -> dict[str, KeyAdvert]:
        """Every device's signed advert (what the aggregator holds after ADVERTISE)."""
        out = {}
        for device in self.ids:
            (message,) = self.client(device, seed=seed).start(0.0)
            assert isinstance(message, Advertise)
            out[device] = message.advert()
        return out

    def roster(
        self,
        recipient: str,
        members: list[str],
        adverts: dict[str, KeyAdvert],
        *,
        draws: dict[str, bytes] | None = None,
        neighbours: list[str] | None = None,
    ) -> Roster:
        """A roster as the aggregator builds it for U1 = `members`, with the ring their draws
        give unless `neighbours` says otherwise (a dishonest aggregator)."""
        draws = draws or self.draws
        ordered = sorted(members)
        if neighbours is None:
            graph = NeighbourGraph(
                list(self.ids), self.config.neighbours, {d: self.draws[d] for d in ordered}
            )
            neighbours = list(graph.of(recipient))
        return Roster(
            round_id=1,
            recipient=recipient,
            advertised=membership_bitmap(sorted(self.ids), ordered),
            draws=b"".join(draws[d] for d in ordered),
            adverts=tuple(adverts[v] for v in sorted(neighbours)),
        )


def _rosters(cohort: Cohort, seed: bytes) -> dict[str, frozenset[str]]:
    """Run ADVERTISE honestly with this round seed; each device's neighbours in its roster."""
    server = cohort.server(seed)
    out: list[Outbound] = []
    for device in cohort.ids:
        out += server.receive(cohort.client(device, seed=seed).start(0.0)[0], 1.0)
    assert server.state is ServerState.SHARE
    rosters = {}
    for o in out:
        assert isinstance(o.message, Roster)
        assert o.to is not None
        rosters[o.to[0]] = frozenset(a.device_id for a in o.message.adverts)
    return rosters


# ------------------------------------------------------------------ the round seed is inert


def test_grinding_the_round_seed_moves_nobody() -> None:
    """Found 5 (n=60, k=12, t=7, 10 colluders): every seed gives every device the same
    neighbours, so trying seeds cannot give a victim t colluding ones."""
    cohort = Cohort(60, neighbours=12)
    assert cohort.config.threshold == 7
    colluders = set(sorted(cohort.ids)[-10:])
    first = _rosters(cohort, hashlib.sha256(b"seed-0").digest())
    for i in range(1, 12):
        assert _rosters(cohort, hashlib.sha256(f"seed-{i}".encode()).digest()) == first
    honest = [d for d in cohort.ids if d not in colluders]
    assert max(len(first[d] & colluders) for d in honest) < cohort.config.threshold


# ----------------------------------------------------- the device checks its own neighbours


def test_a_roster_from_a_ground_graph_is_refused() -> None:
    cohort = Cohort(20, neighbours=6)
    adverts = cohort.adverts()
    victim = "dev-0003"
    colluders = [d for d in sorted(cohort.ids) if d != victim][-6:]
    client = cohort.client(victim)
    client.start(0.0)
    wanted = cohort.roster(victim, list(cohort.ids), adverts, neighbours=colluders)
    with pytest.raises(RemoteProtocolError, match="not this device's neighbours") as info:
        client.receive(wanted, 1.0)
    assert info.value.sender == "aggregator"
    assert client.state is ClientState.ABORTED
    assert client.neighbours == frozenset()
    # The honest roster is still refused now: the device stopped for this round.
    with pytest.raises(RemoteProtocolError):
        client.receive(cohort.roster(victim, list(cohort.ids), adverts), 1.0)


def test_a_substituted_draw_is_refused() -> None:
    cohort = Cohort(20, neighbours=6)
    adverts = cohort.adverts()
    victim, honest, colluder = "dev-0003", "dev-0007", "dev-0011"
    # The honest roster is accepted: the checks below are what refuses.
    fine = cohort.client(victim)
    fine.start(0.0)
    assert isinstance(
        fine.receive(cohort.roster(victim, list(cohort.ids), adverts), 1.0)[0], Shares
    )
    for moved in (colluder, honest, victim):
        # A draw that puts `moved` somewhere else on the ring (e.g. next to the victim).
        other = dict(cohort.draws)
        other[moved] = keys.new_draw(deterministic_random(f"moved/{moved}"))
        client = cohort.client(victim)
        client.start(0.0)
        roster = cohort.roster(victim, list(cohort.ids), adverts, draws=other)
        with pytest.raises(RemoteProtocolError, match=f"draw of '{moved}' does not match"):
            client.receive(roster, 1.0)
        assert client.state is ClientState.ABORTED


def test_a_draw_that_does_not_open_its_ticket_is_refused_by_aggregator_and_neighbours() -> None:
    cohort = Cohort(12, neighbours=4)
    server = cohort.server()
    adverts = cohort.adverts()
    victim = "dev-0000"
    neighbour = sorted(NeighbourGraph(list(cohort.ids), 4, cohort.draws).of(victim))[0]
    # The neighbour (colluding) signs an advert with a draw its ticket does not commit to.
    (honest_advert,) = cohort.client(neighbour).start(0.0)
    assert isinstance(honest_advert, Advertise)
    other_draw = keys.new_draw(deterministic_random("other"))
    transcript = keys.advert_transcript(
        round_id=1,
        round_seed=SEED,
        device_id=neighbour,
        share_key=honest_advert.share_key,
        mask_key=honest_advert.mask_key,
        seed_commitment=honest_advert.seed_commitment,
        draw=other_draw,
    )
    forged = dataclasses.replace(
        honest_advert,
        draw=other_draw,
        signature=keys.sign(cohort.ids[neighbour], transcript),
    )
    with pytest.raises(RemoteProtocolError, match="does not match the device's announced ticket"):
        server.receive(forged, 1.0)
    assert neighbour in server.waiting_for()
    # Forwarded anyway, by an aggregator that lists the true draw in the roster: refused.
    adverts[neighbour] = forged.advert()
    client = cohort.client(victim)
    client.start(0.0)
    with pytest.raises(RemoteProtocolError, match=f"advert of neighbour '{neighbour}' carries"):
        client.receive(cohort.roster(victim, list(cohort.ids), adverts), 1.0)
    assert client.state is ClientState.ABORTED


# ------------------------------------------- colluders cannot place themselves; U1 is bounded


def test_colluders_grinding_their_draws_gain_nothing() -> None:
    """If each device placed itself on the ring by its own draw, 7 colluders (t = 7, k = 12)
    could grind draws into a tight cluster of 6 with one more close by and expose the honest
    device next to the cluster in 90 of 100 rounds, with no help from the aggregator. The ring
    seed covers every advertiser's draw, so whatever draws they commit to, where they land is
    as random as anyone's: over 300 rounds with fresh honest draws nobody is exposed (the
    chance per round is 1.2e-4, bench/graph_grinding_bench.py)."""
    n, k = 60, 12
    ids = sorted(identities(n))
    colluders = set(ids[-7:])
    # Any fixed choice of theirs, e.g. draws that share a long prefix.
    fixed = {d: bytes(15) + bytes([i]) for i, d in enumerate(sorted(colluders))}
    places: set[tuple[int, ...]] = set()
    for trial in range(300):
        draws = {**graph_draws(ids, f"round-{trial}".encode()), **fixed}
        graph = NeighbourGraph(ids, k, draws)
        for d in ids:
            if d not in colluders:
                assert len(set(graph.of(d)) & colluders) < 7, (trial, d)
        places.add(tuple(i for i, d in enumerate(graph.ring) if d in colluders))
    assert len(places) == 300  # the colluders' places on the ring move with the honest draws


def test_exposure_rate_matches_the_bench_formula() -> None:
    """The hypergeometric rate docs/secagg.md quotes, against real rings (n=60, k=12, t=7,
    12 colluders: 5.6% of random rings expose some honest device)."""
    bench = _load_bench()
    n, k, t, c = 60, 12, 7, 12
    ids = sorted(identities(n))
    colluders = set(ids[:c])
    rings = 1500
    hits = 0
    for trial in range(rings):
        graph = NeighbourGraph(ids, k, graph_draws(ids, f"rate-{trial}".encode()))
        hits += any(len(set(graph.of(d)) & colluders) >= t for d in ids if d not in colluders)
    expected = bench.any_exposed(n, k, t, c)
    assert 0.04 < expected < 0.07
    # 1500 rings: the standard deviation of the count is about 9.
    assert abs(hits - rings * expected) < 30, (hits, rings * expected)


def _load_bench():  # type: ignore[no-untyped-def]
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "graph_grinding_bench.py"
    spec = importlib.util.spec_from_file_location("graph_grinding_bench", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_u1_below_the_device_floor_is_refused_and_any_other_u1_reshuffles_the_ring() -> None:
    """Choosing U1 is what the aggregator has left: each choice is another random ring (so it
    cannot pull chosen devices next to a victim), and no device accepts one below its floor."""
    n = 60
    cohort = Cohort(n, neighbours=12)
    ids = sorted(cohort.ids)
    full = NeighbourGraph(ids, 12, cohort.draws)
    less = NeighbourGraph(ids, 12, {d: v for d, v in cohort.draws.items() if d != ids[7]})
    moved = [d for d in ids if d != ids[7] and set(less.of(d)) != set(full.of(d)) - {ids[7]}]
    assert len(moved) > n // 2
    adverts = cohort.adverts()
    victim = ids[0]
    allowed = ids[: PrivacyFloor().advertisers_needed(cohort.config)]
    assert len(allowed) == 48
    for members, accepted in ((allowed, True), (allowed[:-1], False)):
        client = cohort.client(victim, PrivacyFloor())
        client.start(0.0)
        roster = cohort.roster(victim, members, adverts)
        if accepted:
            assert isinstance(client.receive(roster, 1.0)[0], Shares)
        else:
            with pytest.raises(RemoteProtocolError, match=r"only 47 of 60 devices advertised"):
                client.receive(roster, 1.0)
            assert client.state is ClientState.ABORTED


# -------------------------------------------------------------------- the device's floor


def test_a_cohort_below_the_device_floor_is_refused_before_anything_is_revealed() -> None:
    cohort = Cohort(8, neighbours=4)
    client = cohort.client("dev-0001", PrivacyFloor(min_cohort=10))
    with pytest.raises(RemoteProtocolError, match="below this device's floor of 10"):
        client.start(0.0)
    assert client.state is ClientState.ABORTED
    # A floor on survivors above the cohort size refuses it the same way.
    client = cohort.client("dev-0001", PrivacyFloor(min_survivors=9))
    with pytest.raises(RemoteProtocolError, match="below this device's floor of 9"):
        client.start(0.0)


def test_a_stale_ticket_is_refused_before_anything_is_revealed() -> None:
    cohort = Cohort(8, neighbours=4)
    client = SecAggClient(
        config=cohort.config,
        round_id=1,
        device_id="dev-0001",
        signing_key=cohort.ids["dev-0001"],
        verify_keys=cohort.verify,
        round_seed=SEED,
        tickets=cohort.tickets,
        draw=keys.new_draw(deterministic_random("rotated")),  # the device moved on
        floor=PrivacyFloor(),
        random=deterministic_random("stale"),
    )
    with pytest.raises(RemoteProtocolError, match="not its current one"):
        client.start(0.0)
    assert client.state is ClientState.ABORTED


def test_too_few_advertisers_for_the_device_floor_is_refused() -> None:
    """The announcement allows 2 survivors; this device wants 7 advertisers."""
    cohort = Cohort(8, neighbours=4, min_survivors=2)
    adverts = cohort.adverts()
    members = sorted(cohort.ids)[:6]
    victim = members[0]
    roster = cohort.roster(victim, members, adverts)
    lenient = cohort.client(victim, PrivacyFloor(min_survivors=2, min_advertised_fraction=0.0))
    lenient.start(0.0)
    assert isinstance(lenient.receive(roster, 1.0)[0], Shares)
    strict = cohort.client(victim, PrivacyFloor(min_survivors=7, min_advertised_fraction=0.0))
    strict.start(0.0)
    with pytest.raises(RemoteProtocolError, match=r"only 6 of 8 devices advertised.*at least 7"):
        strict.receive(roster, 1.0)
    assert strict.state is ClientState.ABORTED


def _until_unmask(cohort: Cohort, floors: dict[str, PrivacyFloor]) -> dict[str, SecAggClient]:
    """An honest round up to (not including) the unmask request; every client is returned."""
    server = cohort.server()
    clients = {d: cohort.client(d, floors.get(d)) for d in cohort.ids}
    inputs = make_inputs(cohort.config, list(cohort.ids), 3)
    for d, client in clients.items():
        client.set_input(inputs[d].vector, weight=inputs[d].weight, metrics=inputs[d].metrics)
    pending: list[Outbound] = []
    for client in clients.values():
        pending += server.receive(client.start(0.0)[0], 1.0)
    while pending:
        following: list[Outbound] = []
        for out in pending:
            if isinstance(out.message, UnmaskRequest):
                return clients
            assert out.to is not None
            for device in out.to:
                for reply in clients[device].receive(out.message, 1.0):
                    following += server.receive(reply, 1.0)
        pending = following
    raise AssertionError(f"no unmask request: {server.state} {server.reason}")


def test_a_survivor_list_below_the_device_floor_reveals_nothing() -> None:
    """The announcement allows 2 survivors; the aggregator claims only 5 of 8 survived. A
    device whose floor is 6 stops and forgets; one that trusts the announcement answers."""
    cohort = Cohort(8, neighbours=4, min_survivors=2)
    # The lenient device and its 4 neighbours (the victim among them) are the 5 "survivors".
    lenient_device = "dev-0001"
    graph = NeighbourGraph(list(cohort.ids), 4, cohort.draws)
    survivors = tuple(sorted({lenient_device, *graph.of(lenient_device)}))
    dropped = tuple(sorted(set(cohort.ids) - set(survivors)))
    victim = graph.of(lenient_device)[0]
    floors = {
        victim: PrivacyFloor(min_survivors=6, min_advertised_fraction=0.0),
        lenient_device: PrivacyFloor.minimal(),
    }
    clients = _until_unmask(cohort, floors)
    request = UnmaskRequest(round_id=1, survivors=survivors, dropped=dropped)
    with pytest.raises(RemoteProtocolError, match="only 5 survivors; at least 6"):
        clients[victim].receive(request, 2.0)
    assert clients[victim].state is ClientState.ABORTED
    (answer,) = clients[lenient_device].receive(request, 2.0)
    assert isinstance(answer, Unmask)
    # Naming devices that never advertised does not make up the numbers either.
    clients = _until_unmask(cohort, floors)
    padded = UnmaskRequest(round_id=1, survivors=(*survivors, "ghost-1"), dropped=dropped)
    with pytest.raises(RemoteProtocolError, match="who did not advertise"):
        clients[victim].receive(padded, 2.0)
    assert clients[victim].state is ClientState.ABORTED


def test_floor_settings_are_validated() -> None:
    from fleetlearn.shared.secagg.errors import SecAggConfigError

    for kwargs, key in (
        ({"min_cohort": 2}, "floor.min_cohort"),
        ({"min_survivors": 1}, "floor.min_survivors"),
        ({"min_advertised_fraction": 1.5}, "floor.min_advertised_fraction"),
        ({"min_advertised_fraction": float("nan")}, "floor.min_advertised_fraction"),
    ):
        with pytest.raises(SecAggConfigError) as info:
            PrivacyFloor(**kwargs)  # type: ignore[arg-type]
        assert info.value.key == key
    config = SecAggConfig.create(cohort_size=60, dimension=4, min_survivors=5)
    assert PrivacyFloor().advertisers_needed(config) == 48
    assert PrivacyFloor(min_survivors=50).advertisers_needed(config) == 50
    assert PrivacyFloor().survivors_needed(config) == 5


def test_the_device_command_and_the_scenario_set_the_floor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleetlearn import cli as fleetlearn
    from fleetlearn.firmware_sim.scenario import Scenario
    from fleetlearn.shared.errors import ConfigError

    argv = ["device", "--broker", "mqtt://127.0.0.1:1", "--keys", str(tmp_path)]
    argv += ["--data", str(tmp_path / "x.npz"), "--min-advertised-fraction", "1.5"]
    assert fleetlearn.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--min-advertised-fraction" in err[0]
    floor = Scenario.parse("[privacy]\nmin_cohort = 20\nmin_survivors = 10\n").floor
    assert floor == PrivacyFloor(min_cohort=20, min_survivors=10, min_advertised_fraction=0.8)
    assert Scenario.parse("").floor == PrivacyFloor()
    with pytest.raises(ConfigError) as info:
        Scenario.parse("[privacy]\nmin_advertised_fraction = 2\n")
    assert info.value.key == "privacy.min_advertised_fraction"


def test_a_status_from_before_tickets_still_decodes_and_a_bad_ticket_does_not() -> None:
    import msgpack
    import zstandard

    from fleetlearn.shared import wire

    def payload(fields: dict[str, object]) -> bytes:
        body = {"v": 1, "t": "status", "device_id": "dev-0001", "online": True, **fields}
        return zstandard.ZstdCompressor(write_content_size=True).compress(
            msgpack.packb(body, use_bin_type=True)
        )

    assert wire.decode(payload({"model_version": 3}), wire.DeviceStatus).ticket == b""
    assert wire.decode(payload({"ticket": b"\x01" * 16}), wire.DeviceStatus).ticket == b"\x01" * 16
    with pytest.raises(wire.WireError, match="ticket"):
        wire.decode(payload({"ticket": b"\x01" * 5}), wire.DeviceStatus)
