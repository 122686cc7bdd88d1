"""What if OpenSSH carried the routed path? ``python bench/carrier.py`` (needs sshd and ssh).

A measurement for issue 11's (d) target, not a way intercept runs. Row (d) of
``bench/run.py`` is the routed path as shipped: wrk -> agent -> asyncssh channel ->
``intercept start`` -> local app. Row (o) replaces the SSH hop with OpenSSH, in C:
an ``sshd`` in the "pod" (CPU 0, beside the agent) and ``ssh -R`` on the "laptop"
(CPU 1, beside wrk and the local app); the agent's upstream is the port sshd forwards,
so each request takes the agent's own path (head parsed, routes asked, forwarded) and
then OpenSSH's channel to the local app. Both rows use aes128-gcm@openssh.com, what two
intercept ends negotiate. Row (b) is nginx routing to the upstream app beside it on CPU 0,
as in ``run.py`` (the yardstick of the targets), measured in the same run.

    apt-get install -y openssh-server openssh-client wrk nginx-light curl
    python bench/carrier.py              # 3 interleaved rounds of 10 s rows, then bulk
    python bench/carrier.py --quick      # 3 s rows

The ``ssh`` session holds a pseudo-terminal (``-tt``) so that both OpenSSH ends set
TCP_NODELAY, as they do for an interactive session; without it (``-N``) sshd's writes
wait for delayed ACKs and p99 is 40 ms. Prints a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # bench/ is not a package
    HEADER,
    PROXY,
    Pinning,
    Procs,
    big_file,
    curl_bulk,
    free_port,
    http_get,
    log,
    median,
    wait_port,
    wait_quiet,
    wrk,
)

ROWS = {"b": "(b) nginx map routing", "d": "(d) agent -> asyncssh -> intercept start (as shipped)",
        "o": "(o) what-if: agent -> OpenSSH (sshd, ssh -R) -> local app"}
PROXY.update({"o": ["agent_o", "sshd", "ssh"]})
CIPHER = "aes128-gcm@openssh.com"


def openssh(procs: Procs, forward_to: int) -> int:
    """sshd on the pod's CPU and ``ssh -R`` on the laptop's; returns the port sshd forwards."""
    tmp, sshd = procs.tmp, shutil.which("sshd") or "/usr/sbin/sshd"
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
    (tmp / "authorized_keys").write_text((tmp / "user.pub").read_text())
    port, forwarded = free_port(), free_port()
    (tmp / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\nHostKey {tmp / 'host'}\nAuthorizedKeysFile {tmp / 'authorized_keys'}\n"
        f"PidFile {tmp / 'sshd.pid'}\nCiphers {CIPHER}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation directory
    daemon = procs.spawn([sshd, "-D", "-e", "-f", str(tmp / "sshd_config")], "pod", stderr=procs.logfile("sshd.log"))
    wait_port(port)
    client = procs.spawn(
        ["ssh", "-tt", "-c", CIPHER, "-i", str(tmp / "user"), "-p", str(port), "-o", "StrictHostKeyChecking=no",
         "-o", f"UserKnownHostsFile={tmp / 'known_hosts'}", "-o", "ExitOnForwardFailure=yes",
         "-R", f"127.0.0.1:{forwarded}:127.0.0.1:{forward_to}", "root@127.0.0.1", "sleep 1000000"],
        "dev", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=procs.logfile("ssh.log"),
    )  # fmt: skip
    wait_port(forwarded, 20)
    procs.watch.update(sshd=daemon.pid, ssh=client.pid)
    return forwarded


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", "--duration", type=float, help="seconds per row (default 10, 3 with --quick)")
    ap.add_argument("-c", "--connections", type=int, default=16)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 s rows (unless -d says)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of wrk before each row (default 1)")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="seconds to wait, before each row, for other processes to calm down (default 30)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; each row reports its fastest")
    ap.add_argument("--body-mb", type=int, default=100)
    ap.add_argument("--no-bulk", action="store_true")
    args = ap.parse_args()
    args.connection_close = False
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    for tool in ("wrk", "nginx", "curl", "ssh", "ssh-keygen", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"carrier: {tool} is not on PATH")
    if not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        sys.exit("carrier: sshd is not installed (apt-get install -y openssh-server)")
    pin = Pinning("0", "1") if (os.cpu_count() or 1) >= 2 else Pinning()
    procs = Procs(Path(tempfile.mkdtemp(prefix="intercept-carrier-")), pin)
    try:
        return run(procs, args)
    finally:
        procs.stop_all()
        shutil.rmtree(procs.tmp, ignore_errors=True)


def run(procs: Procs, args: argparse.Namespace) -> int:
    from intercept.credentials import Credentials

    big = big_file(procs.tmp, args.body_mb)
    up_port, local_port, router_port = free_port(), free_port(), free_port()
    procs.app("upstream", up_port, big)
    procs.app("local", local_port, big)
    router = procs.router(router_port, up_port, local_port)
    credentials = procs.tmp / "agent-credentials.json"
    credentials.write_text(Credentials.generate().to_json())
    credentials.chmod(0o600)
    agent, agent_port, ssh_port, _ = procs.agent(up_port)
    client = procs.client(ssh_port, local_port)
    forwarded = openssh(procs, local_port)
    agent_o, agent_o_port, _, _ = procs.agent(forwarded)
    procs.watch.update(router=router.pid, agent=agent.pid, client=client.pid, agent_o=agent_o.pid)
    ports = {"b": router_port, "d": agent_port, "o": agent_o_port}
    # (b) as in run.py: nginx routing to the upstream beside it; (o)'s agent has no route, its upstream is the laptop
    header = {"b": False, "d": True, "o": False}
    for row, port in ports.items():
        _, app, _ = http_get(port, "/", dict([HEADER]) if header[row] else {})
        if app != ("upstream" if row == "b" else "local"):
            raise RuntimeError(f"row {row} reached {app!r}")

    best = {}
    for rnd in range(args.repeat):
        for row, port in ports.items():
            wait_quiet(procs, 2.5, args.quiet_wait)
            if args.warmup > 0:
                wrk(procs, port, args, args.warmup, header[row])
            res = wrk(procs, port, args, args.duration, header[row])
            log(f"round {rnd + 1} {ROWS[row]}: {res.rps:.0f} req/s, p50 {res.p50:.2f} ms, others {res.other_cpu:.0f}%")
            if row not in best or res.rps > best[row].rps:
                best[row] = res
    bulk = {}
    if not args.no_bulk:
        for row in ("d", "o"):
            for direction in ("get", "post"):
                runs = [curl_bulk(procs, ports[row], direction, header[row], big, "local") for _ in range(3)]
                bulk[row, direction] = median(runs)

    nginx = best["b"].rps
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, best of {args.repeat} rounds; "
          f"{procs.pin.describe()}; cipher {CIPHER}\n")
    print("| row | req/s | vs nginx | p50 ms | p99 ms | CPU µs/req | of which |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row, res in best.items():
        parts = ", ".join(f"{n} {res.cpu[n] / 100 / res.rps * 1e6:.0f}" for n in PROXY[row])
        print(f"| {ROWS[row]} | {res.rps:,.0f} | {res.rps / nginx:.2f}x | {res.p50:.2f} | {res.p99:.2f} | "
              f"{res.proxy_us(row):.0f} | {parts} |")
    if bulk:
        print(f"\n| {args.body_mb} MiB body, median of 3 | GET MB/s | POST MB/s |\n|---|---:|---:|")
        for row in ("d", "o"):
            print(f"| {ROWS[row]} | {bulk[row, 'get']:,.0f} | {bulk[row, 'post']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
