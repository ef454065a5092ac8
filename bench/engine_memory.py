"""Round engine memory over many rounds: does the aggregator's resident memory stay flat?

    python bench/engine_memory.py                                  # plain and secure, 500 each
    python bench/engine_memory.py --modes plain --rounds 500 --dim 100000 --devices 10
    python bench/engine_memory.py --modes plain --keep-outcomes    # what keeping them costs

Runs `--rounds` rounds per mode through one `RoundEngine` in this process, in memory: the
devices are simulated right here (plain: a `PlainUpdate` from `compression.compress` of a random
update; secure: a `SecAggClient` per device and round, with graph tickets rotated after each
advert, as the device participant does), every payload through the real wire encoding and the
engine's decoder, each message taken with `defer_close` and a completed stage closed with
`tick()`, as `aggregator.service` does. After each round the bench does with the outcome what
the service does: takes it (`take_outcome`), uses the mean update once, keeps its metrics in a
`deque(maxlen=1000)` and drains the engine's events into a `deque(maxlen=2000)`.

It prints the process's resident set size (VmRSS: the aggregator and the simulated devices;
the devices are rebuilt each round) before the first round, after it (the start line: caches
and allocator arenas are warm then), every 100 rounds, and the growth from the start line;
it exits non-zero if that growth reaches `--limit-mb` (50). RSS moves by some MB from round
to round as the allocator reuses freed 800 kB vectors; a leak shows as steady growth.
`--keep-outcomes` also keeps every outcome (with its full-size mean update) in a list, the
leak this bench is there to catch: the growth then is about rounds x dim x 8 bytes.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import nacl.signing
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleetlearn.aggregator.engine import EngineConfig, Publish, RoundEngine
from fleetlearn.shared import compression, rounds, topics, wire
from fleetlearn.shared.protocol import UPLINK, downlink
from fleetlearn.shared.rounds import RoundAnnounce, RoundState
from fleetlearn.shared.secagg import keys
from fleetlearn.shared.secagg.client import SecAggClient
from fleetlearn.shared.secagg.config import PrivacyFloor
from fleetlearn.shared.secagg.contribution import TrainingMetrics

FLEET = "bench"
MB = 1024 * 1024


def rss_bytes() -> int:
    """Resident set size now (not the peak), from /proc."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Fleet:
    """One engine and `n` simulated devices that answer at once, on a simulated clock."""

    def __init__(self, mode: str, n: int, dim: int, sparsity: str) -> None:
        self.mode = mode
        self.dim = dim
        self.ids = [f"dev-{i:04d}" for i in range(n)]
        self.identities = {d: nacl.signing.SigningKey.generate() for d in self.ids}
        self.verify_keys = {d: bytes(k.verify_key) for d, k in self.identities.items()}
        config = EngineConfig(
            mode=mode,  # type: ignore[arg-type]
            cohort=n,
            over_select=1.0,
            sparsity=sparsity,  # type: ignore[arg-type]
            adapt=False,
        )
        self.engine = RoundEngine(
            fleet=FLEET, config=config, verify_keys=self.verify_keys, random=os.urandom
        )
        self.draws = {d: keys.new_draw(os.urandom) for d in self.ids}
        self.rng = np.random.default_rng(0)
        self.now = 0.0
        self.clients: dict[str, SecAggClient] = {}
        for d in self.ids:
            self.status(d)

    def status(self, device: str) -> None:
        status = wire.DeviceStatus(
            device_id=device,
            online=True,
            model_version=1,
            ticket=keys.ticket_of(device, self.draws[device]) if self.mode == "secure" else b"",
        )
        self.engine.observe_status(device, wire.encode(status), self.now)

    # ---------------------------------------------------------------------------- routing

    def send(self, device: str, message: wire.Message) -> list[Publish]:
        kind = next(k for k, r in UPLINK.items() if r.message is type(message))
        round_id = message.round_id  # type: ignore[attr-defined]
        topic = topics.parse(topics.per_device(FLEET, round_id, kind, device))
        pubs = self.engine.receive(topic, wire.encode(message), self.now, defer_close=True)
        if self.engine.close_due:
            pubs += self.engine.tick(self.now)
        return pubs

    def deliver(self, pubs: list[Publish]) -> None:
        queue = collections.deque(pubs)
        while queue:
            pub = queue.popleft()
            assert isinstance(pub.payload, bytes)
            t = topics.parse(pub.topic)
            if t.kind is topics.Kind.ROUND:
                queue.extend(self.on_announce(pub.payload))
            elif t.kind in (topics.Kind.INBOX, topics.Kind.SURVIVORS):
                message = wire.decode(pub.payload, downlink(t.kind))
                targets = [t.device_id] if t.device_id else list(self.clients)
                for dev in targets:
                    client = self.clients.get(dev or "")
                    if client is None:
                        continue
                    for reply in client.receive(message, self.now):
                        queue.extend(self.send(dev or "", reply))

    def on_announce(self, payload: bytes) -> list[Publish]:
        ann = wire.decode(payload, RoundAnnounce)
        if ann.state is not RoundState.OPEN:
            self.clients = {}
            return []
        out: list[Publish] = []
        k = ann.compression.k(self.dim)
        for dev in ann.cohort:
            update = self.rng.normal(0.0, 0.01, self.dim).astype(np.float32)
            if ann.mode is rounds.RoundMode.PLAIN:
                compressed = compression.compress(
                    update, ann.compression, rng=self.rng, seed=ann.seed
                )
                message = rounds.PlainUpdate(
                    round_id=ann.round_id,
                    sender=dev,
                    update=compressed.message,
                    weight=100.0,
                    loss=0.5,
                    correct=30,
                    samples=40,
                )
                out += self.send(dev, message)
                continue
            assert ann.secagg is not None
            client = SecAggClient(
                config=ann.secagg,
                round_id=ann.round_id,
                device_id=dev,
                signing_key=self.identities[dev],
                verify_keys=self.verify_keys,
                round_seed=ann.seed,
                tickets=ann.ticket_map(),
                draw=self.draws[dev],
                floor=PrivacyFloor.minimal(),
                random=os.urandom,
                deadlines=None,
            )
            values = (
                update[compression.shared_coordinates(ann.seed, self.dim, k)]
                if ann.compression.mode is compression.SparseMode.RAND_K
                else update
            )
            client.set_input(
                values.astype(np.float64),
                weight=100.0,
                metrics=TrainingMetrics(loss=0.5, correct=30, samples=40),
            )
            self.clients[dev] = client
            advert = client.start(self.now)
            self.draws[dev] = keys.new_draw(os.urandom)  # the advert revealed it
            self.status(dev)
            for message in advert:
                out += self.send(dev, message)
        return out

    def run_round(self, round_id: int) -> Any:
        self.deliver(
            self.engine.start_round(round_id=round_id, model_version=1, dim=self.dim, now=self.now)
        )
        while self.engine.running:  # every device answered: only a deadline could be left
            deadline = self.engine.next_deadline
            assert deadline is not None
            self.now = max(self.now + 0.01, deadline)
            self.deliver(self.engine.tick(self.now))
        self.now += 1.0
        return self.engine.take_outcome()


def run(mode: str, args: argparse.Namespace) -> float:
    fleet = Fleet(mode, args.devices, args.dim, args.sparsity)
    summaries: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
    recent_events: collections.deque[dict[str, Any]] = collections.deque(maxlen=2000)
    kept: list[Any] = []
    norm = 0.0
    before = rss_bytes()
    print(f"{mode:6s} before round 1: RSS {before / MB:7.1f} MB", flush=True)
    start_rss = 0
    began = lap = time.perf_counter()
    lap_round = 0
    for r in range(1, args.rounds + 1):
        outcome = fleet.run_round(r)
        assert outcome is not None
        assert outcome.round_id == r
        if outcome.state is not RoundState.CLOSED:
            raise SystemExit(f"{mode} round {r} did not close: {outcome.reason}")
        norm += float(np.linalg.norm(outcome.mean_update))  # the service's optimizer step
        summaries.append(dict(outcome.metrics))
        recent_events.extend(fleet.engine.drain_events())
        if args.keep_outcomes:
            kept.append(outcome)
        if r == 1:
            start_rss = rss_bytes()
            print(f"{mode:6s} round {r:4d}: RSS {start_rss / MB:7.1f} MB (start line)", flush=True)
            lap, lap_round = time.perf_counter(), r
        elif r % 100 == 0 or r == args.rounds:
            now_rss, now = rss_bytes(), time.perf_counter()
            print(
                f"{mode:6s} round {r:4d}: RSS {now_rss / MB:7.1f} MB"
                f"  growth {(now_rss - start_rss) / MB:+6.1f} MB"
                f"  ({(now - lap) / (r - lap_round) * 1000:.0f} ms/round since the last line)",
                flush=True,
            )
            lap, lap_round = now, r
    end = rss_bytes()
    growth = (end - start_rss) / MB
    print(
        f"{mode:6s} {args.rounds} rounds, d={args.dim}, {args.devices} devices, "
        f"{args.sparsity}: growth {growth:+.1f} MB from round 1, "
        f"{(end - before) / MB:+.1f} MB from before it, "
        f"{(time.perf_counter() - began) / args.rounds * 1000:.0f} ms/round "
        f"(mean update norm {norm / args.rounds:.3g})"
    )
    return growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="plain,secure")
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--dim", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--sparsity", choices=("rand_k", "dense"), default="rand_k")
    parser.add_argument("--keep-outcomes", action="store_true")
    parser.add_argument("--limit-mb", type=float, default=50.0)
    args = parser.parse_args()
    print(f"python bench/engine_memory.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores")
    failed = []
    for mode in args.modes.split(","):
        growth = run(mode, args)
        if growth >= args.limit_mb:
            failed.append(f"{mode}: {growth:+.1f} MB")
    if failed:
        raise SystemExit(f"RSS grew by {args.limit_mb} MB or more: {', '.join(failed)}")


if __name__ == "__main__":
    main()
