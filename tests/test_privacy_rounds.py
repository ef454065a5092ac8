"""Differential privacy in rounds (issue 17): the engine's mechanisms, its accounting against
a direct dp-accounting computation, Poisson cohorts, the budget, the store's ledger, and the
budget over a real mosquitto across an aggregator restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from fleetlearn.aggregator import privacy
from fleetlearn.aggregator.engine import (
    BudgetSpentError,
    EngineConfig,
    EngineError,
    NotEnoughDevicesError,
    Phase,
)
from fleetlearn.aggregator.modes import RoundSetup, SecureMode, least_survivors
from fleetlearn.aggregator.privacy import RoundCharge
from fleetlearn.aggregator.store import Store, StoreError
from fleetlearn.broker import provision as prov
from fleetlearn.shared import compression, rounds, tflite, topics, wire
from fleetlearn.shared import privacy as encoding
from fleetlearn.shared.rounds import RoundAnnounce, RoundState
from fleetlearn.shared.secagg.config import DistributedNoise, PrivacyFloor
from tests.conftest import require_mosquitto
from tests.fleet_harness import fleet
from tests.test_rounds_inmemory import MODEL, Fleet, make_fleet, run_round

dp_accounting = pytest.importorskip("dp_accounting")
ORDERS = [float(o) for o in privacy.ORDERS]


def start(fleet_: Fleet, round_id: int) -> None:
    """Start a round, drawing Poisson samples again until one is large enough (what the
    service does after a pause)."""
    for _ in range(50):
        try:
            run_round(fleet_, round_id)
            return
        except EngineError as exc:
            if "Poisson sample" not in str(exc):
                raise
    raise AssertionError("no Poisson sample reached min_cohort in 50 draws")


# ------------------------------------------------------------------------- distributed


def test_a_distributed_round_releases_the_noisy_mean_and_charges_its_survivors() -> None:
    z, clip = 1.0, 0.05
    fleet_ = make_fleet(8, privacy="distributed", dp_noise_multiplier=z, dp_clip=clip)
    run_round(fleet_)
    out = fleet_.engine.outcome
    assert out is not None
    assert out.state is RoundState.CLOSED, out.reason
    announce = wire.decode(fleet_.retained[topics.round_announce(fleet_.engine.fleet)])
    assert isinstance(announce, RoundAnnounce)
    assert announce.secagg is not None
    noise = announce.secagg.noise
    assert noise is not None
    assert announce.secagg.min_survivors == 8  # no dropout expected: every device must stay
    # The release is the clipped updates' sum plus noise, over the fixed denominator.
    inputs = {d: p.inputs[1] for d, p in fleet_.devices.items()}
    idx = inputs["d00"][0]
    clipped = sum(encoding.clip_l2(i[1], clip) for i in inputs.values())
    assert out.mean_update is not None
    assert announce.training.error_feedback  # the default: no d/k rescaling of rand-k
    scale = 1.0
    residual = out.mean_update[idx] / scale - clipped / noise.denominator
    expected_sd = math.sqrt(8 * noise.variance) / noise.scale / noise.denominator
    # One round: len(idx) draws, each variance within 5 standard errors.
    se = math.sqrt(2.0 / (len(idx) - 1))
    assert (1 - 5 * se) < float(np.std(residual)) ** 2 / expected_sd**2 < (1 + 5 * se)
    # The charge: 7 other devices' noise over the rounded norm bound, on the padded length.
    p = announce.secagg.update_words
    charge = out.charge
    assert charge is not None
    assert charge.noise_multiplier == pytest.approx(z)
    assert (charge.sampling_rate, charge.mechanism, charge.dimension, charge.scale) == (
        1.0,
        "skellam",
        p,
        noise.norm_bound(p),
    )
    assert fleet_.engine.ledger.charges == [charge]
    figures = out.metrics["privacy"]
    assert figures["released"] is True
    assert figures["epsilon"] == pytest.approx(privacy.epsilon_spent([charge], 1e-5))


def test_a_distributed_round_sized_for_dropouts_carries_the_planned_noise_with_fewer() -> None:
    least = least_survivors(20, 0.1)
    assert least == 13  # Binomial(20, 0.9) < 13 has probability 0.0004; < 14: 0.0024
    cfg = {"privacy": "distributed", "dp_clip": 0.05, "expected_dropout": 0.1}
    fleet_ = make_fleet(20, **cfg)
    fleet_.drop_kinds = {"d01": {topics.Kind.MASKED}, "d02": {topics.Kind.MASKED}}
    run_round(fleet_)
    out = fleet_.engine.outcome
    assert out is not None
    assert out.state is RoundState.CLOSED, out.reason
    announce = wire.decode(fleet_.retained[topics.round_announce(fleet_.engine.fleet)])
    assert isinstance(announce, RoundAnnounce)
    assert announce.secagg is not None
    assert announce.secagg.min_survivors == least  # above the threshold t the round needs
    assert announce.secagg.threshold < least
    assert len(out.survivors) == 18
    planned = out.planned_charge
    assert planned is not None
    assert planned.noise_multiplier == pytest.approx(1.0)  # sized for the least survivors
    assert out.charge is not None
    # 18 survivors carry 17 devices' noise where 12 were planned: charged what they carried.
    assert out.charge.noise_multiplier == pytest.approx(math.sqrt(17 / 12))
    # Fewer survivors than planned would carry less noise than charged: no unmasking.
    fleet_ = make_fleet(20, **cfg)
    fleet_.drop_kinds = {f"d{i:02d}": {topics.Kind.MASKED} for i in range(1, 9)}
    run_round(fleet_)
    out = fleet_.engine.outcome
    assert out is not None
    assert out.state is RoundState.ABORTED
    assert "12" in out.reason, out.reason
    assert "13" in out.reason, out.reason
    assert out.charge is None  # nothing was unmasked: nothing spent
    assert fleet_.engine.ledger.charges == []


def test_a_noisy_sum_refused_after_unmasking_is_still_charged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The aggregator saw the noisy sum before it refused it (a device sent garbage that
    honest contributions cannot make): the round aborts, and is charged."""
    from fleetlearn.shared.compression.errors import CompressionError
    from fleetlearn.shared.secagg import contribution

    def corrupt(*args: object, **kwargs: object) -> None:
        raise CompressionError("the unmasked noisy sum has a coordinate beyond 9: corrupt")

    monkeypatch.setattr(contribution, "decode", corrupt)
    fleet_ = make_fleet(6, privacy="distributed", dp_clip=0.05)
    run_round(fleet_)
    out = fleet_.engine.outcome
    assert out is not None
    assert out.state is RoundState.ABORTED
    assert "corrupt" in out.reason
    assert out.charge is not None
    assert fleet_.engine.ledger.charges == [out.charge]
    assert out.metrics["privacy"]["released"] is True


def test_a_sample_below_the_planned_survivors_is_not_announced() -> None:
    """Sizing comes from the sampling (rate x candidates), not from the sample drawn; a
    sample too small to reach the planned least survivors is drawn again."""
    fleet_ = make_fleet(
        12, privacy="distributed", dp_clip=0.05, cohort=6, expected_dropout=0.1, min_cohort=3
    )
    tried, refused = 0, 0
    while tried < 40:
        tried += 1
        try:
            fleet_.publish(
                fleet_.engine.start_round(
                    round_id=tried, model_version=1, dim=fleet_.dim, now=fleet_.now
                )
            )
        except NotEnoughDevicesError as exc:
            refused += "sized for" in str(exc) or "Poisson sample" in str(exc)
            continue
        announce = fleet_.engine.announce
        assert announce is not None
        assert announce.secagg is not None
        noise = announce.secagg.noise
        assert noise is not None
        # Whatever the sample's size: expected survivors 12 * 0.5 * 0.9 = 5.4.
        assert noise.denominator == pytest.approx(5.4)
        assert announce.secagg.min_survivors >= least_survivors(12, 1 - 0.5 * 0.9)
        fleet_.engine.abort("test", fleet_.now)
    assert refused < tried
    # A sample far below what the sampling plans for (3 drawn where 45 are expected).
    config = EngineConfig(privacy="distributed", dp_clip=0.05, expected_dropout=0.1)
    setup = RoundSetup(
        round_id=1,
        cohort=("d00", "d01", "d02"),
        seed=bytes(32),
        dim=100,
        compression=SecureMode(config).compression(),
        coordinates=None,
        verify_keys={},
        tickets={},
        sampling_rate=0.5,
        candidates=100,
    )
    with pytest.raises(NotEnoughDevicesError, match="sized for"):
        SecureMode(config).open(setup)


@pytest.mark.parametrize(("n", "dropout"), [(10, 0.2), (20, 0.1), (100, 0.1), (1000, 0.05)])
def test_the_least_survivors_are_a_low_quantile_of_the_binomial(n: int, dropout: float) -> None:
    from scipy.stats import binom

    m = least_survivors(n, dropout)
    assert binom.cdf(m - 1, n, 1 - dropout) <= 1e-3 < binom.cdf(m, n, 1 - dropout)
    assert least_survivors(n, 0.0) == n
    assert least_survivors(4, 0.5) == 3  # never below a secure round's minimum


# ----------------------------------------------------------------------------- central


def direct_gaussian_epsilon(q: float, z: float, rounds_: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant(orders=ORDERS)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, rounds_)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("amplification", [False, True])
def test_a_central_run_spends_what_dp_accounting_computes_for_it(amplification: bool) -> None:
    """Acceptance 2: three plain rounds with central noise on Poisson cohorts of a fleet of
    10 (rate 4/10). The amplified figure on metrics equals dp-accounting's own composition of
    three Poisson-sampled Gaussians, the cohort-known figure its composition without
    sampling, and `epsilon` (what the budget holds) is the one privacy.amplification says."""
    z, clip = 1.3, 0.05
    fleet_ = make_fleet(
        10,
        mode="plain",
        privacy="central",
        dp_noise_multiplier=z,
        dp_clip=clip,
        dp_amplification=amplification,
        cohort=4,
        sparsity="dense",
    )
    for r in (1, 2, 3):
        start(fleet_, r)
        out = fleet_.engine.outcome
        assert out is not None
        assert out.state is RoundState.CLOSED, out.reason
        assert out.metrics["privacy"]["sampling_rate"] == pytest.approx(0.4)
    figures = out.metrics["privacy"]
    assert figures["rounds_charged"] == 3
    sampled = direct_gaussian_epsilon(0.4, z, 3, 1e-5)
    known = direct_gaussian_epsilon(1.0, z, 3, 1e-5)
    assert figures["epsilon_amplified"] == pytest.approx(sampled, rel=1e-9)
    assert figures["epsilon_cohort_known"] == pytest.approx(known, rel=1e-9)
    assert figures["epsilon"] == pytest.approx(sampled if amplification else known, rel=1e-9)
    assert figures["amplification"] is amplification
    assert sampled < known


def test_central_noise_is_added_to_the_clipped_sum() -> None:
    z, clip, n = 2.0, 0.05, 6
    fleet_ = make_fleet(
        n, mode="plain", privacy="central", dp_noise_multiplier=z, dp_clip=clip, sparsity="dense"
    )
    run_round(fleet_)
    out = fleet_.engine.outcome
    assert out is not None
    assert out.state is RoundState.CLOSED, out.reason
    announce = wire.decode(fleet_.retained[topics.round_announce(fleet_.engine.fleet)])
    assert isinstance(announce, RoundAnnounce)
    sent = [wire.decode(b) for _, kind, b in fleet_.sent if kind is topics.Kind.UPDATE]
    assert len(sent) == n
    dense = [
        compression.to_dense(
            m.update, config=announce.compression, dim=fleet_.dim, seed=announce.seed
        )
        for m in sent
        if isinstance(m, rounds.PlainUpdate)
    ]
    assert max(np.linalg.norm(x) for x in dense) > 2 * clip  # the clip bites
    clipped = sum(encoding.clip_l2(x, clip) for x in dense)
    assert out.mean_update is not None
    residual = out.mean_update - clipped / n
    sd = z * clip / n
    se = math.sqrt(2.0 / (residual.size - 1))
    assert abs(float(np.var(residual)) / sd**2 - 1) < 5 * se
    assert out.metrics["weight_sum"] == n  # every device counts the same


def test_local_noise_is_added_on_the_device_and_charged_for_the_aggregator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each device clips and noises its own update and sends no weight or evaluation
    figures; the round is charged as a Gaussian with half the multiplier (replace-one
    sensitivity, what the aggregator sees of one device)."""
    z, clip, n = 1.0, 0.05, 8
    fleet_ = make_fleet(
        n,
        mode="plain",
        privacy="local",
        dp_noise_multiplier=z,
        dp_clip=clip,
        sparsity="dense",
        training=rounds.TrainingPlan(error_feedback=False),
    )
    trained: dict[str, np.ndarray] = {}
    for dev, part in fleet_.devices.items():
        original = part.trained

        def spy(round_id, result, now, dev=dev, original=original):  # type: ignore[no-untyped-def]
            trained[dev] = np.asarray(result.update, dtype=np.float64)
            return original(round_id, result, now)

        monkeypatch.setattr(part, "trained", spy)
    run_round(fleet_)
    out = fleet_.engine.outcome
    assert out is not None
    assert out.state is RoundState.CLOSED, out.reason
    sent = [wire.decode(b) for _, kind, b in fleet_.sent if kind is topics.Kind.UPDATE]
    assert len(sent) == n
    for message in sent:
        assert isinstance(message, rounds.PlainUpdate)
        assert (message.weight, message.samples, message.class_samples) == (1.0, 0, ())
    assert out.mean_update is not None
    clipped = sum(encoding.clip_l2(u, clip) for u in trained.values())
    residual = out.mean_update - clipped / n
    sd = z * clip / math.sqrt(n)  # n devices' noise over a denominator of n
    se = math.sqrt(2.0 / (residual.size - 1))
    assert abs(float(np.var(residual)) / sd**2 - 1) < 5 * se
    assert out.charge == RoundCharge(sampling_rate=1.0, noise_multiplier=z / 2)
    figures = out.metrics["privacy"]
    assert figures["epsilon_cohort_known"] == pytest.approx(
        direct_gaussian_epsilon(1.0, z / 2, 1, 1e-5), rel=1e-9
    )
    with pytest.raises(EngineError, match="error_feedback"):
        EngineConfig(mode="plain", privacy="local")  # the default plan feeds back


@pytest.mark.parametrize(
    ("mode", "mechanism", "z", "joins"),
    [
        ("secure", "none", 1.0, False),
        ("secure", "distributed", 1.0, False),
        ("secure", "distributed", 2.0, True),
        ("plain", "central", 5.0, False),  # nothing a device can check
        ("plain", "local", 2.0, True),
    ],
)
def test_a_device_floor_refuses_rounds_with_less_noise_than_it_demands(
    mode: str, mechanism: str, z: float, joins: bool
) -> None:
    cfg: dict[str, object] = {"privacy": mechanism, "dp_noise_multiplier": z, "dp_clip": 0.05}
    if mechanism == "none":
        cfg = {}
    if mode == "plain":
        cfg.update(sparsity="dense", training=rounds.TrainingPlan(error_feedback=False))
    fleet_ = make_fleet(6, mode=mode, floor=PrivacyFloor(min_noise=2.0), **cfg)
    run_round(fleet_)
    out = fleet_.engine.outcome
    assert out is not None
    assert (out.state is RoundState.CLOSED) is joins, out.reason
    notes = [n for texts in fleet_.notes.values() for n in texts]
    if joins:
        assert not any("demands" in n for n in notes)
    else:
        assert len([n for n in notes if "demands" in n]) == 6, notes
        assert not [b for _, _, b in fleet_.sent]  # nothing left any device


def test_privacy_settings_that_cannot_work_are_refused() -> None:
    with pytest.raises(EngineError, match="secure"):
        EngineConfig(mode="plain", privacy="distributed")
    with pytest.raises(EngineError, match="mean"):
        EngineConfig(mode="plain", privacy="central", rule="median")
    with pytest.raises(EngineError, match="top_k"):
        EngineConfig(
            mode="plain",
            privacy="central",
            sparsity="top_k",
            training=rounds.TrainingPlan(error_feedback=True),
        )
    with pytest.raises(EngineError, match=r"privacy\.mechanism"):
        EngineConfig(dp_epsilon=3.0)
    for bad in (0.0, math.nan, -1.0):
        with pytest.raises(EngineError, match="noise_multiplier"):
            EngineConfig(privacy="distributed", dp_noise_multiplier=bad)


# ------------------------------------------------------------------------------ budget


def test_the_round_that_would_cross_the_budget_is_not_started() -> None:
    z = 1.5
    one = RoundCharge(sampling_rate=1.0, noise_multiplier=z)
    two, three = (privacy.epsilon_spent([one] * k, 1e-5) for k in (2, 3))
    fleet_ = make_fleet(
        5,
        mode="plain",
        privacy="central",
        dp_noise_multiplier=z,
        dp_epsilon=(two + three) / 2,
        sparsity="dense",
    )
    run_round(fleet_, 1)
    run_round(fleet_, 2)
    assert fleet_.engine.ledger.charges == [one, one]
    manifest = tflite.read_manifest(MODEL)
    assert manifest is not None
    with pytest.raises(BudgetSpentError, match="privacy budget") as refused:
        fleet_.engine.start_round(round_id=3, model_version=1, dim=fleet_.dim, now=fleet_.now)
    assert refused.value.figures["epsilon"] == pytest.approx(two)
    assert fleet_.engine.phase is Phase.CLOSED  # round 2's: nothing started
    assert fleet_.engine.budget_spent(3) is None  # the budget is not spent, only too small
    (pub,) = fleet_.engine.refusal(3, 1, refused.value.reason)
    notice = wire.decode(pub.payload)  # type: ignore[arg-type]
    assert isinstance(notice, RoundAnnounce)
    assert notice.state is RoundState.ABORTED
    assert "privacy budget" in notice.reason
    assert pub.retain
    assert any(e["event"] == "round_refused" for e in fleet_.engine.events)


def test_poisson_cohorts_take_each_candidate_at_the_rate() -> None:
    """Over 300 selections from 20 candidates at rate 5/20, every device's share of cohorts
    is within 5 standard errors of 0.25, and cohort sizes vary (a fixed size would not)."""
    fleet_ = make_fleet(20, mode="plain", privacy="central", cohort=5, min_cohort=1)
    counts = dict.fromkeys(fleet_.devices, 0)
    sizes = set()
    for _ in range(300):
        try:
            cohort = fleet_.engine.select(1, fleet_.now)
        except NotEnoughDevicesError:  # an empty sample (0.75^20: a few in 300)
            cohort = ()
        sizes.add(len(cohort))
        for d in cohort:
            counts[d] += 1
    se = math.sqrt(0.25 * 0.75 / 300)
    assert all(abs(c / 300 - 0.25) < 5 * se for c in counts.values()), counts
    assert len(sizes) > 3
    # The mean cohort is 20 * 0.25 = 5 (standard error sqrt(20 * 0.25 * 0.75 / 300) = 0.11).
    assert abs(sum(counts.values()) / 300 - 5.0) < 5 * math.sqrt(20 * 0.25 * 0.75 / 300)


# ------------------------------------------------------------------------------- store


def test_the_store_keeps_planned_charges_of_interrupted_rounds(tmp_path: Path) -> None:
    planned = RoundCharge(sampling_rate=0.5, noise_multiplier=1.0, mechanism="skellam", scale=9.0)
    spent = RoundCharge(sampling_rate=0.5, noise_multiplier=1.2, mechanism="skellam", scale=9.0)
    store = Store(tmp_path)
    for r in (1, 2, 3):
        store.begin_round(r, "secure", 1, ["a", "b", "c"], now=0.0, charge=planned)
    store.finish_round(1, status="aborted", now=1.0, charge=spent)  # unmasked, then failed
    store.finish_round(2, status="aborted", now=1.0)  # aborted before any sum: no charge
    store.close()
    reopened = Store(tmp_path)  # round 3 was interrupted
    assert reopened.interrupted_rounds() == [3]
    assert reopened.charges() == [spent, planned]
    reopened._db.execute("UPDATE privacy_charges SET charge = '{\"sampling_rate\": 7}'")
    with pytest.raises(StoreError, match="privacy charge"):
        reopened.charges()
    reopened.close()


# ------------------------------------------------------------------------ over mosquitto


async def _watch(  # type: ignore[no-untyped-def]
    h, wanted: list[str], seen: list[tuple[str, bytes]], ready: asyncio.Event, *, dashboard: bool
) -> None:
    """Everything published on `wanted` topics, in order, as a device (the observer) or as
    the dashboard sees it (the broker ties a client id to its username: one client each)."""
    if dashboard:
        username, password = prov.DASHBOARD_USER, prov.dashboard_password(h.fleet_dir)
    else:
        user = h.observer()
        username, password = user.username, user.password
    client = aiomqtt.Client(
        h.broker.host,
        h.broker.port,
        username=username,
        password=password,
        identifier=username,
        timeout=10,
    )
    async with client:
        for topic in wanted:
            await client.subscribe(topic, qos=1)
        ready.set()
        async for msg in client.messages:
            seen.append((str(msg.topic), bytes(msg.payload)))  # type: ignore[arg-type]


def _last(seen: list[tuple[str, bytes]], topic: str) -> bytes:
    return [payload for t, payload in seen if t == topic][-1]


@pytest.mark.broker
@pytest.mark.slow
async def test_the_budget_holds_over_mqtt_and_across_a_restart(tmp_path: Path) -> None:
    """Acceptance 3: a budget that fits two distributed rounds; the third is refused with the
    reason on `round`, `metrics` and `events`, and a restarted aggregator refuses at once."""
    require_mosquitto()
    z, clip, n = 1.5, 0.05, 5
    manifest = tflite.read_manifest(MODEL)
    assert manifest is not None
    noise = DistributedNoise.sized(
        clip=clip, dimension=manifest.parameter_count, noise_multiplier=z, least_survivors=n
    )
    p = encoding.padded_dimension(manifest.parameter_count)
    one = RoundCharge(
        sampling_rate=1.0,
        noise_multiplier=noise.noise_multiplier(p, n),
        mechanism="skellam",
        dimension=p,
        scale=noise.norm_bound(p),
    )
    two, three = (privacy.epsilon_spent([one] * k, 1e-5) for k in (2, 3))
    settings = {
        "rounds.count": "5",
        "privacy.mechanism": "distributed",
        "privacy.noise_multiplier": str(z),
        "privacy.clip": str(clip),
        "privacy.epsilon": str((two + three) / 2),
    }
    async with fleet(tmp_path, n) as h:
        round_topic, metrics_topic = topics.round_announce(h.fleet), topics.metrics(h.fleet)
        seen: list[tuple[str, bytes]] = []
        ready = [asyncio.Event(), asyncio.Event()]
        watchers = [
            asyncio.create_task(_watch(h, [round_topic], seen, ready[0], dashboard=False)),
            asyncio.create_task(
                _watch(h, [metrics_topic, topics.events(h.fleet)], seen, ready[1], dashboard=True)
            ),
        ]
        try:
            async with asyncio.timeout(20):
                await asyncio.gather(*(r.wait() for r in ready))
            h.start_devices()
            service, summaries = await h.run_aggregator(timeout=240, **settings)
            # Every device must survive (no dropout expected): a round a straggler aborted
            # on a loaded machine is retried, and charged nothing (no sum was unmasked).
            closed = [s for s in summaries if s.state == "closed"]
            assert len(closed) == 2, [s.metrics.get("reason") for s in summaries]
            assert all(
                s.metrics.get("privacy", {}).get("released") is False
                for s in summaries
                if s.state != "closed"
            )
            refused = summaries[-1].round_id + 1
            assert service.budget_spent is not None
            assert f"privacy budget: round {refused} would take epsilon" in service.budget_spent
            assert closed[1].metrics["privacy"]["epsilon"] == pytest.approx(two, rel=1e-6)

            def told(topic: str, marker: bytes) -> bool:
                return any(marker in b for t, b in seen if t == topic)

            def announced_refusal() -> bool:
                for t, b in seen:
                    if t == round_topic:
                        notice = wire.decode(b, RoundAnnounce)
                        if notice.state is RoundState.ABORTED and notice.round_id == refused:
                            return True
                return False

            # The three are published in turn, and reach the two watchers in their own time.
            async with asyncio.timeout(20):
                while not (  # noqa: ASYNC110 - the watchers fill `seen`
                    told(topics.events(h.fleet), b"round_refused")
                    and told(metrics_topic, b'"state":"refused"')
                    and announced_refusal()
                ):
                    await asyncio.sleep(0.2)
            # The round topic says why the round did not start; so does metrics.
            notice = wire.decode(_last(seen, round_topic), RoundAnnounce)
            assert (notice.round_id, notice.state) == (refused, RoundState.ABORTED)
            assert notice.reason == service.budget_spent
            metrics = json.loads(_last(seen, metrics_topic))
            assert (metrics["round"], metrics["state"]) == (refused, "refused")
            assert metrics["reason"] == service.budget_spent
            assert metrics["privacy"]["epsilon"] == pytest.approx(two, rel=1e-6)

            # Restarted on the same state directory: the two rounds are still spent.
            seen.clear()
            again, more = await h.run_aggregator(timeout=120, **settings)
            assert more == []
            assert again.budget_spent is not None
            assert f"round {refused} would take epsilon from" in again.budget_spent
            async with asyncio.timeout(20):
                while not told(metrics_topic, b'"state":"refused"'):  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
            metrics = json.loads(_last(seen, metrics_topic))
            assert metrics["state"] == "refused"
            assert metrics["privacy"]["rounds_charged"] == 2
            assert metrics["privacy"]["epsilon"] == pytest.approx(two, rel=1e-6)
        finally:
            for task in watchers:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
