"""Typed errors that carry their fix.

Every error a user can cause or meet is an :class:`InterceptError` subclass with a
message that names the object and says what to do, and a distinct exit code that the
CLI returns (listed in the README). Library code raises them; only the CLI prints them.
"""

from __future__ import annotations


class InterceptError(Exception):
    """Base class: ``str(error)`` is one readable line that names the object and the fix."""

    exit_code = 1


class UsageError(InterceptError):
    """A flag, rule or option value is malformed."""

    exit_code = 2


class FenceRefused(UsageError):
    """A destination named at start (``--forward``) that the agent's outbound fence refuses."""


class AgentUnreachable(InterceptError):
    """The agent's SSH port could not be reached."""

    exit_code = 3


class AuthenticationFailed(InterceptError):
    """The agent refused the access token."""

    exit_code = 4


class HostKeyMismatch(InterceptError):
    """The agent's host key is not the pinned one: possibly an impersonation."""

    exit_code = 5


class RouteConflict(InterceptError):
    """Another session already holds the same rule set (or all traffic)."""

    exit_code = 6

    def __init__(self, message: str, holder: str | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class UnverifiedPush(InterceptError):
    """A pushed routes document that the agent cannot verify was signed by the namespace's
    routes authority (no authority in its routes file, no signature, or a wrong one)."""


class CredentialsError(InterceptError):
    """The credentials file is missing or unreadable."""

    exit_code = 7


class CommandFailed(InterceptError):
    """The local COMMAND could not be started."""

    exit_code = 8


class ResolveError(InterceptError):
    """A Service does not lead to exactly one workload, container and port."""

    exit_code = 9


class InjectError(InterceptError):
    """The agent cannot be injected (or the originals restored) safely as asked."""

    exit_code = 10


class AgentSettingsDiffer(InterceptError):
    """A start (or env, files, ...) asked for a pod-wide setting (the agent image, outbound
    access, forwarded headers) other than the running agent's: one agent configuration
    serves every developer of a workload, and only an explicit ``intercept inject SERVICE``
    (or ``intercept start --reinject``) changes it. ``agent`` carries what reaches the
    running agent (an :class:`intercept.kube.apply.AgentInfo`), to say whom a change would
    interrupt."""

    exit_code = 13

    def __init__(self, message: str, agent: object = None, differences: tuple[tuple[str, str, str], ...] = ()) -> None:
        super().__init__(message)
        self.agent = agent
        self.differences = differences  # (flag, the running agent's value, the value asked for), in words


class NoAgent(InterceptError):
    """The Service has no agent, and the command does not inject one (env, files)."""

    exit_code = 14


class AgentRemoved(InterceptError):
    """An intercept's agent was removed (``intercept uninstall``) while it ran."""

    exit_code = 15


class AgentInUse(InterceptError):
    """``intercept uninstall`` without ``--force`` while developers hold routes on the agent."""

    exit_code = 16


class ReplaceRefused(InterceptError):
    """``intercept start --replace`` refused: another developer replaces the workload already,
    or developers hold routes on its agent (named in the message)."""

    exit_code = 17

    def __init__(self, message: str, holders: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.holders = holders


class ChecksFailed(InterceptError):
    """``intercept doctor``: at least one check failed (each failed line says its fix)."""

    exit_code = 12


class SpecError(UsageError):
    """``intercept.yaml``, a flag or an ``INTERCEPT_*`` variable holds an unknown key or a bad value.

    The message names the file and line (when the value came from a file), the key and
    the fix. ``path``, ``line`` (1-based) and ``key`` locate it for tools; each is ``None``
    when it does not apply.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.key = key
