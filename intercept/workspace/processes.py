"""Processes of this machine's intercepts, named by pid *and* start time.

A pid reused by another process is never mistaken for ours, signalled or reported alive
(the start time in ``/proc/PID/stat`` differs); a zombie counts as gone.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL


_HAS_PROC = Path("/proc/self/stat").exists()


def _process_start(pid: int) -> str | None:
    """The start time of live process ``pid`` (clock ticks since boot), ``""`` where
    there is no /proc to tell, ``None`` when there is no such process or it is a zombie."""
    if pid <= 0:
        return None
    if not _HAS_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "PID (COMM) STATE ... field 22 = starttime"; COMM may hold spaces and parentheses.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` is still the process that started at ``started``."""
    now = _process_start(pid)
    return now is not None and (not started or not now or now == started)


def _send(pid: int, started: str | None, sig: int, *, group: bool = False) -> None:
    """Signal ``pid`` (its process group with ``group``, when it leads one), only if it is still ours."""
    if not _alive(pid, started):
        return
    try:
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _pause_for_exit(pid: int, timeout: float) -> None:
    """Return when ``pid`` exits or after ``timeout`` (a pidfd where the OS has them)."""
    try:
        fd = os.pidfd_open(pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        time.sleep(min(timeout, 0.05))
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def _wait_gone(processes: Sequence[tuple[int, str | None]], timeout: float) -> list[int]:
    """Wait until every ``(pid, start)`` is gone, at most ``timeout`` s; the pids still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [(pid, started) for pid, started in processes if _alive(pid, started)]
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            return [pid for pid, _ in alive]
        _pause_for_exit(alive[0][0], min(left, 1.0))


def _stop(processes: Sequence[tuple[int, str | None]], grace: float = STOP_GRACE) -> list[int]:
    """SIGTERM, wait ``grace``, then SIGKILL (the process group of a group leader): the pids that needed SIGKILL."""
    for pid, started in processes:
        _send(pid, started, signal.SIGTERM)
    stubborn = _wait_gone(processes, grace)
    killed = [(pid, started) for pid, started in processes if pid in stubborn]
    for pid, started in killed:
        log.warning("pid %d did not stop within %gs of SIGTERM; killing it", pid, grace)
        _send(pid, started, signal.SIGKILL, group=True)
    _wait_gone(killed, grace)
    return stubborn

