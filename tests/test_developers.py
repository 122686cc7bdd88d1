"""The developers' routes document (kept in the routes ConfigMap) and the route table's pending routes."""

from __future__ import annotations

import pytest

from intercept.errors import RouteConflict, UsageError
from intercept.routing.developers import PENDING_PREFIX, DeveloperRoute, DevelopersDocument
from intercept.routing.match import Route, RouteTable, parse_rule

ALICE = Route(frozenset({parse_rule("header", "x-dev=alice")}))
BOB = Route(frozenset({parse_rule("header", "x-dev=bob")}))


def test_a_document_round_trips_and_entries_are_renewed_replaced_and_expire():
    now = 1000.0
    document = DevelopersDocument().with_route(DeveloperRoute("alice", ALICE, now + 60), now)
    document = document.with_route(DeveloperRoute("bob", BOB, now + 5), now)
    document = document.with_route(DeveloperRoute("alice", ALICE, now + 600), now)  # renewed: one entry
    assert DevelopersDocument.from_bytes(document.to_text().encode()) == document
    assert [(d.name, d.expires) for d in document.live(now + 10)] == [("alice", now + 600)]
    assert document.without_route("alice", ALICE, now).developers == (DeveloperRoute("bob", BOB, now + 5),)


@pytest.mark.parametrize("data", [
    b"[" * 100_000, b"\xff\xfe", b"{}" + b" " * (1 << 20), b'{"developers": {}}', b'{"developers": [1]}',
    b'{"developers": [{"name": "a", "rules": [], "expires": NaN}]}',
    b'{"developers": [{"name": "a", "rules": [], "expires": 1e999}]}',
    b'{"developers": [{"name": 7, "rules": [], "expires": 1}]}',
    b'{"developers": [{"name": "a", "rules": [{"kind": "header"}], "expires": 1}]}',
])
def test_a_bad_document_is_refused_with_a_reason(data):
    with pytest.raises(UsageError):
        DevelopersDocument.from_bytes(data)


def test_a_session_takes_over_its_pending_route_in_its_place():
    table = RouteTable()
    pending = table.add(PENDING_PREFIX + "alice", "alice", ALICE)
    later = table.add("s2", "bob", BOB)
    with pytest.raises(RouteConflict):  # another developer cannot take alice's rules
        table.add("s3", "carol", ALICE)
    taken = table.adopt(PENDING_PREFIX + "alice", "s1", ALICE)
    assert taken is not None and taken.session_id == "s1" and not table.holds(pending)
    assert [r["session"] for r in table.snapshot()] == ["s1", "s2"]  # alice's still first
    assert table.adopt(PENDING_PREFIX + "alice", "s4", ALICE) is None
    assert table.holds(later)
