"""The sans-IO framing decisions: classify, request and response heads, chunked bodies."""

from __future__ import annotations

import pytest

from intercept.routing.http1 import (
    ChunkedScanner,
    Framing,
    Kind,
    ProtocolError,
    classify,
    error_response,
    parse_request_head,
    parse_response_head,
)


@pytest.mark.parametrize(
    "data,kind",
    [
        (b"GET / HTTP/1.1\r\n", Kind.HTTP),
        (b"\r\nPOST /x HTTP/1.1\r\n", Kind.HTTP),
        (b"get / HTTP/1.1\r\n", Kind.HTTP),
        (b"G", Kind.HTTP),
        (b"", Kind.NEED_MORE),
        (b"\r\n", Kind.NEED_MORE),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Kind.OTHER),
        (b"PRI * HT", Kind.NEED_MORE),
        (b"\x16\x03\x01\x00", Kind.OTHER),  # TLS
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Kind.OTHER),  # binary (a PostgreSQL SSLRequest)
        (b" GET / HTTP/1.1", Kind.OTHER),
        # nearly HTTP is HTTP: the request parser refuses it, it is never relayed past routing
        (b"*1\r\n$4\r\nPING\r\n", Kind.HTTP),
        (b"SSH-2.0-OpenSSH\r\n", Kind.HTTP),
        (b"A" * 40 + b" / HTTP/1.1\r\n", Kind.HTTP),
        (b"GET\t/ HTTP/1.1\r\n", Kind.HTTP),
    ],
)
def test_classify_tells_http_from_other_streams(data, kind):
    assert classify(data) is kind


def test_request_head_keeps_headers_in_order_with_lowercased_names():
    head = parse_request_head(b"GET /a?b HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a:  2 \r\n\r\nrest")
    assert (head.method, head.target, head.minor) == (b"GET", b"/a?b", 1)
    assert head.headers == [(b"host", b"x"), (b"x-a", b"1"), (b"x-a", b"2")]
    assert head.size == len(b"GET /a?b HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a:  2 \r\n\r\n")
    assert head.framing is Framing.NONE and head.keep_alive and not head.upgrade


def test_request_head_is_none_until_complete_then_found_at_an_offset():
    data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n"
    first = parse_request_head(data)
    assert parse_request_head(data, first.size) is None
    second = parse_request_head(data + b"\r\n", first.size)
    assert second.target == b"/2"


def test_leading_empty_lines_are_skipped_and_counted():
    head = parse_request_head(b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.target == b"/" and head.size == 4 + len(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize(
    "headers,framing,length",
    [
        (b"Content-Length: 10\r\n", Framing.LENGTH, 10),
        (b"Content-Length: 0\r\n", Framing.NONE, 0),
        (b"Content-Length: 7\r\nContent-Length: 7\r\n", Framing.LENGTH, 7),
        (b"Content-Length: 7, 7\r\n", Framing.LENGTH, 7),
        (b"Transfer-Encoding: chunked\r\n", Framing.CHUNKED, 0),
        (b"Transfer-Encoding: gzip, Chunked\r\n", Framing.CHUNKED, 0),
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", Framing.CHUNKED, 0),
    ],
)
def test_request_body_framing(headers, framing, length):
    head = parse_request_head(b"POST / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert (head.framing, head.length) == (framing, length)


@pytest.mark.parametrize(
    "request_bytes,status",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: br, chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX:\x01\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\nY: b\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/0.9\r\nHost: x\r\n\r\n", 505),
        (b"GET / HTTP/11.1\r\nHost: x\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000, 431),
    ],
)
def test_refused_requests(request_bytes, status):
    with pytest.raises(ProtocolError) as e:
        parse_request_head(request_bytes)
    assert e.value.status == status


@pytest.mark.parametrize(
    "version,connection,keep_alive",
    [(b"1.1", b"", True), (b"1.1", b"Connection: close\r\n", False), (b"1.0", b"", False),
     (b"1.0", b"Connection: Keep-Alive\r\n", True), (b"1.1", b"Connection: foo, CLOSE\r\n", False)],
)
def test_request_keep_alive(version, connection, keep_alive):
    head = parse_request_head(b"GET / HTTP/" + version + b"\r\nHost: x\r\n" + connection + b"\r\n")
    assert head.keep_alive is keep_alive


@pytest.mark.parametrize(
    "fields",
    [b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n", b"Upgrade: websocket\r\n", b"Connection: upgrade\r\n"],
)
def test_any_reading_of_upgrade_counts(fields):
    # h11 takes an Upgrade field alone as a proposal, llhttp wants Connection: upgrade too:
    # the agent waits for the answer on every reading
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n").upgrade
    assert parse_request_head(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n").upgrade
    assert not parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n").upgrade


@pytest.mark.parametrize("fields", [b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n"])
@pytest.mark.parametrize("upgrade", [b"Connection: Upgrade\r\nUpgrade: foo\r\n", b"Upgrade: foo\r\n", b"Connection: upgrade\r\n"])
def test_an_upgrade_with_a_body_is_refused(upgrade, fields):
    with pytest.raises(ProtocolError) as e:
        parse_request_head(b"POST / HTTP/1.1\r\nHost: x\r\n" + upgrade + fields + b"\r\n")
    assert e.value.status == 400 and "smuggling" in e.value.reason
    with pytest.raises(ProtocolError):
        parse_request_head(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n" + fields + b"\r\n")
    assert parse_request_head(b"POST / HTTP/1.1\r\nHost: x\r\n" + upgrade + b"Content-Length: 0\r\n\r\n").upgrade


def test_curls_h2c_upgrade_with_a_body_is_refused_with_the_flag_that_works():
    # curl --http2 -d ... offers Upgrade: h2c on a POST: refused like any upgrade with a
    # body, and the reason names what to send instead
    with pytest.raises(ProtocolError) as e:
        parse_request_head(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                           b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nContent-Length: 3\r\n\r\n")
    assert e.value.status == 400 and "smuggling" in e.value.reason and "--http2-prior-knowledge" in e.value.reason


def test_a_head_with_a_bare_lf_is_refused_before_it_completes():
    with pytest.raises(ProtocolError) as e:
        parse_request_head(b"GET / HTTP/1.1\nHost: x\n")
    assert e.value.status == 400 and "bare LF" in e.value.reason
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r") is None
    with pytest.raises(ProtocolError) as e:
        parse_response_head(b"HTTP/1.1 200 OK\nContent-Length: 0\n", b"GET")
    assert e.value.status == 502


def test_trailer_lines_are_capped():
    scanner = ChunkedScanner(400)
    scanner.feed(b"0\r\n")
    with pytest.raises(ProtocolError) as e:
        for _ in range(10000):
            scanner.feed(b"X-Trailer: 0123456789\r\n")
    assert "trailer" in e.value.reason


@pytest.mark.parametrize(
    "method,status_line,headers,framing,keep_alive",
    [
        (b"GET", b"HTTP/1.1 200 OK", b"Content-Length: 5\r\n", Framing.LENGTH, True),
        (b"HEAD", b"HTTP/1.1 200 OK", b"Content-Length: 5\r\n", Framing.NONE, True),
        (b"GET", b"HTTP/1.1 204 No Content", b"", Framing.NONE, True),
        (b"GET", b"HTTP/1.1 304 Not Modified", b"Content-Length: 5\r\n", Framing.NONE, True),
        (b"GET", b"HTTP/1.1 100 Continue", b"", Framing.NONE, True),
        (b"GET", b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket\r\n", Framing.TUNNEL, True),
        (b"CONNECT", b"HTTP/1.1 200 OK", b"", Framing.TUNNEL, True),
        (b"GET", b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked\r\n", Framing.CHUNKED, True),
        (b"GET", b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip\r\n", Framing.UNTIL_CLOSE, False),
        (b"GET", b"HTTP/1.1 200 OK", b"", Framing.UNTIL_CLOSE, False),
        (b"GET", b"HTTP/1.0 200 OK", b"Content-Length: 1\r\n", Framing.LENGTH, False),
        (b"GET", b"HTTP/1.1 200", b"Content-Length: 1\r\nConnection: close\r\n", Framing.LENGTH, False),
    ],
)
def test_response_framing(method, status_line, headers, framing, keep_alive):
    resp = parse_response_head(status_line + b"\r\n" + headers + b"\r\n", method)
    assert (resp.framing, resp.keep_alive) == (framing, keep_alive)


def test_malformed_response_is_a_502():
    for data in (b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", b"SSH-2.0\r\n\r\n"):
        with pytest.raises(ProtocolError) as e:
            parse_response_head(data, b"GET")
        assert e.value.status == 502


CHUNKED = b"5\r\nhello\r\n1;ext=1\r\n \r\n10\r\n" + b"x" * 16 + b"\r\n0\r\nTrailer: t\r\n\r\n"


def test_chunked_scanner_finds_the_end_however_the_bytes_are_split():
    after = b"GET /next HTTP/1.1\r\n"
    data = CHUNKED + after
    for split in range(1, len(data)):
        scanner = ChunkedScanner()
        end = scanner.feed(data[:split])
        if scanner.done:
            assert end == len(CHUNKED)
            continue
        assert end == split
        end = scanner.feed(data, split)
        assert scanner.done and end == len(CHUNKED), split


def test_chunked_scanner_byte_by_byte():
    scanner = ChunkedScanner()
    for i in range(len(CHUNKED)):
        assert not scanner.done
        assert scanner.feed(CHUNKED[i : i + 1]) == 1
    assert scanner.done


@pytest.mark.parametrize(
    "body",
    [b"zz\r\n", b"5\r\nhelloX\r\n", b"5\nhello\r\n", b"-1\r\n", b"0\r\nbad trailer\r\n\r\n", b"1" * 5000],
)
def test_chunked_scanner_refuses_malformed_bodies(body):
    with pytest.raises(ProtocolError):
        ChunkedScanner().feed(body)


def test_error_response_is_short_plain_text_and_closes():
    data = error_response(400, "malformed request line")
    head, body = data.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Connection: close" in head
    assert body == b"malformed request line\n"
    assert error_response(502, "x", head_only=True).endswith(b"\r\n\r\n")


def test_forwarding_fields_name_the_peer_in_both_spellings():
    from intercept.routing.http1 import forwarding_fields

    assert forwarding_fields("10.1.2.3") == b"X-Forwarded-For: 10.1.2.3\r\nForwarded: for=10.1.2.3\r\n"
    assert forwarding_fields("::ffff:10.1.2.3") == b"X-Forwarded-For: 10.1.2.3\r\nForwarded: for=10.1.2.3\r\n"
    assert forwarding_fields("2001:db8::1") == b'X-Forwarded-For: 2001:db8::1\r\nForwarded: for="[2001:db8::1]"\r\n'


# -- the one-pattern fast path gives what the line-by-line parser gives ------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from intercept.routing import http1  # noqa: E402
from tests.http1_diff import generate  # noqa: E402

_FIELD_BYTES = st.sampled_from(
    [b"Host: x", b"host:x", b"Content-Length: 5", b"content-length:0", b"Content-Length: 5, 5", b"Content-Length: 5 ",
     b"Transfer-Encoding: chunked", b"transfer-encoding: gzip, chunked", b"Transfer-Encoding: x", b"Connection: close",
     b"connection: Upgrade, keep-alive", b"Upgrade: h2c", b"X-Dev: alice", b"x-dev:\talice \t", b"X-Empty:",
     b"Baggage: a=b, c=d", b"X-Host: y", b"X-Bin: \x80\xff", b" folded", b"Bad Name: v", b"X-Ctl: a\x01b",
     b"X-CR: a\rb", b"X-LF: a\nb", b"Host : x", b":x", b"Content-Length: -1", b"Expect: 100-continue"]
)
_REQUEST_LINES = st.sampled_from(
    [b"GET / HTTP/1.1", b"POST /a?b HTTP/1.1", b"GET / HTTP/1.0", b"PRI / HTTP/1.1", b"CONNECT h:443 HTTP/1.1",
     b"GET http://h/x HTTP/1.1", b"GET / HTTP/2.0", b"GET  / HTTP/1.1", b"G\x80T / HTTP/1.1", b"GET / HTTP/1.9"]
)


def _outcome(parse, *args):
    try:
        head = parse(*args)
    except ProtocolError as e:
        return ("refused", e.status, e.reason)
    if head is None:
        return None
    if isinstance(head, http1.RequestHead):
        return (head.method, head.target, head.minor, head.headers, head.size, head.framing, head.length,
                head.keep_alive, head.upgrade)
    return (head.status, head.size, head.framing, head.length, head.keep_alive)


def _line_by_line_response(data, method):
    return parse_response_head(data, method, 0, 1)  # scanned > 0: the pattern is not tried


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_REQUEST_LINES, st.lists(_FIELD_BYTES, max_size=6), st.sampled_from([b"", b"\r\n", b"body", b"\r\n\r\nGET"]))
def test_request_fast_path_agrees_with_the_line_parser(line, fields, tail):
    data = b"\r\n".join([line, *fields]) + b"\r\n\r\n" + tail
    assert _outcome(parse_request_head, data) == _outcome(http1._parse_request_lines, data, 0, 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_request_fast_path_agrees_on_the_differential_grammar(data):
    raw = generate(lambda options: data.draw(st.sampled_from(options)))
    assert _outcome(parse_request_head, raw) == _outcome(http1._parse_request_lines, raw, 0, 0)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204", b"HTTP/1.1 101 Switching",
                     b"HTTP/1.1 2000 OK", b"HTTP/2 200", b"HTTP/1.1 200 \x80ok", b"HTTP/1.1 100 Continue"]),
    st.lists(_FIELD_BYTES, max_size=6),
    st.sampled_from([b"GET", b"HEAD", b"CONNECT"]),
)
def test_response_fast_path_agrees_with_the_line_parser(line, fields, method):
    data = b"\r\n".join([line, *fields]) + b"\r\n\r\nbody"
    assert _outcome(parse_response_head, data, method) == _outcome(_line_by_line_response, data, method)


def test_fields_are_parsed_only_when_asked_for():
    head = parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\nX-Dev: alice \r\n\r\n")
    assert head._headers is None
    assert head.headers == [(b"host", b"x"), (b"x-dev", b"alice")]


def test_a_head_that_arrives_in_pieces_is_parsed_line_by_line():
    data = b"GET / HTTP/1.1\r\nHost: x\r\nX-Dev: alice\r\n\r\n"
    assert parse_request_head(data[:20]) is None
    head = parse_request_head(data, 0, 20)
    assert head.headers == [(b"host", b"x"), (b"x-dev", b"alice")] and head.size == len(data)
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"GET", 0, 10).length == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([b"X-Dev: alice", b"x-dev:\tbob \t", b"X-Dev-2: c", b"baggage: a=b",
                                 b"BAGGAGE:", b"x-devx: d", b"Xx-dev: e"]), max_size=6),
       st.frozensets(st.sampled_from([b"x-dev", b"baggage", b"host", b"x-dev-2"]), max_size=3),
       st.booleans())
def test_fields_by_name_are_the_headers_with_those_names(lines, names, built):
    data = b"\r\n".join([b"GET / HTTP/1.1", b"Host: h", *lines]) + b"\r\n\r\n"
    head = parse_request_head(data)
    expected = [f for f in http1._parse_request_lines(data, 0, 0).headers if f[0] in names]
    if built:
        head.headers  # noqa: B018  (the list is built first: fields filters it)
    assert head.fields(names) == expected


def test_answers_counts_each_complete_response_however_the_bytes_are_split():
    from intercept.routing.http1 import Answers

    stream = (b"HTTP/1.1 100 Continue\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
              b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"  # to a HEAD: no body
              b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
              b"HTTP/1.1 204 No Content\r\n\r\n")
    for size in (1, 7, len(stream)):
        answers = Answers()
        for method in (b"POST", b"HEAD", b"GET", b"DELETE"):
            answers.expect(method)
        counted = sum(answers.feed(stream[i:i + size]) for i in range(0, len(stream), size))
        assert counted == 4 and not answers.methods


def test_answers_end_a_response_delimited_by_the_close_and_refuse_one_to_no_request():
    from intercept.routing.http1 import Answers

    answers = Answers()
    answers.expect(b"GET")
    assert answers.feed(b"HTTP/1.0 200 OK\r\n\r\nuntil the close") == 0
    assert answers.closed() == 1
    with pytest.raises(ProtocolError):
        answers.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
