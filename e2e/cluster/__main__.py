"""``python -m e2e.cluster``: build the binaries and images, or run a local cluster by hand.

    python -m e2e.cluster build                 build (or reuse) the binaries; print where they are
    python -m e2e.cluster images                build (or reuse) the node's images (e2e/cluster/images.py)
    python -m e2e.cluster up --state DIR        start everything; print
                                                ``cluster: ready: kubeconfig DIR/kubeconfig``;
                                                run until Ctrl-C or SIGTERM, then tear it all down
    python -m e2e.cluster pin-kubernetes V      regenerate kube/go.mod for Kubernetes V (v1.37.2)

Every line it prints starts with ``cluster: ``. Exit codes: 0 done, 1 failed,
3 cannot run here (not root, or a tool missing: the line names its Debian package).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from e2e.cluster import images, node
from e2e.cluster.build import BuildFailed, BuildUnavailable, ensure_binaries, pin_kubernetes
from e2e.cluster.controlplane import StartFailed
from e2e.cluster.harness import Harness


def say(line: str) -> None:
    print(f"cluster: {line}", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build or reuse the binaries")
    commands.add_parser("images", help="build or reuse the node's images")
    up = commands.add_parser("up", help="run a cluster until Ctrl-C or SIGTERM")
    up.add_argument("--state", required=True, type=Path, help="directory for the kubeconfig, PKI, logs and pods")
    up.add_argument("-v", "--verbose", action="store_true")
    pin = commands.add_parser("pin-kubernetes", help="regenerate kube/go.mod for a Kubernetes release")
    pin.add_argument("version")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(options, "verbose", False) else logging.WARNING,
                        format="cluster: %(levelname)s %(name)s: %(message)s")
    try:
        if options.command == "build":
            binaries = ensure_binaries(say)
            say(f"binaries: {binaries.dir}")
            return 0
        if options.command == "images":
            missing = images.unavailable()
            if missing:
                raise BuildUnavailable(missing)
            for built in images.Images(ensure_binaries(say), say).ensure():
                say(f"images: {built.name}: {built.archive}")
            return 0
        if options.command == "pin-kubernetes":
            pin_kubernetes(options.version, say)
            return 0
        return _up(options.state)
    except BuildUnavailable as error:
        say(f"error: {error}")
        return 3
    except (BuildFailed, StartFailed, OSError, TimeoutError) as error:
        say(f"error: {error}")
        return 1


def _up(state: Path) -> int:
    missing = node.unavailable() or images.unavailable()  # refused now, not half-way through the start
    if missing:
        raise BuildUnavailable(f"cannot run a node here: {missing}")
    stop = threading.Event()
    running = False

    def interrupt(signum: int, frame: object) -> None:
        if not running:  # still starting: abandon the start; the harness tears down what it began
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    state.mkdir(parents=True, exist_ok=True)
    try:
        with Harness(state, say) as harness:
            running = True
            say(f"ready: kubeconfig {harness.kubeconfig}")
            stop.wait()
            say("stopping")
    except KeyboardInterrupt:
        say("interrupted while starting; stopped")
        return 1
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
