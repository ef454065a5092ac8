"""Scenarios for intermittent fleets: heavy-tailed compute speeds, flaky links and shifts.

The draws are checked against the distributions the docs name (firmware_sim/scenario.py,
docs/simulation.md), and the in-memory fleet is checked to honour them in synchronous and
asynchronous rounds: time moves with the slow devices, lost messages never arrive, and
devices off shift are neither selected nor heard from until their shift begins again.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from fleetlearn.aggregator.engine import EngineConfig
from fleetlearn.firmware_sim.inmemory import InMemoryFleet
from fleetlearn.firmware_sim.scenario import Scenario
from fleetlearn.shared.errors import ConfigError
from fleetlearn.shared.rounds import StageTimes, TrainingPlan

N = 4000


def test_lognormal_speeds_have_median_one_and_the_named_spread() -> None:
    s = Scenario.parse('[compute]\ntrain_seconds = 10.0\nspeed = "lognormal"\nspeed_sigma = 1.0\n')
    factors = np.array([s.speed_factor(i) for i in range(N)])
    logs = np.log(factors)
    assert abs(statistics.median(factors) - 1.0) < 0.08
    assert abs(float(np.std(logs)) - 1.0) < 0.05
    # The slowest tenth needs e^1.2816 = 3.6 times the median or more.
    assert abs(float(np.quantile(factors, 0.9)) - math.exp(1.2816)) < 0.35
    assert s.compute_seconds(7) == pytest.approx(10.0 * s.speed_factor(7))
    assert s.speed_factor(7) == s.speed_factor(7)  # fixed per device


def test_pareto_speeds_have_a_heavy_tail() -> None:
    s = Scenario.parse('[compute]\ntrain_seconds = 1.0\nspeed = "pareto"\nspeed_sigma = 1.5\n')
    factors = np.array([s.speed_factor(i) for i in range(N)])
    assert abs(statistics.median(factors) - 1.0) < 0.08
    scale = 2 ** (-1 / 1.5)
    assert factors.min() >= scale * 0.999
    # P(T > t) = (t / scale)^-alpha: about 1.6% of devices need 10x the median or more.
    tail = float(np.mean(factors > 10.0))
    assert abs(tail - (10.0 / scale) ** -1.5) < 0.006


def test_fixed_speed_and_slow_devices_add_up() -> None:
    s = Scenario.parse("[compute]\ntrain_seconds = 4.0\nslow_fraction = 0.5\nslow_delay = 6.0\n")
    times = {s.compute_seconds(i) for i in range(200)}
    assert times == {4.0, 10.0}


def test_flaky_links_lose_the_configured_share() -> None:
    s = Scenario.parse("[network]\nloss = 0.1\n")
    lost = sum(s.link_loses(i % 50, i) for i in range(N))
    assert abs(lost / N - 0.1) < 0.015
    assert not any(Scenario().link_loses(1, i) for i in range(100))


def test_shifts_keep_each_device_online_for_its_share_of_the_day() -> None:
    s = Scenario.parse("[shifts]\nday = 100.0\nonline = 0.3\n")
    for index in range(20):
        online = [s.online_at(index, t / 10) for t in range(1000)]  # one day, 0.1 s steps
        assert abs(sum(online) / len(online) - 0.3) < 0.02
        t = 37.0
        back = s.next_online(index, t)
        assert s.online_at(index, back)
        assert back >= t
        if s.online_at(index, t):
            assert back == t
            off = s.next_offline(index, t)
            assert off is not None
            assert not s.online_at(index, off + 1e-6)
    assert Scenario().online_at(3, 12345.0)
    assert Scenario().next_offline(3, 0.0) is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[compute]\nspeed = "weibull"\n', "compute.speed"),
        ("[compute]\nspeed_sigma = 0.0\n", "compute.speed_sigma"),
        ("[compute]\ntrain_seconds = -1.0\n", "compute.train_seconds"),
        ("[network]\nloss = 1.0\n", "network.loss"),
        ("[shifts]\nonline = 0.0\n", "shifts.online"),
        ("[shifts]\nnight = 1\n", "shifts.night"),
    ],
)
def test_bad_intermittency_keys_name_themselves(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Scenario.parse(text)
    assert info.value.key == key


def _config(mode: str, **extra: object) -> EngineConfig:
    return EngineConfig(
        **{
            "mode": mode,
            "sparsity": "dense",
            "cohort": 8,
            "min_cohort": 3,
            "buffer": 4,
            "concurrency": 8,
            "training": TrainingPlan(steps=5, max_samples=128, error_feedback=False),
            **extra,
        }  # type: ignore[arg-type]
    )


def test_a_synchronous_round_waits_for_slow_devices_in_simulated_time() -> None:
    calm = InMemoryFleet(8, _config("plain"), Scenario(), seed=1)
    slow = InMemoryFleet(
        8,
        _config("plain", times=StageTimes(collect=30.0, collect_hard=60.0), adapt=False),
        Scenario.parse("[compute]\ntrain_seconds = 20.0\n"),
        seed=1,
    )
    assert calm.run_round()["duration_s"] < 1.0
    metrics = slow.run_round()
    assert metrics["state"] == "closed"
    assert metrics["duration_s"] == pytest.approx(20.0, abs=0.1)  # everyone answered at 20 s


def test_shifts_and_flaky_links_in_asynchronous_rounds() -> None:
    scenario = Scenario.parse(
        "[compute]\ntrain_seconds = 5.0\n[network]\nloss = 0.2\n"
        "[shifts]\nday = 60.0\nonline = 0.5\n"
    )
    fleet = InMemoryFleet(24, _config("async", concurrency=10), scenario, seed=2)
    invited_offline = []
    start = fleet.engine.start_round

    def check(**kwargs: object) -> object:
        pubs = start(**kwargs)  # type: ignore[arg-type]
        announce = fleet.engine.announce
        assert announce is not None
        for device, round_id in zip(announce.invited, announce.invited_in, strict=True):
            d = fleet.devices[device]
            if round_id == announce.round_id and not scenario.online_at(d.index, fleet.now):
                invited_offline.append(device)
        return pubs

    fleet.engine.start_round = check  # type: ignore[method-assign]
    history = fleet.run_async(5, max_seconds=2000)
    assert [m["state"] for m in history].count("closed") == 5
    assert not invited_offline  # an offline device is never invited
    assert fleet.lost > 0
    assert fleet.now > 30.0  # shifts came and went
