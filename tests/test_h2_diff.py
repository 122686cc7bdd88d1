"""The agent's two HTTP/2 codecs give the app the same requests and the client the same answers.

Bounded here (the named malformed corpus of issue 22, then hypothesis drawing from the
grammar in ``tests/h2_diff.py``); the longer campaign is ``python fuzz/h2_diff.py``.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tests.h2_diff as diff
from tests.h2_diff import CORPUS, disagreement, generate, outcome

pytest.importorskip("ngh2", reason="the ngh2 codec is not installed (pip install -e '.[test]')")

PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR, ENHANCE_YOUR_CALM = 1, 3, 5, 6, 11


@pytest.mark.parametrize("case", list(CORPUS))
def test_the_malformed_corpus_ends_the_same_way_on_both_codecs(case):
    assert disagreement(CORPUS[case]) is None


# What issue 22 found the codecs doing differently, and the one behaviour (RFC 9113 8.1.1,
# 8.2, 8.3): a malformed request is refused on its own stream, and never reaches the app.
REFUSED = ["host-differs-from-authority", "path-relative", "path-absolute-uri", "uppercase-name", "connection-field",
           "te-gzip", "content-length-short", "content-length-exceeded"]


@pytest.mark.parametrize("case", REFUSED)
def test_a_malformed_request_is_refused_on_its_stream_by_both_codecs(case):
    for kind in diff.CODECS:
        seen = outcome(kind, CORPUS[case])
        assert not seen.closed and seen.streams[1].reset == PROTOCOL_ERROR, (kind, seen.summary())
        assert seen.streams[1].request is None or seen.streams[1].cancelled is not None, (kind, seen.summary())
    assert outcome("h2", CORPUS["host-same-authority-other-spelling"]).streams[1].answered  # A:80 is a


@pytest.mark.parametrize(("case", "code"), [("tiny-data-flood", ENHANCE_YOUR_CALM), ("continuation-flood", ENHANCE_YOUR_CALM),
                                            ("settings-flood", ENHANCE_YOUR_CALM), ("ping-flood", ENHANCE_YOUR_CALM),
                                            ("rapid-reset", ENHANCE_YOUR_CALM), ("malformed-stream-flood", ENHANCE_YOUR_CALM),
                                            ("window-update-flood", ENHANCE_YOUR_CALM),
                                            ("window-update-flood-on-a-closed-stream", ENHANCE_YOUR_CALM),
                                            ("rst-on-a-closed-stream-flood", ENHANCE_YOUR_CALM),
                                            ("goaway-flood", ENHANCE_YOUR_CALM),
                                            ("window-overflow-stream", FLOW_CONTROL_ERROR),
                                            ("settings-ack-with-payload", FRAME_SIZE_ERROR)])
def test_floods_and_broken_frames_end_the_connection_with_one_code(case, code):
    for kind in diff.CODECS:
        seen = outcome(kind, CORPUS[case])
        assert (seen.closed, seen.goaway) == (True, code), (kind, seen.summary())


@pytest.mark.parametrize("case", ["a-malformed-field-then-a-field-bomb", "a-field-bomb-on-a-closed-stream",
                                  "a-field-bomb-on-a-refused-stream"])
def test_a_block_of_more_fields_than_allowed_ends_the_connection_before_it_is_decoded(case, monkeypatch):
    # fields nobody keeps (after a malformed one, on a stream that is over or refused) count
    # too: 147,000 one-byte fields are not decoded one by one on the event loop
    from intercept.routing.h2engine import _Decoder

    decoded = []
    real = _Decoder._field
    monkeypatch.setattr(_Decoder, "_field", lambda self, header: (decoded.append(1), real(self, header))[1])
    for kind in diff.CODECS:
        seen = outcome(kind, [b"".join(CORPUS[case])])
        assert (seen.closed, seen.goaway) == (True, ENHANCE_YOUR_CALM), (kind, seen.summary())
    assert len(decoded) < 2000


@pytest.mark.parametrize("malformed_first", [False, True])
def test_the_h2_decoder_counts_the_fields_it_decodes_for_the_hpack_state_only(malformed_first):
    # without Intake before it: a block ignored (start(None)), or whose first field is
    # malformed, is refused past the field limit, not decoded to its end
    import hpack

    from intercept.routing.h2engine import _Decoder

    decoder = _Decoder(64 << 10, 1024)
    decoder.start(False if malformed_first else None)
    decoded = []
    real = decoder._field
    decoder._field = lambda header: (decoded.append(1), real(header))[1]
    with pytest.raises(hpack.OversizedHeaderListError):
        decoder.decode((b"\x00\x01A\x01x" if malformed_first else b"") + b"\x82" * 100_000, raw=True)
    assert len(decoded) == 1025


def test_window_updates_in_one_read_are_reported_once_per_stream():
    # each report costs the proxy a pass over the connection's streams (up to 256)
    from hyperframe.frame import SettingsFrame, WindowUpdateFrame

    from intercept.routing.h2codec import WindowOpened, new_codec

    updates = (b"".join(diff.headers(1, diff.POST, diff.hpack.Encoder(), end_stream=False))
               + WindowUpdateFrame(0, window_increment=1).serialize() * 500
               + WindowUpdateFrame(1, window_increment=1).serialize() * 500
               + SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1000}).serialize())
    for kind in diff.CODECS:
        codec = new_codec(client=False, clock=lambda: 0.0, kind=kind)
        codec.start()
        events = codec.receive(diff.PREFACE + SettingsFrame(0).serialize() + updates)
        assert sorted(ev.stream_id for ev in events if type(ev) is WindowOpened) == [0, 1], kind


def test_the_h2_engine_names_the_versions_to_install_when_an_internal_it_overrides_is_missing(monkeypatch):
    import h2.frame_buffer

    from intercept.routing import h2engine

    h2engine.check_internals()  # the pinned versions have them all
    monkeypatch.delattr(h2.frame_buffer.FrameBuffer, "_update_header_buffer")
    with pytest.raises(ImportError, match=r"FrameBuffer\._update_header_buffer.*pip install 'h2>=4.4.1,<4.5' 'hpack>=4.2,<4.3'"):
        h2engine.check_internals()


def test_the_h2_and_hpack_versions_the_engine_adapts_are_pinned():
    import tomllib
    from pathlib import Path

    from intercept.routing.h2engine import REQUIRED

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    for dependencies in (project["project"]["dependencies"], project["tool"]["intercept"]["agent-dependencies"]):
        assert set(REQUIRED.split()) <= set(dependencies)


def test_a_tiny_data_flood_is_stopped_before_either_codec_reads_it():
    # 12,000 one-byte DATA frames: what reached the app is what came before the limit
    for kind in diff.CODECS:
        seen = outcome(kind, [b"".join(CORPUS["tiny-data-flood"])])
        assert seen.goaway == ENHANCE_YOUR_CALM and not seen.streams.get(1, diff.Seen()).data, kind
    assert outcome("h2", CORPUS["small-message-stream"]).streams[1].ended  # 5,000 small gRPC messages are not a flood


def test_an_upgraded_connection_takes_frames_on_the_upgraded_stream():
    # Upgrade: h2c makes stream 1 the request: a WINDOW_UPDATE for its response is no frame on an idle stream
    import base64

    from hyperframe.frame import SettingsFrame, WindowUpdateFrame

    from intercept.routing.h2codec import new_codec

    from hyperframe.frame import GoAwayFrame, RstStreamFrame

    from intercept.routing.h2codec import Reset

    for kind in diff.CODECS:
        codec = new_codec(client=False, clock=lambda: 0.0, kind=kind)
        codec.start(base64.urlsafe_b64encode(SettingsFrame(0).serialize_body()))
        events = codec.receive(diff.PREFACE + SettingsFrame(0).serialize() + WindowUpdateFrame(1, window_increment=1000).serialize())
        assert not [ev for ev in events if type(ev) is Reset], kind
        sent = diff.parse(codec.pending())
        assert not [f for f in sent if isinstance(f, GoAwayFrame) or isinstance(f, RstStreamFrame) and f.stream_id == 1], kind


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_generated_connections_end_the_same_way_on_both_codecs(data):
    frames = generate(lambda options: data.draw(st.sampled_from(options)))
    assert disagreement(frames) is None, frames


def test_the_comparison_catches_a_codec_that_lets_a_malformed_request_through(monkeypatch):
    """Without the h2 codec's checks of requests, the issue's first disagreement is reported:
    the check can fail."""
    import intercept.routing.h2codec as h2codec

    monkeypatch.setattr(h2codec, "authority_mismatch", lambda headers: None)
    assert disagreement(CORPUS["host-differs-from-authority"]) is not None
