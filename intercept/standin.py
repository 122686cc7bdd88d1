"""``intercept stand-in NAME``: what a replaced app container runs (``intercept start --replace``).

It does nothing until SIGTERM or SIGINT, then exits 0 at once, so a pod that goes (the
developer left, the app comes back) is not held for its grace period as a process that
ignores SIGTERM would hold it (PID 1 has no default action for it). It runs from the agent
image, which is on the node already and has it whatever the app's image holds.
"""

from __future__ import annotations

import signal
from collections.abc import Callable


def stand_in(developer: str, say: Callable[[str], None]) -> None:
    """Say whose local process takes the app's place, then wait for SIGTERM or SIGINT."""
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # taken by sigwait, never by a handler
    say(f"intercept: stand-in: the app container is replaced by {developer}'s local process "
        "(intercept start --replace); the app runs again when they leave")
    signal.sigwait(signals)
