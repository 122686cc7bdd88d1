"""The README's first command: the demo runs without a cluster and proves the routing."""

import re
import signal
import subprocess
import sys

from tests.conftest import INTERCEPT, Proc
from tests.grpc_apps import channel, unary

MINE = [("x-intercept-id", "demo-dev")]


def test_demo_routes_every_request_where_it_should():
    out = subprocess.run([sys.executable, "-m", "intercept", "demo"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "intercept: demo: 8/8 requests landed where they should" in out.stdout
    assert "WRONG" not in out.stdout


def test_an_interrupted_demo_does_not_report_success():
    from intercept.demo import run_demo

    lines = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("local version on"):
            raise KeyboardInterrupt  # Ctrl-C while the demo is still setting up

    assert run_demo(echo) is False
    assert lines[-1] == "intercept: demo: interrupted before every request was sent; nothing was shown"


def test_grpc_demo_routes_every_call_on_one_connection_where_it_should():
    out = subprocess.run([*INTERCEPT, "demo", "--grpc"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "intercept: demo: 10/10 gRPC calls landed where they should" in out.stdout
    assert "WRONG" not in out.stdout
    # rows: #, batch, stream, metadata, expected, answered by, grpc-status, ok
    rows = re.findall(r"^\d+\s+\d+\s+\d+\s+.+?\s+(\w+)\s+(\w+)\s+(\d+)\s+ok$", out.stdout, re.M)
    assert len(rows) == 10
    assert {answered for _, answered, _ in rows} == {"local", "cluster"}
    assert {status for _, _, status in rows} == {"0"}


def test_grpc_demo_reports_calls_that_land_on_the_wrong_version(monkeypatch):
    from intercept import demo_grpc
    from intercept.demo import run_demo

    serve = demo_grpc.serve_app
    monkeypatch.setattr(demo_grpc, "serve_app", lambda name: serve("cluster"))  # as if nothing were routed
    lines = []
    assert run_demo(lines.append, grpc=True) is False
    assert "intercept: demo: 5/10 gRPC calls landed where they should" in lines
    assert sum(line.endswith("WRONG") for line in lines) == 5


def test_kept_grpc_demo_routes_a_grpcio_client_by_its_metadata():
    demo = Proc([*INTERCEPT, "demo", "--grpc", "--keep"])
    try:
        port = int(demo.wait_for(r"^try: curl .*http://127\.0\.0\.1:(\d+)/")[1])
        ch = channel(port)
        try:
            response, _, _ = unary(ch, b"which?", MINE)
            assert response == b"local version"
            assert unary(ch, b"which?")[0] == b"cluster version"
            assert unary(ch, b"which?", [("x-intercept-id", "someone-else")])[0] == b"cluster version"
            # several calls in flight at once on the channel's one connection
            call = ch.unary_unary("/test.Echo/Unary")
            futures = [call.future(b"which?", metadata=MINE if i % 2 else None, timeout=30) for i in range(10)]
            expected = [b"local version" if i % 2 else b"cluster version" for i in range(10)]
            assert [f.result() for f in futures] == expected
        finally:
            ch.close()
        demo.signal(signal.SIGINT)  # Ctrl-C: the demo stops with its table's verdict
        assert demo.finish() == 0, demo.output
    finally:
        demo.stop()


def test_mirror_demo_shows_the_app_answering_and_which_copies_reached_the_developer():
    out = subprocess.run([*INTERCEPT, "demo", "--mirror"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("intercept: demo: 8/8 requests answered by the cluster version with their copies where they should be "
            "(the agent counts 4 copied, 0 dropped)") in out.stdout
    rows = re.findall(r"^\d+\s+(fresh|keep-alive)\s+.+?\s+(\w+)\s+(yes|no)\s+(yes|no)\s+ok$", out.stdout, re.M)
    assert len(rows) == 8 and {answered for _, answered, _, _ in rows} == {"cluster"}
    assert sum(reached == "yes" for *_, reached in rows) == 4
