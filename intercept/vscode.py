"""``.vscode/launch.json`` and ``.vscode/tasks.json`` for debugging an intercepted service.

Per service, two entries, both found again by their name:

- a background task ``intercept: SERVICE`` running ``intercept start SERVICE --debug
  --debug-port N ...``, whose problem matcher is *active* from ``intercept: starting:``
  (or ``reloading:``) until ``intercept: ready:`` (or ``reloaded:``), the stable lines
  the CLI prints (:data:`BACKGROUND_BEGINS`, :data:`BACKGROUND_ENDS`);
- a debugpy ``attach`` configuration ``intercept: attach SERVICE`` on 127.0.0.1:N whose
  ``preLaunchTask`` is that task, so VS Code attaches once requests flow.

The files are merged, not overwritten: other configurations and tasks, their order and
other top-level keys are kept; only our own entries (matched by name) are replaced.
VS Code reads these files as JSONC (comments, trailing commas); we read them the same
way but write plain JSON, so comments are lost: when a file had comments, its original
is kept beside it as ``launch.json.bak`` / ``tasks.json.bak``. Writing twice gives the
same files (nothing is rewritten when nothing changes).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from intercept.errors import UsageError

__all__ = [
    "BACKGROUND_BEGINS",
    "BACKGROUND_ENDS",
    "ERROR_PATTERN",
    "attach_configuration",
    "launch_name",
    "parse_jsonc",
    "start_task",
    "task_label",
    "write_vscode",
]

# The CLI's stable lines, as the task's problem matcher sees them. The CLI prints the
# first kind when it begins connecting or restarting the local process and the second
# when routed requests reach it (``intercept: ready: requests with x-dev: alice now
# reach localhost:8080``). JavaScript and Python read these patterns alike.
BACKGROUND_BEGINS = r"^intercept: (starting|reloading):"
BACKGROUND_ENDS = r"^intercept: (ready|reloaded):"
# Errors (``intercept: error: ...``) become problems, so that VS Code says the
# preLaunchTask failed instead of attaching to nothing. VS Code insists on a "file"
# group: "intercept" is the resource the Problems panel lists the message under.
ERROR_PATTERN = r"^(intercept): error: (.*)$"

LAUNCH_VERSION = "0.2.0"
TASKS_VERSION = "2.0.0"


def launch_name(service: str) -> str:
    """The name of our attach configuration for ``service``."""
    return f"intercept: attach {service}"


def task_label(service: str) -> str:
    """The label of our background task for ``service``."""
    return f"intercept: {service}"


def attach_configuration(service: str, *, debug_port: int = 5678, local_root: str = "${workspaceFolder}",
                         remote_root: str = ".") -> dict[str, object]:
    """The debugpy attach configuration for ``service`` (``preLaunchTask``: its task)."""
    return {
        "name": launch_name(service),
        "type": "debugpy",
        "request": "attach",
        "connect": {"host": "127.0.0.1", "port": debug_port},
        "pathMappings": [{"localRoot": local_root, "remoteRoot": remote_root}],
        "justMyCode": False,
        "preLaunchTask": task_label(service),
    }


def start_task(service: str, *, debug_port: int = 5678, start_args: Sequence[str] = ()) -> dict[str, object]:
    """The background task running ``intercept start SERVICE --debug --debug-port N *start_args``."""
    return {
        "label": task_label(service),
        "type": "process",
        "command": "intercept",
        "args": ["start", service, "--debug", "--debug-port", str(debug_port), *start_args],
        "isBackground": True,
        "problemMatcher": {
            "owner": "intercept",
            "source": "intercept",
            "fileLocation": "autoDetect",
            "pattern": {"regexp": ERROR_PATTERN, "kind": "file", "file": 1, "message": 2},
            "background": {
                "activeBegin": True,
                "beginsPattern": BACKGROUND_BEGINS,
                "endsPattern": BACKGROUND_ENDS,
            },
        },
    }


# --- JSONC ----------------------------------------------------------------------------


def _strip_jsonc(text: str) -> tuple[str, bool]:
    """``text`` with comments and trailing commas blanked out, and whether it had comments.

    Blanking (spaces, newlines kept) rather than removing keeps every character where
    it was, so a JSON error's line and column still point into the original file.
    """
    out: list[str] = []
    had_comments = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':  # a string: copy it whole, escapes included
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(" " * (end - i))
            had_comments, i = True, end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                out.append(text[i:])  # unterminated: left for the JSON parser to refuse
                break
            out.append(re.sub(r"[^\n]", " ", text[i:end + 2]))
            had_comments, i = True, end + 2
        else:
            out.append(c)
            i += 1
    stripped = "".join(out)

    # Trailing commas: a comma whose next non-blank character closes an object or array.
    chars = list(stripped)
    in_string = False
    i = 0
    while i < len(chars):
        c = chars[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == ",":
            j = i + 1
            while j < len(chars) and chars[j] in " \t\r\n":
                j += 1
            if j < len(chars) and chars[j] in "}]":
                chars[i] = " "
        i += 1
    return "".join(chars), had_comments


def parse_jsonc(text: str, *, name: str = "the file") -> tuple[object, bool]:
    """Parse VS Code's JSON with comments: ``(value, had_comments)``.

    ``//`` and ``/* */`` comments outside strings and trailing commas are accepted; an
    empty text is ``{}``. Raises :class:`UsageError` naming ``name``, the line and the fix.
    """
    text = text.removeprefix("\ufeff")
    stripped, had_comments = _strip_jsonc(text)
    if not stripped.strip():
        return {}, had_comments
    try:
        return json.loads(stripped), had_comments
    except json.JSONDecodeError as error:
        raise UsageError(
            f"{name}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno}); "
            "fix it or move the file away, then run intercept vscode again"
        ) from None


# --- merging and writing ----------------------------------------------------------------


def _merge_named(entries: list[object], ours: list[dict[str, object]], key: str) -> list[object]:
    """``entries`` with each of ``ours`` in place of the entry of the same ``key`` (else appended)."""
    by_name = {entry[key]: entry for entry in ours}
    merged: list[object] = []
    placed: set[object] = set()
    for entry in entries:
        name = entry.get(key) if isinstance(entry, dict) else None
        if isinstance(name, str) and name in by_name:
            if name not in placed:  # a duplicate of ours is dropped
                merged.append(by_name[name])
                placed.add(name)
        else:
            merged.append(entry)
    merged += [entry for entry in ours if entry[key] not in placed]
    return merged


def _merged_document(path: Path, list_key: str, name_key: str, version: str,
                     ours: list[dict[str, object]]) -> tuple[str, str | None, bool]:
    """``(new text, old text or None, old had comments)`` for one of the two files."""
    shown = str(path)
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{shown}: cannot read it ({error}); fix its permissions or move it away") from None
    data, had_comments = parse_jsonc(old, name=shown) if old is not None else ({}, False)
    if not isinstance(data, dict):
        raise UsageError(f"{shown}: expected a JSON object with {list_key!r}; fix the file or move it away")
    entries = data.get(list_key, [])
    if not isinstance(entries, list):
        raise UsageError(f"{shown}: {list_key!r} must be a list; fix the file or move it away")
    data.setdefault("version", version)
    data[list_key] = _merge_named(entries, ours, name_key)
    return json.dumps(data, indent=4, ensure_ascii=False) + "\n", old, had_comments


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_vscode(directory: Path, services: Sequence[str], *, debug_port: int = 5678,
                 local_root: str = "${workspaceFolder}", remote_root: str = ".",
                 start_args: Mapping[str, Sequence[str]] | None = None) -> list[Path]:
    """Write or merge ``directory/.vscode/launch.json`` and ``tasks.json`` for ``services``.

    Service *i* (in order) gets debug port ``debug_port + i``. ``start_args`` adds
    arguments, per service, after ``intercept start SERVICE --debug --debug-port N``
    (e.g. ``{"orders": ["-n", "shop", "--", "python", "app.py"]}``).

    Returns the files written, in order; nothing is rewritten when its content would not
    change. A ``.bak`` path among them is the original of a file whose comments could not
    be kept (the CLI should say so). Raises :class:`UsageError` for no service, an
    unreadable or invalid existing file, or a port out of range.
    """
    names = list(dict.fromkeys(services))
    if not names or not all(isinstance(s, str) and s.strip() for s in names):
        raise UsageError("name the services to debug, e.g. intercept vscode orders")
    if debug_port < 1 or debug_port + len(names) - 1 > 65535:
        raise UsageError(f"--debug-port {debug_port}: the debug ports must lie within 1..65535; choose e.g. --debug-port 5678")
    args = start_args or {}
    launches = [attach_configuration(s, debug_port=debug_port + i, local_root=local_root, remote_root=remote_root)
                for i, s in enumerate(names)]
    tasks = [start_task(s, debug_port=debug_port + i, start_args=args.get(s, ())) for i, s in enumerate(names)]

    folder = directory / ".vscode"
    plans = [
        (folder / "launch.json", "configurations", "name", LAUNCH_VERSION, launches),
        (folder / "tasks.json", "tasks", "label", TASKS_VERSION, tasks),
    ]
    # Read and check both files before writing either: a bad tasks.json must not leave
    # a launch.json that points at a task that was never written.
    results = [(path, *_merged_document(path, *rest)) for path, *rest in plans]
    written: list[Path] = []
    for path, new, old, had_comments in results:
        if new == old:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if old is not None and had_comments:
            backup = path.with_name(path.name + ".bak")
            _write_atomically(backup, old)
            written.append(backup)
        _write_atomically(path, new)
        written.append(path)
    return written
