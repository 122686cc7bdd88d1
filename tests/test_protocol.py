"""The control messages shared by the agent and its clients."""

from __future__ import annotations

import json

import pytest

from intercept import protocol
from intercept.protocol import BadRequest, Refusal


@pytest.mark.parametrize(
    "request_",
    [protocol.Hello(), protocol.Env(), protocol.ListRoutes(), protocol.Drain(), protocol.Resume(),
     protocol.Register([{"kind": "header", "name": "x-dev", "value": "alice"}], False), protocol.Unregister(7),
     protocol.Register([{"kind": "header", "name": "x-dev", "value": "bob"}], False, mirror=True),
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
        (b'{"op": "register", "rules": [], "all": true, "mirror": "yes"}', "mirror must be a boolean"),
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


# --------------------------------------------------------------------------- typed replies, versions


def test_every_request_has_a_typed_reply_that_round_trips():
    from intercept.protocol import REPLIES, _REQUESTS

    assert set(REPLIES) == set(_REQUESTS.values())
    for cls in REPLIES.values():
        reply = cls()
        line = json.dumps(reply.to_json()).encode()
        request = next(r for r, c in REPLIES.items() if c is cls)
        assert protocol.decode_reply(request.__new__(request), line) == reply


def test_a_version_1_agents_hello_says_what_it_lacks():
    old = protocol.decode_reply(protocol.Hello(), json.dumps({
        "ok": True, "agent_version": "0.0.9", "upstream": "127.0.0.1:8080", "hold_timeout": 10,
        "outbound": True, "fence": {"allow": [], "deny": []}, "files": [], "tls_connections": 0,
        "idle_seconds": 1.5, "something_newer": 1}).encode())
    assert isinstance(old, protocol.HelloReply)
    assert (old.protocol, old.rule_kinds, old.features) == (1, list(protocol.RULE_KINDS), [])
    lacks = old.lacks("check-outbound")
    assert lacks is not None and "intercept 0.0.9" in lacks and "'check-outbound'" in lacks
    assert "upgrade it" in lacks
    assert old.ports == [] and "'ports'" in (old.lacks("ports") or ""), "an agent before several ports takes one"


def test_a_refusal_and_garbage_come_back_as_refusals():
    refusal = protocol.decode_reply(protocol.ListRoutes(), b'{"ok": false, "error": "bad-request", "message": "x"}')
    assert refusal == protocol.Refusal("bad-request", "x")
    assert protocol.decode_reply(protocol.ListRoutes(), b"[1]").error == "bad-request"
    assert protocol.decode_reply(protocol.ListRoutes(), b"not json").error == "bad-request"


def test_a_register_without_mirror_reads_as_an_agent_from_before_mirrors_would():
    # mirror is written only when true: an older agent, which knows no such field, reads the rest as before
    plain = json.loads(protocol.encode(protocol.Register([], True)))
    assert plain == {"op": "register", "rules": [], "all": True, "ttl": None}
    assert json.loads(protocol.encode(protocol.Register([], True, mirror=True)))["mirror"] is True
    assert protocol.decode(b'{"op": "register", "rules": [], "all": true}') == protocol.Register([], True)


def test_an_agent_without_mirrors_says_so():
    older = protocol.HelloReply(agent_version="0.0.9", protocol=2, features=["check-outbound"])
    assert "lacks 'mirror'" in older.lacks("mirror")
    assert "mirror" in protocol.FEATURES


def test_early_data_travels_in_an_openings_originator_and_nothing_else_is_taken_for_it():
    request = b"GET /x HTTP/1.1\r\nHost: a\r\nx-dev: \xff\r\n\r\n"  # any bytes, obs-text too
    assert protocol.early_data(protocol.early_data_origin(request)) == request
    assert protocol.early_data("127.0.0.1") is None  # an ordinary channel's originator
    assert protocol.early_data(protocol.EARLY_DATA_ORIGIN + "not base64!") is None
    with pytest.raises(ValueError, match="more than an opening carries"):
        protocol.early_data_origin(b"x" * (protocol.EARLY_DATA_MAX + 1))
