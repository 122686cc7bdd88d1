"""Run ``intercept ARGS...`` with what-if changes applied: ``python bench/whatif.py CHANGES ARGS...``.

For ``bench/run.py --what-if CHANGES`` only: each change is a measurement of a possible
fix, applied from outside the package, so that its gain can be seen before anyone
writes it properly. This is not how intercept runs. CHANGES is a comma-separated list:

  uvloop      use uvloop in this process (the agent already does; the client does not)
  no-ignore   asyncssh (2.24) sends an SSH_MSG_IGNORE before every packet once keys are
              in use (connection.py, SSHConnection.send_packet): one more encryption,
              os.urandom and transport write per channel data packet. Skip it.
  gc-log      change nothing; at exit, write to stderr how many collections of each
              generation ran and how long they took (measurement only)
  none        nothing (the same code path, for a fair comparison)
"""

from __future__ import annotations

import sys


def apply(changes: set[str]) -> None:
    unknown = changes - {"uvloop", "no-ignore", "gc-log", "none"}
    if unknown:
        sys.exit(f"whatif: unknown change(s) {sorted(unknown)}")
    if "uvloop" in changes:
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if "no-ignore" in changes:
        from asyncssh.connection import MSG_IGNORE, SSHConnection
        from asyncssh.packet import String

        original = SSHConnection.send_packet
        empty = String(b"")

        def send_packet(self, pkttype, *args, handler=None):  # type: ignore[no-untyped-def]
            if pkttype == MSG_IGNORE and args == (empty,):
                return None
            return original(self, pkttype, *args, handler=handler)

        SSHConnection.send_packet = send_packet  # type: ignore[method-assign]
    if "gc-log" in changes:
        _log_gc()


def _log_gc() -> None:
    import atexit
    import gc
    import time

    stats: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started: list[float] = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            stats[info["generation"]].append(time.perf_counter() - started[0])

    def report() -> None:
        for gen, times in stats.items():
            if times:
                print(
                    f"whatif: gc generation {gen}: {len(times)} collections, total {sum(times) * 1e3:.1f} ms, "
                    f"max {max(times) * 1e3:.2f} ms; objects tracked now {len(gc.get_objects(gen))}",
                    file=sys.stderr,
                )

    gc.callbacks.append(callback)
    atexit.register(report)


if __name__ == "__main__":
    changes = set(sys.argv[1].split(","))
    apply(changes)
    from intercept.cli import main

    sys.argv = ["intercept", *sys.argv[2:]]
    main()
