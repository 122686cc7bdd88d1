"""The README's first command: the demo runs without a cluster and proves the routing."""

import subprocess
import sys


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
