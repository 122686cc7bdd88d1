"""This machine's intercepts: the registry of running ``intercept start`` processes, and
``intercept up`` / ``down`` for the intercepts of an ``intercept.yaml``.

The CLI (``up``, ``down``, ``status``, ``leave``, ``vscode``), CDE hooks and the tests
all call the functions here.

State lives in one directory (:func:`state_dir`: ``$INTERCEPT_STATE_DIR``, else
``$XDG_STATE_HOME/intercept``, else ``~/.local/state/intercept``), mode 0700:

- ``intercepts/PID.json``: one per running ``intercept start`` (:func:`register`).
- ``workspaces/ID.json``: one per workspace that ``up`` brought up (ID: a hash of the
  file's absolute path): the file, the digest of its resolved intercepts, the
  supervising process and each intercept's process. Beside it ``ID.lock`` (``up`` and
  ``down`` of one workspace take turns) and ``ID.log`` (the default ``--log-file``).

Every file is written atomically (a temporary file renamed over it), mode 0600.

Invariants:

- A process is named by its pid *and* its start time (``/proc/PID/stat``), so a pid
  reused by another process is never mistaken for ours, signalled or reported alive.
  A zombie counts as gone.
- A registry file whose process is gone is stale: :func:`entries` deletes it.
- ``up`` runs one supervisor per workspace: the ``up`` process itself in the foreground,
  or (``--detach``) a background copy of it in its own session, writing to the log
  file. The supervisor starts one ``intercept start`` child per intercept (each in its
  own session), relays their lines prefixed with ``[SERVICE]``, and stops them on
  SIGINT/SIGTERM. If one fails before every intercept is ready, the others are stopped
  and nothing is left running.
- ``up`` is idempotent: a workspace whose state records the same digest, whose
  supervisor and intercepts are all alive, is left alone ("already up").

Library code: lines go to the ``report`` callback, never to stdout (except for the
background supervisor, whose stdout is the log file).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from intercept.errors import UsageError
from intercept.spec import DEFAULT_FILE, load_workspace, merge, resolve_workspace, to_args
from intercept.vscode import write_vscode
from intercept.workspace.registry import (
    STATUS_FIELDS,
    Entry,
    NotRunning,
    Registration,
    WorkspaceState,
    entries,
    leave,
    register,
    state_dir,
    status,
    workspaces,
)
from intercept.workspace.supervisor import UpFailed, digest, down, up

__all__ = [
    "STATUS_FIELDS",
    "Entry",
    "NotRunning",
    "Registration",
    "UpFailed",
    "WorkspaceState",
    "digest",
    "down",
    "entries",
    "leave",
    "register",
    "state_dir",
    "status",
    "up",
    "vscode",
    "workspaces",
]


def vscode(services: Sequence[str], *, directory: Path, spec_file: Path | None = None,
           env: Mapping[str, str] | None = None, command: Sequence[str] = (),
           flags: Mapping[str, object] | None = None) -> list[Path]:
    """``.vscode/launch.json`` and ``tasks.json`` in ``directory`` for ``services``.

    Each task runs ``intercept start SERVICE --debug ...``, which needs a COMMAND to run
    under the debugger: ``command`` (what followed ``--``) for every service, else the
    ``command`` of the service's intercept in ``spec_file`` (default
    ``directory/intercept.yaml``), whose other options the task then passes too. With no
    service: the services of ``spec_file``. A service left without a command is refused
    with the fix, before anything is written (such a task could only fail at once).
    ``flags`` (options keyed as in the file, those ``intercept vscode`` was given) are
    written into every task, over the file's.
    Returns the files written (see :func:`~intercept.vscode.write_vscode`).
    """
    spec_file = directory / DEFAULT_FILE if spec_file is None else spec_file
    env = dict(os.environ if env is None else env)
    specs = []
    if spec_file.exists():
        specs = [spec for spec in resolve_workspace(load_workspace(spec_file, env), env, flags or {}).intercepts
                 if spec.service]
    elif not services:
        raise UsageError(f"name the services to debug, e.g. intercept vscode orders -- python app.py, "
                         f"or run it where an {DEFAULT_FILE} lists them")
    if not services:
        if not specs:
            raise UsageError(f"{spec_file}: no intercept names a service; name the services: intercept vscode SERVICE ...")
        services = [spec.service for spec in specs]  # type: ignore[misc]
    by_service = {spec.service: spec for spec in specs}
    skip = ("service", "debug", "debug_port", "debug_wait")
    start_args: dict[str, list[str]] = {}
    missing: list[str] = []
    for service in services:
        spec = by_service.get(service) or (merge(None, {}, {**flags, "service": service}) if flags else None)
        if command:
            start_args[service] = [*(to_args(spec, skip=(*skip, "command")) if spec else []), "--", *command]
        elif spec is not None and spec.command:
            start_args[service] = to_args(spec, skip=skip)
        else:
            missing.append(service)
    if missing:
        where = f"and {spec_file} gives none" if spec_file.exists() else f"and there is no {DEFAULT_FILE}"
        raise UsageError(
            f"no command to debug for {', '.join(missing)}: the task runs intercept start --debug, which needs "
            f"the command after --, {where}; write it: intercept vscode {' '.join(services)} -- python app.py"
        )
    return write_vscode(directory, services, start_args=start_args)
