"""The agent's HTTP/1.1 framing never disagrees with h11 or llhttp on a message it accepts.

Bounded here (hypothesis draws from the grammar in ``tests/http1_diff.py``); the
longer campaign is ``python fuzz/http1_diff.py``.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tests.http1_diff as diff
from tests.http1_diff import PREFACE, SMUGGLED, agent_frames, disagreement, generate

pytest.importorskip("httptools")

FOUND_BEFORE = [
    # issue 12: an Upgrade with a body (llhttp ends it at the head)
    b"POST /outer HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: foo\r\nContent-Length: 49\r\n\r\n" + SMUGGLED,
    b"POST /outer HTTP/1.1\r\nHost: a\r\nUpgrade: foo\r\nTransfer-Encoding: chunked\r\n\r\n2d\r\n" + SMUGGLED[:45] + b"\r\n0\r\n\r\n",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\nContent-Length: 49\r\n\r\n" + SMUGGLED,
    # first bytes that were relayed raw, past routing
    b"X" * 33 + b" / HTTP/1.1\r\nHost: a\r\n\r\n" + SMUGGLED,
    b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n" + SMUGGLED,
    b"PRI * HTTP/2.0\r\nHost: a\r\n\r\n" + SMUGGLED,
    b"PRI / HTTP/1.1\r\nHost: a\r\n\r\n" + SMUGGLED,  # llhttp waits for the rest of a preface
    # the classic shapes
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n" + SMUGGLED,
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 49\r\n\r\n" + SMUGGLED,
    b"GET / HTTP/1.1\r\nHost: a\nContent-Length: 49\r\n\r\n" + SMUGGLED,
]


@pytest.mark.parametrize("data", FOUND_BEFORE, ids=range(len(FOUND_BEFORE)))
def test_known_smuggling_shapes_are_framed_safely(data):
    assert disagreement(data) is None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_generated_requests_are_framed_as_the_references_frame_them(data):
    request = generate(lambda options: data.draw(st.sampled_from(options)))
    assert disagreement(request) is None, request


def test_the_preface_of_http2_is_relayed_and_nothing_else_is():
    assert agent_frames(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")[1] == diff.RAW
    assert agent_frames(b"PRI * HTTP/2.0\r\nHost: a\r\n\r\n")[1] == diff.REJECT


def test_the_comparison_catches_an_agent_blind_to_upgrades(monkeypatch):
    """Without the upgrade rule, the shape from issue 12 is reported: the check can fail."""
    real = diff.parse_request_head

    def blind(buf, start=0, scanned=0):
        # same length, so offsets hold: the agent no longer sees an upgrade
        return real(bytes(buf).replace(b"Upgrade", b"Xpgrade").replace(b"CONNECT", b"CONNEXT"), start, scanned)

    monkeypatch.setattr(diff, "parse_request_head", blind)
    reason = disagreement(FOUND_BEFORE[0])
    assert reason is not None and "llhttp" in reason
