"""Stand-ins for time and the event loop that a test moves by hand: ``time`` whose
``monotonic`` it sets, and a loop whose ``call_soon`` callbacks it runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Clock:
    """``time`` as a module that imports it sees it, with ``monotonic`` moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


class FakeLoop:
    """An event loop's ``call_soon`` only: a queue that the test runs as one loop iteration."""

    def __init__(self) -> None:
        self.queued: list[Callable[[], Any]] = []

    def call_soon(self, callback: Callable[[], Any]) -> None:
        self.queued.append(callback)

    def end_iteration(self) -> None:
        queued, self.queued = self.queued, []
        for callback in queued:
            callback()
