"""The local process: COMMAND started in its own process group, stopped with it on leaving."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping, Sequence

from intercept.errors import CommandFailed

log = logging.getLogger(__name__)


class LocalProcess:
    """COMMAND as a child process group; :meth:`stop` ends the whole group (TERM, then KILL)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(*self.argv, env=self.env, start_new_session=True)
        except OSError as e:
            raise CommandFailed(f"cannot run {self.argv[0]!r}: {e.strerror or e}; check the command after --") from None
        log.info("started %s (pid %s)", self.argv, self.proc.pid)

    async def wait(self) -> int:
        return await self.proc.wait()

    async def stop(self, grace: float = 5.0) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                return await asyncio.wait_for(self.proc.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("%s did not stop within %ss; killing it", self.argv[0], grace)
        return await self.proc.wait()
