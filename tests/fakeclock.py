"""A stand-in for the ``time`` module whose ``monotonic`` a test moves by hand."""

from __future__ import annotations

import time


class Clock:
    """``time`` as a module that imports it sees it, with ``monotonic`` moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)
