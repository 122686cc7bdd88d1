"""Stand-ins the SSH tests share: ``time`` whose ``monotonic`` the test sets, a loop whose
``call_soon`` callbacks it runs by hand, and an SSH server that lets anyone log in."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import asyncssh


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


class AnyLogin(asyncssh.SSHServer):
    """An SSH server that takes any user and password: the tests' far end of a connection."""

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return True
