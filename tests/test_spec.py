"""intercept.yaml, INTERCEPT_* variables and flags: three spellings of one InterceptSpec."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from intercept.errors import SpecError, UsageError
from intercept.routing.match import Baggage, HeaderEquals, HeaderRegex, PathPrefix
from intercept.spec import (
    OPTIONS,
    Forward,
    InterceptSpec,
    Port,
    load_workspace,
    merge,
    parse_workspace,
    render_reference,
    resolve_workspace,
    to_args,
    update_reference,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
BY_KEY = {o.key: o for o in OPTIONS}


def workspace(text: str, env: dict[str, str] | None = None, directory: Path = Path("/work/app")):
    return parse_workspace(text, name="intercept.yaml", directory=directory, env=env or {})


def one(text: str, env: dict[str, str] | None = None, directory: Path = Path("/work/app")) -> InterceptSpec:
    (spec,) = workspace(text, env, directory).intercepts
    return spec


def refused(text: str, env: dict[str, str] | None = None) -> SpecError:
    with pytest.raises(SpecError) as caught:
        workspace(text, env)
    return caught.value


def file_text(**intercept: object) -> str:
    return yaml.safe_dump({"version": 1, "intercepts": [intercept]}, sort_keys=False)


# --- the table and the dataclass ---------------------------------------------------------


def test_the_spec_fields_are_the_options_in_order_with_their_defaults():
    names = [f.name for f in dataclasses.fields(InterceptSpec)]
    assert names[: len(OPTIONS)] == [o.key for o in OPTIONS]
    assert names[len(OPTIONS):] == ["directory", "origins", "location"]
    defaults = {f.name: f.default for f in dataclasses.fields(InterceptSpec)}
    for option in OPTIONS:
        assert defaults[option.key] == option.default, option.key


def test_every_option_has_one_flag_and_one_variable_of_its_own():
    envs = [o.env for o in OPTIONS]
    flags = [o.flag for o in OPTIONS]
    assert len(set(envs)) == len(envs) and len(set(flags)) == len(flags)
    assert all(e.startswith("INTERCEPT_") for e in envs)
    assert BY_KEY["headers"].env == "INTERCEPT_HEADER"
    assert BY_KEY["header_regexes"].env == "INTERCEPT_HEADER_REGEX"
    assert BY_KEY["service"].env == "INTERCEPT_SERVICE"
    assert BY_KEY["command"].env == "INTERCEPT_COMMAND"


def test_nothing_given_but_a_service_gives_the_defaults():
    spec = merge(None, {}, {"service": "orders"})
    assert spec == InterceptSpec(service="orders")
    assert spec.local_port == 8080 and spec.debug_port == 5678
    assert spec.watch == () and spec.headers == () and spec.all is False
    assert dict(spec.origins).keys() == {"service"}


# --- three spellings -------------------------------------------------------------------

# Enough around each option for the checks across options to pass.
BASE = {"service": "orders", "command": ["python", "app.py"], "debug": True,
        "credentials": "/etc/intercept/credentials.json", "mount": True}


def env_spelling(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return shlex.join(str(v) for v in value)
    return str(value)


def flag_spelling(value: object) -> object:
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    if isinstance(value, bool):
        return value
    return str(value)  # as typed on the command line


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.key)
def test_every_option_reads_the_same_from_file_env_and_flags(option, tmp_path):
    given = {**BASE, option.key: option.example}
    from_file = one(file_text(**given), directory=tmp_path)
    from_env = merge(None, {BY_KEY[k].env: env_spelling(v) for k, v in given.items()}, {})
    from_flags = merge(None, {}, {k: flag_spelling(v) for k, v in given.items()})

    value = getattr(from_file, option.key)
    assert value != option.default, "the example must set something"
    assert getattr(from_env, option.key) == value
    assert getattr(from_flags, option.key) == value
    # And everything else agrees too (the default watch is the file's directory vs ".").
    ignore = {"watch"} if option.key != "watch" else set()
    strip = lambda spec: {k: v for k, v in spec.to_dict().items() if k not in ignore}  # noqa: E731
    assert strip(from_file) == strip(from_env) == strip(from_flags)
    assert from_file.origins[option.key].medium == "file"
    assert from_env.origins[option.key].label == option.env
    assert from_flags.origins[option.key].label == option.label


def test_typed_values():
    spec = merge(None, {}, {
        "service": "orders", "port": "3000", "service_port": "80", "forward": ("redis:6379", "pg.db:5432:15432"),
        "kubeconfig": Path("/k"), "all": True,
    })
    assert spec.local_port == 3000 and spec.service_port == 80
    assert spec.forward == (Forward("redis", 6379, 6379), Forward("pg.db", 5432, 15432))
    assert [str(f) for f in spec.forward] == ["redis:6379", "pg.db:5432:15432"]
    assert spec.kubeconfig == Path("/k")
    assert merge(None, {}, {"service": "orders", "service_port": "http"}).service_port == "http"
    assert merge(None, {}, {"agent": "[::1]:9922", "credentials": "c.json"}).agent_address == ("::1", 9922)


@pytest.mark.parametrize(("given", "expected"), [
    ("8080", Port(None, 8080)),
    (8080, Port(None, 8080)),
    ("9090:5000", Port(9090, 5000)),
    ("grpc:5000", Port("grpc", 5000)),
])
def test_port_takes_a_local_port_after_an_optional_service_port(given, expected):
    assert merge(None, {}, {"service": "orders", "port": given}).port == (expected,)


def test_several_ports_each_to_its_own_local_port_in_every_spelling():
    from_flags = merge(None, {}, {"service": "orders", "port": ("http:3000", "9090:5000")})
    from_env = merge(None, {"INTERCEPT_PORT": "http:3000 9090:5000"}, {"service": "orders"})
    from_file = one("version: 1\nintercepts:\n  - service: orders\n    port: [http:3000, 9090:5000]\n")
    for spec in (from_flags, from_env, from_file):
        assert spec.port == (Port("http", 3000), Port(9090, 5000))
        assert spec.local_port == 3000
    assert to_args(from_flags) == ["orders", "--port", "http:3000", "--port", "9090:5000"]
    assert from_flags.to_dict()["port"] == ["http:3000", "9090:5000"]
    # read as written: YAML 1.1 would read 80:30 as the sexagesimal number 4830
    assert one("version: 1\nintercepts:\n  - service: orders\n    port: 80:30\n").port == (Port(80, 30),)


def test_a_port_without_service_port_takes_the_service_port_option():
    spec = merge(None, {}, {"service": "orders", "port": "3000", "service_port": "grpc"})
    assert spec.ports() == (Port("grpc", 3000),)
    assert merge(None, {}, {"service": "orders"}).ports() == (Port(None, 8080),)


@pytest.mark.parametrize(("flags", "expected"), [
    ({"port": "grpc"}, "--port grpc: not a port number; to take the Service port named grpc, add the local port: "
                       "--port grpc:LOCAL_PORT, e.g. --port grpc:3000"),
    ({"port": "grpc:"}, "--port grpc:: '' is not a local port; write SERVICE_PORT:LOCAL_PORT with LOCAL_PORT a number "
                        "from 1 to 65535, e.g. --port grpc:5000 or --port 9090:5000"),
    ({"port": "9090:70000"}, "--port 9090:70000: '70000' is not a local port"),
    ({"port": "Bad_Name:5000"}, "--port Bad_Name:5000: 'Bad_Name' is not a Service port; write SERVICE_PORT:LOCAL_PORT "
                                "with SERVICE_PORT the Service port's number (1 to 65535) or name, e.g. --port grpc:5000"),
    ({"port": "1:2:3"}, "--port 1:2:3: '1:2' is not a Service port"),
    ({"port": ("3000", "grpc:5000")}, "--port 3000: with several ports, name the Service port each one takes "
                                      "(SERVICE_PORT:LOCAL_PORT), e.g. --port http:3000 --port grpc:5000"),
    ({"port": ("http:3000", "grpc:3000")}, "--port http:3000 and grpc:3000: the local port 3000 twice; "
                                           "give each Service port its own local port"),
    ({"port": ("http:3000", "http:3001")}, "--port http:3000 and http:3001: the Service port http twice"),
    ({"port": ("http:3000", "grpc:5000"), "service_port": "http"},
     "--service-port picks the Service port of a --port without one, but each names its own; drop --service-port"),
    ({"port": ("http:3000",), "debug": True, "debug_port": 3000, "command": ["a"]},
     "--debug-port 3000 is also the local port (--port)"),
])
def test_a_bad_port_names_the_flag_and_the_fix(flags, expected):
    with pytest.raises(SpecError) as caught:
        merge(None, {}, {"service": "orders", **flags})
    assert str(caught.value).startswith(expected), str(caught.value)


def test_in_direct_mode_a_port_is_named_by_its_number():
    spec = merge(None, {}, {"agent": "10.0.0.7:9922", "credentials": "c.json", "port": ("8080:3000", "9090:5000")})
    assert spec.port == (Port(8080, 3000), Port(9090, 5000))
    with pytest.raises(SpecError, match=r"--port grpc:5000: in direct mode \(--agent\) there is no Service to name the "
                                        r"port 'grpc'; write the number of the app's port"):
        merge(None, {}, {"agent": "10.0.0.7:9922", "credentials": "c.json", "port": ("8080:3000", "grpc:5000")})


def test_the_route_rules_come_from_the_rule_options():
    spec = merge(None, {}, {"service": "orders", "headers": ("X-Dev=alice",), "header_regexes": ("x-team=a.*",),
                            "baggage": "dev=alice", "path_prefix": "/api"})
    assert set(spec.rules()) == {HeaderEquals("x-dev", "alice"), HeaderRegex("x-team", "a.*"),
                                 Baggage("dev", "alice"), PathPrefix("/api")}
    assert merge(None, {}, {"service": "orders"}).rules() == []


def parse_args(args: list[str]) -> dict[str, object]:
    """A small stand-in for click: flags to option keys, as the CLI passes them."""
    by_flag = {o.flag: o for o in OPTIONS}
    given: dict[str, object] = {}
    if "--" in args:
        given["command"] = tuple(args[args.index("--") + 1:])
        args = args[: args.index("--")]
    i = 0
    while i < len(args):
        option = by_flag.get(args[i])
        if option is None:
            given["service"] = args[i]
        elif option.is_bool:
            given[option.key] = True
        elif option.flag_value is not None and (i + 1 == len(args) or args[i + 1].startswith("-")):
            given[option.key] = option.flag_value  # --mount alone, as click reads it
        elif option.multiple:
            given[option.key] = (*given.get(option.key, ()), args[i + 1])  # type: ignore[misc]
            i += 1
        else:
            given[option.key] = args[i + 1]
            i += 1
        i += 1
    return given


def test_to_args_spells_the_spec_as_flags(tmp_path):
    spec = one(file_text(service="orders", namespace="shop", headers=["x-dev=alice", "x-team=a b"],
                         command=["python", "-m", "app"], debug=True, env_file=".env", all=False,
                         forward=["redis:6379:16379"]), directory=tmp_path)
    args = to_args(spec)
    assert args == ["orders", "--namespace", "shop", "--header", "x-dev=alice", "--header", "x-team=a b",
                    "--env-file", str(tmp_path / ".env"), "--debug", "--forward", "redis:6379:16379",
                    "--", "python", "-m", "app"]
    again = merge(None, {}, parse_args(args))
    assert again.to_dict() | {"watch": None} == spec.to_dict() | {"watch": None}
    assert to_args(spec, skip=("service", "debug")) == args[1:9] + args[10:]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.key)
def test_to_args_round_trips_every_option(option):
    given = {**BASE, option.key: option.example}
    spec = merge(None, {}, {k: flag_spelling(v) for k, v in given.items()})
    assert merge(None, {}, parse_args(to_args(spec))) == spec


# --- precedence ------------------------------------------------------------------------

LAYERED = """\
version: 1
namespace: top
name: top-name
intercepts:
  - service: orders
    namespace: own
    port: 3000
    headers: [x-dev=file]
"""


def test_the_intercept_beats_the_top_level_which_beats_the_default():
    spec = one(LAYERED)
    assert spec.namespace == "own"
    assert spec.name == "top-name"
    assert spec.context is None
    assert spec.origins["name"].label == "intercept.yaml:3"


def test_env_beats_the_file():
    spec = one(LAYERED, {"INTERCEPT_NAMESPACE": "env", "INTERCEPT_PORT": "4000", "INTERCEPT_NAME": "env-name"})
    assert (spec.namespace, spec.local_port, spec.name) == ("env", 4000, "env-name")
    assert spec.headers == ("x-dev=file",)
    assert spec.origins["port"].label == "INTERCEPT_PORT"


def test_flags_beat_env_and_file():
    ws = workspace(LAYERED, {"INTERCEPT_PORT": "4000", "INTERCEPT_HEADER": "x-dev=env"})
    env = {"INTERCEPT_PORT": "4000", "INTERCEPT_HEADER": "x-dev=env"}
    (spec,) = resolve_workspace(ws, env, {"port": 5000}).intercepts
    assert spec.local_port == 5000 and spec.headers == ("x-dev=env",)
    (spec,) = resolve_workspace(ws, env, {"headers": ("x-dev=flag",)}).intercepts
    assert spec.local_port == 4000 and spec.headers == ("x-dev=flag",)
    assert spec.origins["headers"].label == "--header"


def test_a_list_from_a_higher_layer_replaces_the_lower_one():
    spec = one(LAYERED, {"INTERCEPT_HEADER": "x-a=1 x-b=2"})
    assert spec.headers == ("x-a=1", "x-b=2")
    assert merge(spec, {}, {"headers": ("x-c=3",)}).headers == ("x-c=3",)


def test_flags_not_given_change_nothing():
    spec = one(LAYERED)
    assert merge(spec, {}, {"port": None, "headers": (), "command": []}) == spec


def test_flags_and_env_apply_to_every_intercept_of_a_file():
    ws = workspace("""\
version: 1
intercepts:
  - {service: orders, port: 8080}
  - {service: cart, port: 8081}
""", {"INTERCEPT_NAME": "alice"})
    merged = resolve_workspace(ws, {}, {"namespace": "shop"})
    assert [(s.service, s.local_port, s.name, s.namespace) for s in merged.intercepts] == [
        ("orders", 8080, "alice", "shop"), ("cart", 8081, "alice", "shop")]


def test_null_and_empty_variables_count_as_unset():
    spec = one("version: 1\nnamespace: top\nintercepts:\n  - {service: orders, namespace: ~, port: null}\n",
               {"INTERCEPT_NAME": "", "INTERCEPT_PORT": ""})
    assert spec.namespace == "top" and spec.local_port == 8080 and spec.name is None


# --- watch -----------------------------------------------------------------------------


def test_watch_defaults_to_the_file_directory_when_a_command_is_given(tmp_path):
    assert one(file_text(service="orders", command="python app.py"), directory=tmp_path).watch == (tmp_path,)
    assert one(file_text(service="orders"), directory=tmp_path).watch == ()
    assert merge(None, {}, {"service": "orders", "command": ("python", "app.py")}).watch == (Path("."),)


def test_a_command_given_later_still_gets_the_default_watch(tmp_path):
    spec = one(file_text(service="orders"), directory=tmp_path)
    assert merge(spec, {}, {"command": ("python", "app.py")}).watch == (tmp_path,)


def test_no_watch_turns_watching_off_whoever_set_watch():
    spec = one(file_text(service="orders", command=["python", "app.py"], watch=["src"]))
    assert spec.watch == (Path("/work/app/src"),)
    assert merge(spec, {}, {"no_watch": True}).watch == ()
    assert merge(spec, {"INTERCEPT_NO_WATCH": "yes"}, {}).watch == ()


# --- the file's forms ------------------------------------------------------------------


def test_relative_paths_in_the_file_are_relative_to_its_directory(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "intercept.yaml").write_text(file_text(
        service="orders", command=["python", "app.py"], env_file=".env", watch=["src", "/abs"],
        kubeconfig="kube/config", credentials="~/creds.json"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/dev")
    ws = load_workspace(Path("project/intercept.yaml"), {})
    (spec,) = ws.intercepts
    assert ws.path == Path("project/intercept.yaml")
    assert spec.directory == project
    assert spec.env_file == project / ".env"
    assert spec.watch == (project / "src", Path("/abs"))
    assert spec.kubeconfig == project / "kube/config"
    assert spec.credentials == Path("/home/dev/creds.json")
    # A path from a variable or a flag stays as given: relative to where you typed it.
    assert merge(spec, {"INTERCEPT_ENV_FILE": "x.env"}, {}).env_file == Path("x.env")


def test_text_options_are_read_as_written_not_as_yaml_types():
    spec = one("version: 1\nintercepts:\n  - service: orders\n    name: no\n    context: 1.10\n"
               "    command: [python, -m, http.server, 8000]\n")
    assert spec.name == "no" and spec.context == "1.10"
    assert spec.command == ("python", "-m", "http.server", "8000")


def test_a_command_string_is_split_like_shell_words_other_strings_are_one_item():
    spec = one("version: 1\nintercepts:\n  - service: orders\n    command: python -c 'print(1)'\n"
               "    headers: x-dev=two words\n    watch: my src\n")
    assert spec.command == ("python", "-c", "print(1)")
    assert spec.headers == ("x-dev=two words",)
    assert spec.watch == (Path("/work/app/my src"),)
    error = refused("version: 1\nintercepts:\n  - service: orders\n    command: python 'app.py\n")
    assert str(error).startswith("intercept.yaml:4: intercepts[0].command \"python 'app.py\": No closing quotation")


def test_a_bad_merge_key_is_a_yaml_error_with_its_line():
    error = refused("version: 1\nintercepts:\n  - service: orders\n    <<: 1\n")
    assert str(error).startswith("intercept.yaml:4: not valid YAML:")


def test_yaml_anchors_in_x_keys_and_merge_keys_work():
    ws = workspace("""\
version: 1
x-python: &python
  command: [python, app.py]
  namespace: shop
intercepts:
  - {<<: *python, service: orders, port: 8080}
  - {<<: *python, service: cart, port: 8081, namespace: other}
""")
    assert [(s.service, s.namespace, s.command) for s in ws.intercepts] == [
        ("orders", "shop", ("python", "app.py")), ("cart", "other", ("python", "app.py"))]


def test_env_lists_are_shell_words_and_booleans_have_several_spellings():
    spec = merge(None, {"INTERCEPT_SERVICE": "orders", "INTERCEPT_HEADER": "x-a=1 'x-b=two words'",
                        "INTERCEPT_COMMAND": "python -m app", "INTERCEPT_PROPAGATE_HEADER": "On",
                        "INTERCEPT_ALL": "0"}, {})
    assert spec.headers == ("x-a=1", "x-b=two words")
    assert spec.command == ("python", "-m", "app")
    assert spec.propagate_header is True and spec.all is False


def test_other_intercept_variables_are_ignored():
    spec = merge(None, {"INTERCEPT_LISTEN": "0.0.0.0:9900", "INTERCEPT_UPSTREAM": "x", "INTERCEPT_SERVICE": "orders"}, {})
    assert spec == InterceptSpec(service="orders")


# --- errors: the file, the line, the key, the fix ----------------------------------------


def test_an_unknown_key_names_the_file_the_line_and_the_likely_key():
    error = refused("""\
# intercepts for the orders team
version: 1
intercepts:
  - service: orders
    port: 8080
    command: [python, app.py]
    heders: [x-dev=alice]
""")
    assert str(error) == "intercept.yaml:7: unknown key 'heders' in intercepts[0]; did you mean 'headers'?"
    assert (error.path, error.line, error.key) == ("intercept.yaml", 7, "heders")
    assert isinstance(error, UsageError) and error.exit_code == 2


@pytest.mark.parametrize(("key", "meant"), [
    ("header-regex", "header_regexes"), ("--port", "port"), ("INTERCEPT_DEBUG_PORT", "debug_port"),
    ("header", "headers"), ("service-port", "service_port"), ("namespce", "namespace"),
])
def test_other_spellings_of_a_key_are_recognised(key, meant):
    error = refused(f"version: 1\nintercepts:\n  - service: orders\n    {key}: x\n")
    assert f"did you mean {meant!r}?" in str(error) and error.line == 4


def test_an_unknown_key_without_a_close_match_lists_the_keys():
    error = refused("version: 1\nintercepts:\n  - service: orders\n    zzz: 1\n")
    assert str(error).startswith("intercept.yaml:4: unknown key 'zzz' in intercepts[0]; the keys are: service, namespace,")


def test_an_intercept_option_at_the_top_level_is_sent_under_intercepts():
    error = refused("version: 1\nport: 3000\nintercepts:\n  - service: orders\n")
    assert str(error) == ("intercept.yaml:2: unknown key 'port' in the top level; "
                          "'port' is an option of one intercept: move it under intercepts")
    error = refused("version: 1\nintercept:\n  - service: orders\n")
    assert "did you mean 'intercepts'?" in str(error)


@pytest.mark.parametrize(("line", "expected"), [
    ("port: abc", "intercept.yaml:4: intercepts[0].port 'abc': not a port number; to take the Service port named abc, add the local port: port: abc:LOCAL_PORT, e.g. port: abc:3000"),
    ("port: 3.5", "intercept.yaml:4: intercepts[0].port '3.5': not a port number; write a number from 1 to 65535, e.g. port: 3000, or SERVICE_PORT:LOCAL_PORT, e.g. port: grpc:5000"),
    ("port: 70000", "intercept.yaml:4: intercepts[0].port '70000': not a port number"),
    ("debug_port: true", "intercept.yaml:4: intercepts[0].debug_port 'true': not a port number"),
    ("headers: [x dev=alice]", "intercept.yaml:4: intercepts[0].headers[0] 'x dev=alice': header name 'x dev' is not a valid HTTP token; write NAME=VALUE, e.g. headers: x-dev=alice"),
    ("headers: [x-dev]", "intercept.yaml:4: intercepts[0].headers[0] 'x-dev': expected NAME=VALUE; e.g. headers: x-dev=alice"),
    ("header_regexes: ['x-dev=(']", "intercept.yaml:4: intercepts[0].header_regexes[0] 'x-dev=(': pattern '(' is not a valid regular expression"),
    ("path_prefix: api", "intercept.yaml:4: intercepts[0].path_prefix 'api': the prefix must start with '/'; e.g. path_prefix: /api"),
    ("all: maybe", "intercept.yaml:4: intercepts[0].all 'maybe': expected true or false"),
    ("namespace: Shop_1", "intercept.yaml:4: intercepts[0].namespace 'Shop_1': not a namespace name: lowercase letters, digits and '-', at most 63 characters; write namespace: shop-1"),
    ("agent: nohost", "intercept.yaml:4: intercepts[0].agent 'nohost': expected HOST:PORT"),
    ("forward: [redis]", "intercept.yaml:4: intercepts[0].forward[0] 'redis': expected SERVICE:PORT or SERVICE:PORT:LOCAL_PORT"),
    ("name: two words", "intercept.yaml:4: intercepts[0].name 'two words': not visible ASCII without spaces"),
    ("port: [http:3000, 'grpc:']", "intercept.yaml:4: intercepts[0].port[1] 'grpc:': '' is not a local port; write SERVICE_PORT:LOCAL_PORT with LOCAL_PORT a number from 1 to 65535, e.g. port: grpc:5000 or port: 9090:5000"),
    ("port: {http: 3000}", "intercept.yaml:4: intercepts[0].port: expected a list, got a mapping"),
    ("command: {python: app.py}", "intercept.yaml:4: intercepts[0].command: expected a list, got a mapping"),
])
def test_a_bad_value_names_the_file_the_line_the_key_and_the_fix(line, expected):
    error = refused(f"version: 1\nintercepts:\n  - service: orders\n    {line}\n")
    assert str(error).startswith(expected), str(error)
    assert error.line == 4


def test_a_list_item_error_points_at_the_item_line():
    error = refused("version: 1\nintercepts:\n  - service: orders\n    headers:\n      - x-dev=alice\n      - x-team: a\n")
    assert str(error) == ("intercept.yaml:6: intercepts[0].headers[1]: expected one value, got a mapping; "
                          "write NAME=VALUE, not NAME: VALUE, e.g. headers: [x-team=a]")


def test_a_bad_variable_names_the_variable_and_the_fix():
    with pytest.raises(SpecError) as caught:
        merge(None, {"INTERCEPT_PORT": "http"}, {"service": "orders"})
    assert str(caught.value) == ("INTERCEPT_PORT=http: not a port number; to take the Service port named http, "
                                 "add the local port: INTERCEPT_PORT=http:LOCAL_PORT, e.g. INTERCEPT_PORT=http:3000")
    with pytest.raises(SpecError) as caught:
        merge(None, {"INTERCEPT_HEADER": "x-dev=a 'x team=b'"}, {"service": "orders"})
    assert str(caught.value).startswith("INTERCEPT_HEADER='x-dev=a '\"'\"'x team=b'\"'\"'' (word 2, 'x team=b'): header name 'x team'")
    assert "e.g. INTERCEPT_HEADER=x-dev=alice" in str(caught.value)
    with pytest.raises(SpecError, match="No closing quotation; the value is split like shell words"):
        merge(None, {"INTERCEPT_COMMAND": "python 'app.py"}, {"service": "orders"})


def test_a_bad_flag_names_the_flag_and_the_fix():
    with pytest.raises(SpecError) as caught:
        merge(None, {}, {"service": "orders", "header_regexes": ("x-dev",)})
    assert str(caught.value) == "--header-regex x-dev: expected NAME=REGEX; e.g. --header-regex x-dev='alice.*'"
    with pytest.raises(SpecError) as caught:
        merge(None, {}, {"service": "Orders"})
    assert str(caught.value).startswith("Orders: not a Service name (starting with a letter)")
    assert str(caught.value).endswith("; write orders")


@pytest.mark.parametrize(("argv", "named"), [
    (["start", "--bogus"], "'--bogus'"),
    (["start", "-o", "xml"], "'xml'"),
    (["agent", "--credentials", "c.json"], "'--upstream'"),
    (["agent", "--upstream", "127.0.0.1:1", "--credentials", "c.json", "--hold-timeout", "soon"], "'soon'"),
    (["bogus"], "'bogus'"),
    (["inject", "orders", "-f", "/nonexistent/manifests.yaml"], "/nonexistent/manifests.yaml"),
])
def test_a_command_line_the_parser_refuses_is_one_error_line_with_the_fix(argv, named, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "intercept", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("intercept: error: ") and named in line
    command = "" if argv[0] == "bogus" else f" {argv[0]}"
    assert line.endswith(f"intercept{command} --help")  # "python -m intercept ..." when run so


def test_an_unknown_flag_key_is_a_bug_not_a_user_error():
    with pytest.raises(ValueError, match="unknown option key 'local_port'"):
        merge(None, {}, {"local_port": 8080})


def test_a_duplicate_key_is_refused():
    error = refused("version: 1\nintercepts:\n  - service: orders\n    port: 1\n    port: 2\n")
    assert str(error) == "intercept.yaml:5: duplicate key 'port' in intercepts[0] (first at line 4); keep one"


def test_invalid_yaml_names_the_line():
    error = refused("version: 1\nintercepts:\n  - service: orders\n    headers: [x-dev=alice\n")
    assert str(error).startswith("intercept.yaml:5: not valid YAML:")


@pytest.mark.parametrize(("text", "expected"), [
    ("", "intercept.yaml:1: the file is empty; start it with version: 1"),
    ("intercepts:\n  - service: orders\n", "intercept.yaml:1: missing 'version'; add version: 1"),
    ("version: 2\nintercepts:\n  - service: orders\n", "intercept.yaml:1: version 2 is not supported; this intercept reads version: 1"),
    ("version: 1\n", "intercept.yaml:1: missing 'intercepts'"),
    ("version: 1\nintercepts: []\n", "intercept.yaml:2: intercepts: expected a list with one entry per intercept"),
    ("- service: orders\n", "intercept.yaml:1: the top level: expected a mapping"),
    ("version: 1\nintercepts:\n  - orders\n", "intercept.yaml:3: intercepts[0]: expected a mapping"),
])
def test_the_file_shape_is_checked(text, expected):
    assert str(refused(text)).startswith(expected)


def test_a_missing_file_says_how_to_fix_it(tmp_path):
    with pytest.raises(SpecError, match=r"nope.yaml: no such file; write one .* or name another with -f FILE"):
        load_workspace(tmp_path / "nope.yaml", {})


# --- checks across options ------------------------------------------------------------


@pytest.mark.parametrize(("body", "env", "expected"), [
    ("port: 3000", {}, "intercept.yaml:3: intercepts[0]: nothing to intercept: add service: orders (a Kubernetes Service) or agent: 10.0.0.7:9922 (direct mode)"),
    ("agent: 10.0.0.7:9922", {}, "intercept.yaml:3: intercepts[0]: agent (intercept.yaml:3) needs the agent's credentials file; add credentials: /etc/intercept/credentials.json"),
    ("service: orders\n    all: true\n    headers: [x-dev=a]", {}, "intercept.yaml:3: intercepts[0]: all (intercept.yaml:4) takes every request, but headers (intercept.yaml:5) sets a rule; drop one of them"),
    ("service: orders\n    headers: [x-dev=a]", {"INTERCEPT_ALL": "1"}, "intercept.yaml:3: intercepts[0]: INTERCEPT_ALL takes every request, but headers (intercept.yaml:4) sets a rule"),
    ("service: orders\n    debug: true", {}, "intercept.yaml:3: intercepts[0]: debug (intercept.yaml:4) runs the local command under debugpy, but no command is given; add one, e.g. command: [python, app.py]"),
    ("service: orders\n    command: [a]", {"INTERCEPT_DEBUG_WAIT": "1"}, "intercept.yaml:3: intercepts[0]: INTERCEPT_DEBUG_WAIT waits for a debugger, which needs debug; add INTERCEPT_DEBUG=true, or drop INTERCEPT_DEBUG_WAIT"),
    ("service: orders\n    command: [a]\n    debug: true\n    debug_port: 8080", {}, "intercept.yaml:3: intercepts[0]: debug_port (intercept.yaml:6) 8080 is also the local port (port)"),
    ("service: orders\n    watch: [src]", {}, "intercept.yaml:3: intercepts[0]: watch (intercept.yaml:4) restarts the local command on changes, but no command is given"),
])
def test_options_that_contradict_each_other_are_refused(body, env, expected):
    error = refused(f"version: 1\nintercepts:\n  - {body}\n", env)
    assert str(error).startswith(expected), str(error)
    assert error.line == 3


def test_contradictions_on_the_command_line_are_phrased_as_flags():
    with pytest.raises(SpecError, match=r"^nothing to intercept: give a SERVICE \(intercept start orders\) or --agent 10.0.0.7:9922"):
        merge(None, {}, {"port": 3000})
    with pytest.raises(SpecError, match=r"^--all takes every request, but --header sets a rule; drop one of them$"):
        merge(None, {}, {"service": "orders", "all": True, "headers": ("x-dev=a",)})
    with pytest.raises(SpecError, match=r"^--debug-wait waits for a debugger, which needs debug; add --debug, or drop --debug-wait$"):
        merge(None, {}, {"service": "orders", "command": ("a",), "debug_wait": True})


def test_two_local_processes_of_one_file_cannot_share_a_port():
    text = """\
version: 1
intercepts:
  - {service: orders, command: [a]}
  - {service: cart, command: [b]}
"""
    error = refused(text)
    assert str(error).startswith("intercept.yaml:4: intercepts[1]: port 8080 is already used by intercept.yaml:3: intercepts[0]")
    # Without commands, two routes may share one local process.
    assert len(workspace(text.replace("command: [a]", "port: 8080").replace("command: [b]", "port: 8080")).intercepts) == 2
    # A flag that would make them collide is refused as well.
    ws = workspace(text.replace("command: [b]", "command: [b], port: 8081"))
    with pytest.raises(SpecError, match="port 9000 is already used"):
        resolve_workspace(ws, {}, {"port": 9000})


# --- the reference document -------------------------------------------------------------


def test_the_doc_holds_the_generated_reference():
    text = (DOCS / "intercept-yaml.md").read_text()
    assert update_reference(text) == text, "docs/intercept-yaml.md is stale: run python -m intercept.spec docs/intercept-yaml.md"


def test_the_doc_lists_every_option_with_its_spellings_and_default():
    text = (DOCS / "intercept-yaml.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 6 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    assert set(rows) == {o.key for o in OPTIONS}
    for option in OPTIONS:
        key, flag, env, _type, default, meaning = rows[option.key]
        assert env == f"`{option.env}`"
        assert option.flag in flag
        if option.default_doc is None:
            shown = {True: "true", False: "false"}.get(option.default, str(option.default))  # type: ignore[call-overload]
            assert default == f"`{shown}`", option.key
        else:
            assert default == option.default_doc.replace("|", "\\|")
        assert meaning


def test_update_reference_replaces_only_the_block():
    start, end = render_reference().splitlines()[0], render_reference().splitlines()[-1]
    stale = f"intro\n\n{start}\nold table\n{end}\n\nafter\n"
    assert update_reference(stale) == f"intro\n\n{render_reference()}\nafter\n"
    with pytest.raises(ValueError):
        update_reference("no block here")


def yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", ["intercept-yaml.md", "cde.md"])
def test_the_docs_examples_are_valid(doc):
    examples = [b for b in yaml_blocks(DOCS / doc) if "intercepts:" in b]
    assert examples
    for example in examples:
        # An indented example (inside a list item) is still one document.
        text = "\n".join(line[2:] if line.startswith("  ") and not example.startswith(("version", "#")) else line
                         for line in example.splitlines())
        assert workspace(text).intercepts
