"""The round protocol table (shared.protocol) against the other places that name the same facts:
the topic namespace and ACL sets (shared.topics), the SecAgg+ message lists, the state
machines and the simulator's dropout keys. A row changed in one place only fails here."""

from __future__ import annotations

import pytest

from fleetlearn.firmware_sim.scenario import STAGE_KINDS, STAGE_ORDER
from fleetlearn.shared import protocol, topics
from fleetlearn.shared.protocol import Direction
from fleetlearn.shared.rounds import PlainUpdate, RoundAnnounce, RoundMode
from fleetlearn.shared.secagg import messages as sm
from fleetlearn.shared.secagg.client import _EXPECTS, ClientState
from fleetlearn.shared.secagg.config import STAGES, Stage
from fleetlearn.shared.secagg.server import _ACCEPTS, ServerState

Kind = topics.Kind


def test_stages_per_mode_follow_the_protocol_order() -> None:
    assert protocol.stages(RoundMode.SECURE) == STAGES
    assert protocol.stages(RoundMode.PLAIN) == (Stage.COLLECT,)
    assert [protocol.STAGE_INDEX[s] for s in STAGES] == [0, 1, 2, 3]
    assert STAGE_ORDER == ("advertise", "share", "collect", "unmask")


def test_device_topics_are_the_uplink_rows_and_what_the_acl_lets_devices_write() -> None:
    round_kinds = topics.DEVICE_WRITES - topics.PER_DEVICE
    assert set(protocol.UPLINK) == round_kinds
    assert round_kinds <= topics.PER_ROUND_DEVICE
    assert set(topics.aggregator_filters("f")[1:]) == {
        f"fl/f/r/+/{kind.value}/+" for kind in protocol.UPLINK
    }
    # The simulator silences exactly the topics that answer a stage.
    assert {k for kinds in STAGE_KINDS.values() for k in kinds} == set(protocol.UPLINK)
    assert STAGE_KINDS["collect"] == (Kind.MASKED, Kind.UPDATE)


def test_downlink_rows_are_on_topics_devices_read() -> None:
    readable = {topics.parse(f.replace("+", "1")).kind for f in topics.device_filters("f", "d")}
    for route in protocol.ROUTES:
        if route.direction is Direction.DOWN:
            assert route.kind in readable, route
            assert route.kind not in topics.DEVICE_WRITES, route


def test_dashboards_read_none_of_the_round_protocol() -> None:
    read = {topics.parse(f.replace("+", "d")).kind for f in topics.dashboard_filters("f")}
    assert not read & {route.kind for route in protocol.ROUTES}
    assert Kind.MODEL not in read


def test_retained_and_expiry_agree_with_the_topic_sets() -> None:
    for route in protocol.ROUTES:
        assert route.retained == (route.kind in topics.RETAINED), route
        # Retained state must outlive any expiry; round traffic must not linger.
        assert (route.expiry is None) == route.retained, route
    assert protocol.ROUTE_OF[sm.Advertise].expiry == protocol.ROUND_MESSAGE_EXPIRY


def test_secagg_message_lists_and_state_machines_agree_with_the_table() -> None:
    secure_up = [
        r.message
        for r in protocol.ROUTES
        if r.direction is Direction.UP and RoundMode.SECURE in r.modes
    ]
    assert tuple(secure_up) == sm.TO_AGGREGATOR
    secure_down = [
        r.message
        for r in protocol.ROUTES
        if r.direction is Direction.DOWN and r.modes == protocol.SECURE
    ]
    assert tuple(secure_down) == sm.TO_DEVICE
    assert _ACCEPTS[ServerState.COLLECT] is sm.MaskedInput
    assert _EXPECTS[ClientState.SHARE] is sm.ShareInbox
    assert protocol.opener(Stage.UNMASK) is sm.UnmaskRequest
    assert protocol.opener(Stage.ADVERTISE) is None  # the announcement opens it
    assert protocol.downlink(Kind.INBOX) == (sm.Roster, sm.ShareInbox)
    assert protocol.downlink(Kind.SURVIVORS) == (sm.UnmaskRequest, sm.Abort)


def test_each_mode_answers_its_stages_with_one_message() -> None:
    assert protocol.answer(Stage.COLLECT, RoundMode.PLAIN) is PlainUpdate
    assert protocol.answer(Stage.COLLECT, RoundMode.SECURE) is sm.MaskedInput
    with pytest.raises(KeyError, match="plain rounds have no advertise"):
        protocol.answer(Stage.ADVERTISE, RoundMode.PLAIN)
    assert protocol.ROUTE_OF[RoundAnnounce].modes == protocol.ANY_MODE
