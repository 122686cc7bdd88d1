"""``.vscode/launch.json`` and ``.vscode/tasks.json`` for debugging an intercepted service.

Per service, two entries, both found again by their name:

- a background task ``intercept: SERVICE`` running ``intercept start SERVICE --debug
  --debug-port N ...``, whose problem matcher is *active* from ``intercept: starting:``
  (or ``reloading:``) until ``intercept: ready:`` (or ``reloaded:``), the stable lines
  the CLI prints (:data:`BACKGROUND_BEGINS`, :data:`BACKGROUND_ENDS`);
- a debugpy ``attach`` configuration ``intercept: attach SERVICE`` on 127.0.0.1:N whose
  ``preLaunchTask`` is that task, so VS Code attaches once requests flow.

The files are edited in place, not rewritten: VS Code reads them as JSONC (comments,
trailing commas), and so do we; the text of an existing file changes only where our
own entries (matched by name) are replaced, appended, or (duplicates) removed, so the
user's comments, formatting, other configurations and tasks, their order and other
top-level keys are kept byte for byte. A missing list or ``version`` is added to the
top-level object; a new file is plain JSON. Writing twice gives the same files (nothing
is rewritten when nothing changes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from intercept.errors import UsageError

log = logging.getLogger(__name__)

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


def _skip_blank(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _value_end(text: str, i: int) -> int:
    """Index just past the JSON value that starts at ``text[i]`` (comments already blanked)."""
    c = text[i]
    if c == '"':
        j = i + 1
        while text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        return j + 1
    if c in "{[":
        depth, j = 0, i
        while True:
            c = text[j]
            if c == '"':
                j = _value_end(text, j)
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
    j = i
    while j < len(text) and text[j] not in ",]} \t\r\n":
        j += 1
    return j


def _members(text: str, opening: int) -> tuple[list[tuple[str | None, int, int, int]], int]:
    """The members of the object or array whose bracket is ``text[opening]``: ``(key or None,
    start, value start, end)`` each (start: the key's quote in an object), and the index of
    the closing bracket. ``text`` is valid JSON once comments and trailing commas are blanked."""
    is_object = text[opening] == "{"
    closing = "}" if is_object else "]"
    found: list[tuple[str | None, int, int, int]] = []
    i = opening + 1
    while True:
        i = _skip_blank(text, i)
        if text[i] == closing:
            return found, i
        if text[i] == ",":
            i += 1
            continue
        start, key = i, None
        if is_object:
            key_end = _value_end(text, i)
            key = json.loads(text[i:key_end])
            i = _skip_blank(text, _skip_blank(text, key_end) + 1)  # past the colon
        end = _value_end(text, i)
        found.append((key, start, i, end))
        i = end


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted ``indices``, as (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _indent_at(text: str, i: int) -> str:
    """The leading whitespace of the line ``text[i]`` is on."""
    line = text.rfind("\n", 0, i) + 1
    j = line
    while j < i and text[j] in " \t":
        j += 1
    return text[line:j]


def _dumps(value: object, indent: str) -> str:
    """``value`` as indented JSON whose continuation lines start with ``indent``."""
    return json.dumps(value, indent=4, ensure_ascii=False).replace("\n", "\n" + indent)


def _edited(original: str, stripped: str, list_key: str, name_key: str, version: str,
            entries: list[object], ours: list[dict[str, object]]) -> str:
    """``original`` with our entries put in place: each replaces the first entry of its name
    (later ones are removed), the others are appended to the list; a missing list or
    version is added. Everything else keeps its bytes, comments included."""
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), applied from the end
    top = _skip_blank(stripped, 0)
    members, top_close = _members(stripped, top)
    by_key = {key: (start, value_start, end) for key, start, value_start, end in members}
    by_name = {entry[name_key]: entry for entry in ours}
    new_members: list[str] = []
    member_indent = _indent_at(stripped, members[0][1]) if members else "    "
    if list_key in by_key:
        _, value_start, _ = by_key[list_key]
        elements, list_close = _members(stripped, value_start)
        placed: set[object] = set()
        removed: list[int] = []  # duplicates of ours (never the first element)
        for index, ((_, start, _, end), entry) in enumerate(zip(elements, entries)):
            name = entry.get(name_key) if isinstance(entry, dict) else None
            if isinstance(name, str) and name in by_name:
                if name in placed:
                    removed.append(index)
                else:
                    edits.append((start, end, _dumps(by_name[name], _indent_at(stripped, start))))
                    placed.add(name)
        for first, last in _runs(removed):
            if last + 1 < len(elements):  # up to the next element kept
                edits.append((elements[first][1], elements[last + 1][1], ""))
            else:  # the run, and the comma after the last element kept (comments around stay)
                comma = stripped.index(",", elements[first - 1][3], elements[first][1])
                edits.append((elements[first][1], elements[last][3], ""))
                edits.append((comma, comma + 1, ""))
        missing = [entry for entry in ours if entry[name_key] not in placed]
        if missing:
            if elements:
                indent = _indent_at(stripped, elements[0][1])
                edits.append((elements[-1][3], elements[-1][3],
                              "".join(f",\n{indent}{_dumps(entry, indent)}" for entry in missing)))
            else:
                base = _indent_at(stripped, value_start)
                indent = base + "    "
                edits.append((value_start + 1, list_close,
                              "\n" + ",\n".join(indent + _dumps(entry, indent) for entry in missing) + "\n" + base))
    else:
        new_members.append(f'{json.dumps(list_key)}: {_dumps(ours, member_indent)}')
    if "version" not in by_key:
        new_members.insert(0, f'"version": {json.dumps(version)}')
    if new_members:
        if members:
            edits.append((members[-1][3], members[-1][3], "".join(f",\n{member_indent}{m}" for m in new_members)))
        else:
            edits.append((top + 1, top_close, "\n" + ",\n".join(member_indent + m for m in new_members) + "\n"))
    text = original
    for start, end, replacement in sorted(edits, key=lambda edit: edit[0], reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _merged_document(path: Path, list_key: str, name_key: str, version: str,
                     ours: list[dict[str, object]]) -> tuple[str, str | None, bool]:
    """``(new text, old text or None, whether the old text's comments are lost)`` for one
    of the two files; the last is True only if editing in place failed its own check."""
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
    merged = dict(data)
    merged.setdefault("version", version)
    merged[list_key] = _merge_named(entries, ours, name_key)
    plain = json.dumps(merged, indent=4, ensure_ascii=False) + "\n"
    body = (old or "").removeprefix("\ufeff")
    stripped, _ = _strip_jsonc(body)
    if not stripped.strip():
        return plain, old, False
    bom = "\ufeff" if old.startswith("\ufeff") else ""
    try:
        text = bom + _edited(body, stripped, list_key, name_key, version, entries, ours)
        if parse_jsonc(text, name=shown)[0] == merged:
            return text, old, False
    except (UsageError, ValueError, IndexError, KeyError) as error:
        log.warning("%s: cannot edit it in place (%s); writing it anew", shown, error)
    return plain, old, had_comments  # not expected: the check above is a safety net


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
    change. Existing files are edited in place, comments kept (see the module); only if
    that ever failed its own check would a file be written anew, its original kept as a
    ``.bak`` path among those returned (the CLI says so). Raises :class:`UsageError` for no service, an
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
