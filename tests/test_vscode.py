"""`intercept vscode`: launch.json and tasks.json, written fresh or merged into JSONC files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from intercept.errors import UsageError
from intercept.vscode import (
    BACKGROUND_BEGINS,
    BACKGROUND_ENDS,
    ERROR_PATTERN,
    parse_jsonc,
    write_vscode,
)

READY = "intercept: ready: requests with x-dev: alice now reach localhost:8080"


def read(path: Path) -> dict:
    return parse_jsonc(path.read_text())[0]


def names(entries: list[dict], key: str = "name") -> list[str]:
    return [e[key] for e in entries]


# --- the stable lines ------------------------------------------------------------------


def test_the_task_becomes_ready_on_the_ready_line():
    assert re.search(BACKGROUND_ENDS, READY)
    assert re.search(BACKGROUND_ENDS, "intercept: reloaded: orders answers again on localhost:8080")


def test_the_task_becomes_busy_on_starting_and_reloading():
    assert re.search(BACKGROUND_BEGINS, "intercept: starting: orders in shop, x-dev: alice -> localhost:8080")
    assert re.search(BACKGROUND_BEGINS, "intercept: reloading: src/app.py changed")
    assert not re.search(BACKGROUND_BEGINS, READY)


@pytest.mark.parametrize("line", [
    "intercept: header: your requests carry x-intercept-id: alice",
    "intercept: reconnecting: connection to agent agent-host:9922 lost; retrying in 0.5s",
    "intercept: reconnected: requests with x-dev: alice reach localhost:8080 again",
    "  intercept: ready: indented is not the CLI's line",
    "xintercept: ready: no",
])
def test_other_lines_neither_begin_nor_end(line):
    assert not re.search(BACKGROUND_BEGINS, line)
    assert not re.search(BACKGROUND_ENDS, line)


def test_errors_become_problems():
    match = re.search(ERROR_PATTERN, "intercept: error: agent unreachable at 10.0.0.7:9922; check --agent")
    assert match and match.group(2) == "agent unreachable at 10.0.0.7:9922; check --agent"
    assert not re.search(ERROR_PATTERN, READY)


# --- a fresh workspace --------------------------------------------------------------------


def test_a_fresh_workspace_gets_an_attach_configuration_and_its_task(tmp_path):
    written = write_vscode(tmp_path, ["orders"])
    launch_path, tasks_path = tmp_path / ".vscode/launch.json", tmp_path / ".vscode/tasks.json"
    assert written == [launch_path, tasks_path]

    launch = read(launch_path)
    assert launch["version"] == "0.2.0"
    assert launch["configurations"] == [{
        "name": "intercept: attach orders",
        "type": "debugpy",
        "request": "attach",
        "connect": {"host": "127.0.0.1", "port": 5678},
        "pathMappings": [{"localRoot": "${workspaceFolder}", "remoteRoot": "."}],
        "justMyCode": False,
        "preLaunchTask": "intercept: orders",
    }]

    tasks = read(tasks_path)
    assert tasks["version"] == "2.0.0"
    (task,) = tasks["tasks"]
    assert task["label"] == "intercept: orders"
    assert task["isBackground"] is True
    assert [task["command"], *task["args"]] == ["intercept", "start", "orders", "--debug", "--debug-port", "5678"]
    matcher = task["problemMatcher"]
    assert matcher["background"] == {"activeBegin": True, "beginsPattern": BACKGROUND_BEGINS, "endsPattern": BACKGROUND_ENDS}
    assert matcher["pattern"]["regexp"] == ERROR_PATTERN
    assert {"file", "message"} <= matcher["pattern"].keys()  # VS Code requires both


def test_each_service_gets_its_own_debug_port_and_arguments(tmp_path):
    write_vscode(tmp_path, ["orders", "cart", "orders"], debug_port=6000, remote_root="/app",
                 start_args={"cart": ["-n", "shop", "--", "python", "-m", "cart"]})
    launch = read(tmp_path / ".vscode/launch.json")["configurations"]
    assert [(c["name"], c["connect"]["port"], c["pathMappings"][0]["remoteRoot"]) for c in launch] == [
        ("intercept: attach orders", 6000, "/app"), ("intercept: attach cart", 6001, "/app")]
    tasks = read(tmp_path / ".vscode/tasks.json")["tasks"]
    assert tasks[0]["args"] == ["start", "orders", "--debug", "--debug-port", "6000"]
    assert tasks[1]["args"] == ["start", "cart", "--debug", "--debug-port", "6001", "-n", "shop", "--", "python", "-m", "cart"]


def test_writing_twice_changes_nothing(tmp_path):
    write_vscode(tmp_path, ["orders", "cart"])
    files = sorted((tmp_path / ".vscode").iterdir())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assert write_vscode(tmp_path, ["orders", "cart"]) == []
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((tmp_path / ".vscode").iterdir())} == before


# --- merging into existing files ----------------------------------------------------------

EXISTING_LAUNCH = """\
// Team debug configurations; see the wiki.
{
    "version": "0.2.0",
    "configurations": [
        {
            "name": "Python: current file", // the default
            "type": "debugpy",
            "request": "launch",
            "program": "${file}",
            "env": {"URL": "http://localhost:8080/api", "NOTE": "a /* not a comment */ \\"quoted\\" // string"},
        },
        /* an old one of ours, to be replaced in place */
        {
            "name": "intercept: attach orders",
            "type": "debugpy",
            "request": "attach",
            "connect": {"host": "127.0.0.1", "port": 9999,},
        },
        {"name": "Node: attach", "type": "node", "request": "attach", "port": 9229},
    ],
    "compounds": [],
}
"""

EXISTING_TASKS = """\
{
    "version": "2.0.0",
    "tasks": [
        {"label": "build", "type": "shell", "command": "make", "group": "build"},
    ]
}
"""


def test_merging_keeps_other_entries_their_order_and_other_keys(tmp_path):
    vscode = tmp_path / ".vscode"
    vscode.mkdir()
    (vscode / "launch.json").write_text(EXISTING_LAUNCH)
    (vscode / "tasks.json").write_text(EXISTING_TASKS)

    write_vscode(tmp_path, ["orders", "cart"])

    launch = read(vscode / "launch.json")
    assert names(launch["configurations"]) == [
        "Python: current file", "intercept: attach orders", "Node: attach", "intercept: attach cart"]
    assert launch["configurations"][0]["env"] == {
        "URL": "http://localhost:8080/api", "NOTE": 'a /* not a comment */ "quoted" // string'}
    assert launch["configurations"][1]["connect"]["port"] == 5678
    assert launch["configurations"][2] == {"name": "Node: attach", "type": "node", "request": "attach", "port": 9229}
    assert launch["compounds"] == []

    tasks = read(vscode / "tasks.json")
    assert names(tasks["tasks"], "label") == ["build", "intercept: orders", "intercept: cart"]
    assert tasks["tasks"][0] == {"label": "build", "type": "shell", "command": "make", "group": "build"}


def test_a_file_with_comments_is_edited_in_place_keeping_them(tmp_path):
    vscode = tmp_path / ".vscode"
    vscode.mkdir()
    (vscode / "launch.json").write_text(EXISTING_LAUNCH)
    (vscode / "tasks.json").write_text(EXISTING_TASKS)  # trailing comma, no comment

    written = write_vscode(tmp_path, ["orders"])

    assert written == [vscode / "launch.json", vscode / "tasks.json"]
    assert not list(vscode.glob("*.bak"))
    text = (vscode / "launch.json").read_text()
    # everything but our own entry keeps its bytes: comments, the user's formatting, other entries
    before, ours = EXISTING_LAUNCH.split("        /* an old one of ours, to be replaced in place */\n")
    assert text.startswith(before + "        /* an old one of ours, to be replaced in place */\n")
    assert text.endswith('        {"name": "Node: attach", "type": "node", "request": "attach", "port": 9229},\n'
                         '    ],\n    "compounds": [],\n}\n')
    assert read(vscode / "launch.json")["configurations"][1]["connect"]["port"] == 5678
    # a second run writes nothing
    assert write_vscode(tmp_path, ["orders"]) == []


def test_a_list_or_version_that_is_missing_is_added_keeping_comments(tmp_path):
    vscode = tmp_path / ".vscode"
    vscode.mkdir()
    (vscode / "tasks.json").write_text('{\n    // no tasks yet\n    "options": {"cwd": "${workspaceFolder}"}\n}\n')
    (vscode / "launch.json").write_text("// nothing here yet\n{\n}\n")
    write_vscode(tmp_path, ["orders"])
    tasks_text = (vscode / "tasks.json").read_text()
    assert "// no tasks yet" in tasks_text and "// nothing here yet" in (vscode / "launch.json").read_text()
    tasks = read(vscode / "tasks.json")
    assert tasks["version"] == "2.0.0" and tasks["options"] == {"cwd": "${workspaceFolder}"}
    assert names(tasks["tasks"], "label") == ["intercept: orders"]
    assert names(read(vscode / "launch.json")["configurations"]) == ["intercept: attach orders"]
    assert write_vscode(tmp_path, ["orders"]) == []


def test_duplicates_are_removed_in_place(tmp_path):
    vscode = tmp_path / ".vscode"
    vscode.mkdir()
    (vscode / "launch.json").write_text(
        '{"configurations": [\n  {"name": "intercept: attach orders"}, // ours\n  {"name": "x"}, /* keep */\n'
        '  {"name": "intercept: attach orders"}\n]}\n')
    write_vscode(tmp_path, ["orders"])
    text = (vscode / "launch.json").read_text()
    assert names(read(vscode / "launch.json")["configurations"]) == ["intercept: attach orders", "x"]
    assert "/* keep */" in text and "// ours" in text


def test_duplicates_of_our_entries_collapse_into_one(tmp_path):
    vscode = tmp_path / ".vscode"
    vscode.mkdir()
    old = {"name": "intercept: attach orders", "type": "debugpy", "request": "attach"}
    (vscode / "launch.json").write_text(json.dumps({"version": "0.2.0", "configurations": [old, {"name": "x"}, old]}))
    write_vscode(tmp_path, ["orders"])
    assert names(read(vscode / "launch.json")["configurations"]) == ["intercept: attach orders", "x"]


def test_an_empty_file_is_treated_as_new(tmp_path):
    vscode = tmp_path / ".vscode"
    vscode.mkdir()
    (vscode / "launch.json").write_text("\ufeff  \n")
    write_vscode(tmp_path, ["orders"])
    assert names(read(vscode / "launch.json")["configurations"]) == ["intercept: attach orders"]


def test_an_invalid_file_is_refused_with_its_line_and_nothing_is_written(tmp_path):
    vscode = tmp_path / ".vscode"
    vscode.mkdir()
    (vscode / "tasks.json").write_text('{\n  "tasks": [\n    {"label": "build" "type": "shell"}\n  ]\n}\n')
    with pytest.raises(UsageError, match=r"tasks.json:3: not valid JSON \(Expecting ',' delimiter, column 23\); fix it"):
        write_vscode(tmp_path, ["orders"])
    assert not (vscode / "launch.json").exists()


@pytest.mark.parametrize(("content", "message"), [
    ("[]", "expected a JSON object with 'configurations'"),
    ('{"configurations": {}}', "'configurations' must be a list"),
])
def test_a_file_of_the_wrong_shape_is_refused(tmp_path, content, message):
    (tmp_path / ".vscode").mkdir()
    (tmp_path / ".vscode/launch.json").write_text(content)
    with pytest.raises(UsageError, match=message):
        write_vscode(tmp_path, ["orders"])


def test_no_service_is_refused(tmp_path):
    with pytest.raises(UsageError, match="name the services to debug"):
        write_vscode(tmp_path, [])


# --- JSONC ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value", "had_comments"), [
    ('{"a": 1}', {"a": 1}, False),
    ('{"a": [1, 2,],}', {"a": [1, 2]}, False),
    ('// top\n{"a": 1} // end', {"a": 1}, True),
    ('{"a": /* inline */ 1, /* multi\nline */ "b": 2}', {"a": 1, "b": 2}, True),
    ('{"u": "http://x//y", "c": "/* no */"}', {"u": "http://x//y", "c": "/* no */"}, False),
    ('{"q": "a \\" // b", "t": "\\\\"}', {"q": 'a " // b', "t": "\\"}, False),
    ('{"s": ",]", "l": [ "x" , ] }', {"s": ",]", "l": ["x"]}, False),
    ("", {}, False),
])
def test_jsonc_is_read_like_vscode_reads_it(text, value, had_comments):
    assert parse_jsonc(text) == (value, had_comments)


def test_a_jsonc_error_points_at_the_original_line():
    with pytest.raises(UsageError, match=r"^x.json:4: not valid JSON"):
        parse_jsonc('{\n  // a comment\n  /* and\n */ "a": }', name="x.json")


def test_intercept_vscode_takes_starts_options_and_writes_them_into_the_task(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "intercept", "vscode", "orders", "-n", "trial", "--context", "kind-dev",
                           "--agent-image", "registry.example/agent:1", "--header", "x-dev=alice", "--", "python", "app.py"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    (task,) = read(tmp_path / ".vscode/tasks.json")["tasks"]
    assert task["args"] == ["start", "orders", "--debug", "--debug-port", "5678", "--namespace", "trial", "--context",
                            "kind-dev", "--header", "x-dev=alice", "--agent-image", "registry.example/agent:1", "--",
                            "python", "app.py"]
