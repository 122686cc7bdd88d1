"""``intercept start`` as a Python API: the intercept and, optionally, the local process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Collection, Sequence

from intercept.client.fleet import Fleet, Replica
from intercept.client.runner import LocalProcess
from intercept.client.session import Event, InterceptOptions, keep_intercepting


def default_name() -> str:
    """``--name`` default: the local part of ``git config user.email``, else ``$USER``."""
    try:
        email = subprocess.run(
            ["git", "config", "user.email"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        email = ""
    name = email.split("@", 1)[0] if email else os.environ.get("USER") or os.environ.get("USERNAME") or "developer"
    return name


async def start(
    options: InterceptOptions,
    command: Sequence[str] = (),
    report: Callable[[Event], None] = lambda event: None,
    replicas: AsyncIterator[Collection[Replica]] | None = None,
) -> int:
    """Intercept until SIGINT/SIGTERM (exit 0) or until COMMAND exits (its exit code).

    Raises the typed errors of the first connection (unreachable, authentication, host
    key, conflict). With ``replicas`` (each item: the current set of agent replicas),
    the route is held on every replica (:class:`~intercept.client.fleet.Fleet`) and
    ``options.transport`` is not dialled; without, on the one agent ``options.transport``.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    process: LocalProcess | None = None
    if command:
        process = LocalProcess(command)
        await process.start()
    if replicas is None:
        intercepting = asyncio.ensure_future(keep_intercepting(options, report, stop))
    else:
        intercepting = asyncio.ensure_future(Fleet(options, report).run(replicas, stop))
    exited = asyncio.ensure_future(process.wait()) if process else None
    try:
        waits = [intercepting] + ([exited] if exited else [])
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if exited is not None and exited.done():
            code = exited.result()
            report(Event("exited", f"{command[0]} exited with status {code}"))
            stop.set()
            await intercepting
        else:
            intercepting.result()  # raise the intercept's error, if any
        return code
    finally:
        if not intercepting.done():
            stop.set()
            await asyncio.gather(intercepting, return_exceptions=True)
        if process is not None:
            await process.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
