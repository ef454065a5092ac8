"""What the aggregator service holds for asynchronous rounds between two rounds: at most one
update per invited device, no larger than an honest one (one device cannot fill memory)."""

from __future__ import annotations

from pathlib import Path

from fleetlearn.shared import topics
from fleetlearn.transport import Incoming
from tests.fleet_harness import memory_fleet


async def test_only_one_honest_sized_update_per_invited_device_waits(tmp_path: Path) -> None:
    async with memory_fleet(tmp_path, 4) as h:
        service = h.aggregator(**{"rounds.mode": "async", "rounds.min_cohort": "1"})
        invited, other = h.devices[0], h.devices[1]
        service.engine.training = lambda: [invited]  # type: ignore[method-assign]
        service._update_limit = 1000

        def update(device: str, size: int) -> Incoming:
            topic = topics.per_device(h.fleet, 1, topics.Kind.UPDATE, device)
            return Incoming(topic, b"x" * size, False)

        assert not service._park(update(invited, 1001))  # larger than an honest update
        assert not service._park(update(other, 10))  # no open invitation
        assert service._park(update(invited, 10))
        assert not service._park(update(invited, 10))  # one per device
        assert list(service._parked) == [invited]
        secure = h.aggregator(**{"rounds.mode": "async-secure", "rounds.min_cohort": "3"})
        secure.engine.training = lambda: [invited]  # type: ignore[method-assign]
        secure._update_limit = 1000
        assert not secure._park(update(invited, 10))  # secure rounds take no updates
        service.store.close()
        secure.store.close()
