"""Every script in bench/ runs to the end and prints its table, at its quickest settings.

A benchmark that nobody runs rots: bench/grpc.py once crashed on main for days after a
helper it shares with bench/run.py changed. These tests only run each one briefly and read
its output's shape; how fast anything is lives in bench/README.md, not here (no timing
thresholds). The scripts find their own tools; what they need is installed by .ci/run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

# Each script's quickest settings: one short row of each kind, small bodies, no waiting for a
# quiet machine, no retries.
QUICK = {
    "run.py": ["--quick", "-d", "1", "--warmup", "1", "--retries", "0", "--quiet-wait", "0", "--other-routes", "3",
               "--open-connections", "5", "--body-mb", "1", "--bulk-runs", "1"],
    "grpc.py": ["-d", "1", "--warmup", "1", "-c", "8", "--quiet-wait", "0"],
    "carrier.py": ["-d", "1", "--warmup", "1", "--repeat", "1", "--quiet-wait", "0", "--body-mb", "1"],
    "reload.py": ["--rounds", "1"],
    "access.py": ["--rounds", "3", "--megabytes", "1"],
    "cycle.py": ["--n", "200", "--reps", "1"],
    "wan.py": ["--quick"],
}
NEEDS = {
    "run.py": ["wrk", "nginx", "haproxy", "curl", "taskset"],
    "grpc.py": ["h2load", "nginx", "taskset"],
    "carrier.py": ["wrk", "nginx", "curl", "ssh", "ssh-keygen", "taskset"],
    "wan.py": ["ip", "wrk", "curl", "nginx", "ssh", "ssh-keygen"],
}
# What each prints when it completes: its table's rows (or its result lines)
PRINTS = {
    "run.py": ["| row | req/s | vs nginx |", "| (b) nginx map routing |", "| (h) HAProxy ACL routing |",
               "| (c) agent, no header |", "| (c100) agent, no header, 100 other routes |",
               "| (cstd) agent on asyncio (no uvloop), no header |", "| (d) agent, x-dev: alice -> SSH |",
               "| 1 MiB body, median of 1 | GET (download) MB/s |", "| target | measured | met |"],
    "grpc.py": ["| row | req/s | vs nginx |", "| (b) nginx grpc_pass + map |", "| (c0) agent, no route registered (relay) |",
                "| (c) agent, route registered, not matched |", "| (d) agent, x-dev: alice -> SSH |"],
    "carrier.py": ["| row | req/s | vs nginx |", "| (b) nginx map routing |",
                   "| (d) agent -> asyncssh -> intercept start (as shipped) |",
                   "| (o) what-if: agent -> OpenSSH (sshd, ssh -R) -> local app |", "| 1 MiB body, median of 3 |"],
    "reload.py": ["reload latency over 1 saves", "target <= 500 ms:"],
    "cycle.py": ["µs per request cycle: "],
    "wan.py": ["### Profile A: 40 ms RTT, 100 Mbit/s", "| measure | direct (floor) | intercept | OpenSSH carrier |",
               "| warm keep-alive GET, ms: floor p50 / p99, others extra over it |", "share of link rate |",
               "| the same 50 during a download: p99 ms, vs the floor's |", "link outage under routed load"],
}


def test_every_script_in_bench_is_run_here() -> None:
    helpers = {"routes.py": "run.py's row (c100)", "whatif.py": "its own test below"}
    assert {p.name for p in BENCH.glob("*.py")} == set(QUICK) | set(helpers)


def _run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    for tool in NEEDS.get(script, []):
        if shutil.which(tool) is None:
            pytest.skip(f"bench/{script} needs {tool} (.ci/run installs it)")
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=BENCH.parent, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"bench/{script} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.mark.parametrize("script", sorted(QUICK))
def test_a_bench_script_completes_and_prints_its_table(script: str) -> None:
    if script in ("carrier.py", "wan.py") and not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        pytest.skip(f"bench/{script} needs sshd (.ci/run installs openssh-server)")
    done = _run(script, *QUICK[script])
    if script == "access.py":
        figures = json.loads(done.stdout)
        assert {"first_byte_direct_ms", "first_byte_tunnel_ms", "mb_per_s_tunnel"} <= set(figures), figures
        return
    expected = list(PRINTS[script])
    if script == "run.py" and shutil.which("go"):
        expected.append("| (g) Go net/http ReverseProxy routing |")  # built with the machine's Go
    for line in expected:
        assert line in done.stdout, f"bench/{script} did not print {line!r}:\n{done.stdout}\n{done.stderr[-3000:]}"


def test_the_what_if_changes_still_apply_to_the_installed_packages() -> None:
    # bench/whatif.py patches asyncssh from outside for run.py --what-if; a rename there must show here
    done = _run("whatif.py", "uvloop,no-ignore,gc-log", "--version", timeout=120)
    assert done.stdout.startswith("intercept"), done.stdout
