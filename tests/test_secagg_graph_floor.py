"""Issue 13, found 5 and 6: the aggregator cannot choose neighbours, and devices keep a floor.

- Grinding the round seed moves nobody: the ring is placed by the devices' committed draws.
- A roster built from a graph the aggregator would like (its colluders as a victim's
  neighbours), or with a substituted draw, is refused by the honest device, which forgets its
  round secrets and sends nothing.
- A draw that does not open its announced ticket is refused by the aggregator and by neighbours.
- What is left to the aggregator, leaving honest advertisers out of U1, is bounded by the
  device's floor: the same attack is refused at the default floor and accepted without it.
- The floor on cohort size and survivors is the device's own: a lower announcement does not
  lower it, and a survivor list below it makes the device stop without revealing a share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random as pyrandom
from pathlib import Path

import pytest

from shared.secagg import keys
from shared.secagg.client import ClientState, SecAggClient
from shared.secagg.config import PrivacyFloor, SecAggConfig, StageDeadlines
from shared.secagg.errors import RemoteProtocolError
from shared.secagg.graph import NeighbourGraph, fewest_exclusions, membership_bitmap
from shared.secagg.messages import Advertise, KeyAdvert, Roster, Shares, Unmask, UnmaskRequest
from shared.secagg.server import Outbound, SecAggServer, ServerState
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


# ------------------------------------------------------- leaving honest advertisers out


def _clustered_draws(devices: list[str], colluders: list[str]) -> dict[str, bytes]:
    """Honest draws at random; colluders grind theirs (before the round) into two tight
    clusters on opposite sides of the ring: the placement that needs the fewest exclusions
    among those bench/graph_exclusion_bench.py tries for 7-8 colluders."""
    draws = graph_draws([d for d in devices if d not in colluders], b"clusters")
    for i, device in enumerate(colluders):
        target = (i % 2) * 2**63
        for counter in itertools.count():
            draw = hashlib.sha256(f"{device}/{counter}".encode()).digest()[: keys.DRAW_BYTES]
            if (keys.ring_position(device, draw) - target) % 2**64 < 2**64 // 4000:
                draws[device] = draw
                break
    return draws


def _exclusion_plan(ring: list[str], colluders: set[str], victim: str, k: int, t: int) -> list[str]:
    """The honest advertisers to leave out (even k): for the cheapest split of t colluders
    between the two sides, the honest devices nearest the victim that keep them out."""
    m, v, half = len(ring), ring.index(victim), k // 2
    best: list[str] | None = None
    for a in range(max(0, t - half), half + 1):
        plan: list[str] = []
        for step, count in ((-1, a), (1, t - a)):
            honest_seen: list[str] = []
            found = 0
            for distance in range(1, m):
                device = ring[(v + step * distance) % m]
                if device in colluders:
                    found += 1
                    if found == count:
                        break
                else:
                    honest_seen.append(device)
            keep = half - count
            plan += honest_seen[keep:] if count else []
        if best is None or len(plan) < len(best):
            best = plan
    assert best is not None
    return best


def test_leaving_out_honest_advertisers_is_bounded_by_the_floor() -> None:
    n, k = 60, 12
    ids = sorted(identities(n))
    colluders = ids[-8:]
    cohort = Cohort(n, neighbours=k, draws=_clustered_draws(ids, colluders))
    t = cohort.config.threshold
    full = NeighbourGraph(ids, k, cohort.draws)
    ring = sorted(ids, key=lambda d: keys.ring_position(d, cohort.draws[d]))
    flags = [d in colluders for d in ring]
    # The aggregator's best victim and the fewest honest advertisers it must leave out.
    costs = {d: fewest_exclusions(flags, i, k, t) for i, d in enumerate(ring) if d not in colluders}
    victim = min(costs, key=lambda d: costs[d] or 10**9)
    cost = costs[victim]
    assert cost is not None
    assert len(set(full.of(victim)) & set(colluders)) < t  # nobody is exposed as it stands
    plan = _exclusion_plan(ring, set(colluders), victim, k, t)
    assert len(plan) == cost
    # The default floor (80% of the cohort must be in U1) leaves room for 12 exclusions.
    budget = n - PrivacyFloor().advertisers_needed(cohort.config)
    assert budget == 12 < cost <= n // 2
    members = [d for d in ids if d not in plan]
    shrunk = NeighbourGraph(ids, k, {d: cohort.draws[d] for d in members})
    assert len(set(shrunk.of(victim)) & set(colluders)) >= t  # the attack is real
    adverts = cohort.adverts()
    roster = cohort.roster(victim, members, adverts)
    guarded = cohort.client(victim, PrivacyFloor())
    guarded.start(0.0)
    with pytest.raises(RemoteProtocolError, match=r"only \d+ of 60 devices advertised"):
        guarded.receive(roster, 1.0)
    assert guarded.state is ClientState.ABORTED
    # Without the fraction it would have dealt its shares to t colluders.
    bare = cohort.client(victim, PrivacyFloor(min_advertised_fraction=0.5))
    bare.start(0.0)
    (shares,) = bare.receive(roster, 1.0)
    assert isinstance(shares, Shares)
    assert len({s.recipient for s in shares.shares} & set(colluders)) >= t


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
    from shared.secagg.errors import SecAggConfigError

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
    import fleetlearn
    from firmware_sim.scenario import Scenario
    from shared.errors import ConfigError

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


def test_fewest_exclusions_matches_a_brute_force_search() -> None:
    """The count docs/secagg.md quotes: exact for even k, a lower bound for odd k, checked
    against trying every set of honest devices to leave out on small rings."""
    rng = pyrandom.Random(3)
    checked = 0
    for _ in range(120):
        m = rng.randint(6, 11)
        k = rng.randint(2, m - 1)
        t = rng.randint(k // 2 + 1, k)
        colluding = [rng.random() < 0.45 for _ in range(m)]
        honest = [i for i in range(m) if not colluding[i]]
        if not honest:
            continue
        victim = rng.choice(honest)
        ids = [f"d{i:02d}" for i in range(m)]
        brute = None
        others = [i for i in honest if i != victim]
        for size in range(len(others) + 1):
            for left_out in itertools.combinations(others, size):
                kept = [i for i in range(m) if i not in left_out]
                graph = NeighbourGraph(
                    ids,
                    k,
                    {ids[i]: bytes(16) for i in kept},
                    positions={ids[i]: i for i in kept},
                )
                exposed = sum(colluding[int(d[1:])] for d in graph.of(ids[victim]))
                if exposed >= t:
                    brute = size
                    break
            if brute is not None:
                break
        solved = fewest_exclusions(colluding, victim, k, t)
        if k % 2 == 0:
            assert solved == brute, (colluding, victim, k, t)
        elif brute is not None:
            assert solved is not None
            assert solved <= brute
        checked += brute is not None
    assert checked > 30
