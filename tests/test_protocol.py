"""The control messages shared by the agent and its clients."""

from __future__ import annotations

import pytest

from intercept import protocol
from intercept.protocol import BadRequest, Refusal


@pytest.mark.parametrize(
    "request_",
    [protocol.Hello(), protocol.Env(), protocol.ListRoutes(), protocol.Drain(), protocol.Resume(),
     protocol.Register([{"kind": "header", "name": "x-dev", "value": "alice"}], False), protocol.Unregister(7),
     protocol.SetClusterRoutes('{"updated": 1, "routes": []}', "c2lnbmF0dXJl")],
)
def test_every_request_reads_back_as_written(request_):
    line = protocol.encode(request_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode(line) == request_


@pytest.mark.parametrize(
    "line,reason",
    [
        (b"not json", "JSON object"),
        (b"[1, 2]", "JSON object"),
        (b'{"no": "op"}', "JSON object"),
        (b'{"op": "nope"}', "unknown op"),
        (b'{"op": 5}', "unknown op"),
        (b'{"op": "unregister"}', "malformed unregister"),
        (b'{"op": "unregister", "id": "7"}', "id must be a number"),
        (b'{"op": "register", "rules": {}}', "rules must be a list"),
        (b'{"op": "hello", "extra": 1}', "malformed hello"),
        (b'{"op": "cluster-routes", "document": {"updated": 1, "routes": []}}', "document must be the routes document's text"),
    ],
)
def test_anything_else_is_a_bad_request_that_says_why(line, reason):
    with pytest.raises(BadRequest) as e:
        protocol.decode(line)
    assert reason in str(e.value)


def test_a_refusal_names_its_holder_only_for_a_conflict():
    assert Refusal("conflict", "held by bob", "bob").to_json() == {"ok": False, "error": "conflict", "message": "held by bob", "holder": "bob"}
    assert "holder" not in Refusal("invalid", "bad rule").to_json()
    assert Refusal.from_json({"ok": False, "error": "conflict", "message": "m", "holder": "bob"}) == Refusal("conflict", "m", "bob")
