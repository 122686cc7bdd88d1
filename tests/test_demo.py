"""The README's first command: the demo runs without a cluster and proves the routing."""

import subprocess
import sys


def test_demo_routes_every_request_where_it_should():
    out = subprocess.run([sys.executable, "-m", "intercept", "demo"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "intercept: demo: 8/8 requests landed where they should" in out.stdout
    assert "WRONG" not in out.stdout
