"""The routing decision, tested alone: rules, W3C baggage, routes and the route table."""

from __future__ import annotations

import random

import pytest

from intercept.errors import RouteConflict, UsageError
from intercept.routing.match import (
    Baggage,
    HeaderEquals,
    HeaderRegex,
    PathPrefix,
    RegisteredRoute,
    Route,
    RouteTable,
    field_members,
    normalize_path,
    parse_baggage,
    parse_rule,
)


def route(*rules: str) -> Route:
    """route("header:x-dev=alice", "path-prefix:/api") -> Route."""
    return Route(frozenset(parse_rule(*spec.split(":", 1)) for spec in rules))


def hit(rule_or_route, headers=(), target=b"/", method=b"GET") -> bool:
    return rule_or_route.matches(method, target, list(headers))


# --- header equals -----------------------------------------------------------------


def test_header_equals_matches_exact_value():
    rule = parse_rule("header", "x-dev=alice")
    assert hit(rule, [(b"x-dev", b"alice")])
    assert not hit(rule, [(b"x-dev", b"alice2")])
    assert not hit(rule, [(b"x-dev", b"alic")])
    assert not hit(rule, [(b"x-other", b"alice")])
    assert not hit(rule, [])


def test_header_values_are_case_sensitive():
    rule = parse_rule("header", "x-dev=alice")
    assert not hit(rule, [(b"x-dev", b"Alice")])


def test_header_names_are_case_insensitive():
    rule = parse_rule("header", "X-Dev=alice")
    assert rule == HeaderEquals("x-dev", "alice")
    assert rule.name == "x-dev"
    assert hit(rule, [(b"x-dev", b"alice")])  # the caller lowercases request names


def test_header_equals_matches_any_repeated_line():
    rule = parse_rule("header", "x-dev=alice")
    assert hit(rule, [(b"x-dev", b"bob"), (b"accept", b"*/*"), (b"x-dev", b"alice")])
    assert not hit(rule, [(b"x-dev", b"bob"), (b"x-dev", b"carol")])


def test_header_equals_matches_comma_joined_lines():
    assert hit(parse_rule("header", "x-dev=a, b"), [(b"x-dev", b"a"), (b"x-dev", b"b")])
    assert hit(parse_rule("header", "x-dev=a,b"), [(b"x-dev", b"a"), (b"x-dev", b"b")])
    assert hit(parse_rule("header", "x-dev=a, b, c"), [(b"x-dev", b"a"), (b"x-dev", b"b"), (b"x-dev", b"c")])
    # The join is in wire order, and only of that header's lines.
    assert not hit(parse_rule("header", "x-dev=b, a"), [(b"x-dev", b"a"), (b"x-dev", b"b")])
    assert not hit(parse_rule("header", "x-dev=a, b"), [(b"x-dev", b"a"), (b"x-other", b"b")])


def test_header_equals_one_line_list_and_repeated_lines_are_the_same_field():
    rule = parse_rule("header", "x-dev=alice")
    one_line, two_lines = [(b"x-dev", b"alice, bob")], [(b"x-dev", b"alice"), (b"x-dev", b"bob")]
    assert hit(rule, one_line) and hit(rule, two_lines)
    assert hit(rule, [(b"x-dev", b"bob,alice")]) and hit(rule, [(b"x-dev", b"bob"), (b"x-dev", b"alice")])
    assert hit(parse_rule("header", "x-dev=a, b"), [(b"x-dev", b"a, b")])
    assert hit(parse_rule("header", "x-dev=a,b"), [(b"x-dev", b"a ,b")])
    assert not hit(parse_rule("header", "x-dev=a, b"), [(b"x-dev", b"a, b, c")])
    assert not hit(rule, [(b"x-dev", b"alice2, bob")])
    assert not hit(rule, [(b"x-dev", b"malice, bob")])


def test_header_list_members_ignore_empty_ones_and_commas_in_quotes():
    assert field_members([b"a,,b ,\t c"]) == [b"a", b"b", b"c"]
    assert field_members([b'"x,y", z']) == [b'"x,y"', b"z"]
    assert field_members([rb'"x\\",y']) == [rb'"x\\"', b"y"]  # an escaped backslash, then the closing quote
    assert field_members([rb'"x\",y']) == [rb'"x\",y']  # an escaped quote: the string goes on
    assert field_members([b'"open, never closed']) == [b'"open, never closed']
    assert field_members([b"", b" , "]) == []
    assert hit(parse_rule("header", 'x-dev="a,b"'), [(b"x-dev", b'"a,b", c')])
    assert not hit(parse_rule("header", "x-dev=a"), [(b"x-dev", b'"a,b"')])


def test_header_value_of_only_commas_is_refused():
    with pytest.raises(UsageError, match="no list member"):
        parse_rule("header", "x-dev=,")


def test_header_value_with_equals_sign_keeps_everything_after_the_first():
    rule = parse_rule("header", "authorization=Bearer a=b")
    assert rule == HeaderEquals("authorization", "Bearer a=b")
    assert hit(rule, [(b"authorization", b"Bearer a=b")])


def test_header_value_non_ascii_is_compared_as_utf8():
    rule = parse_rule("header", "x-dev=zoë")
    assert hit(rule, [(b"x-dev", "zoë".encode())])
    assert not hit(rule, [(b"x-dev", "zoë".encode("latin-1"))])


# --- header regex ------------------------------------------------------------------


def test_header_regex_is_a_full_match():
    rule = parse_rule("header-regex", "x-dev=alice")
    assert hit(rule, [(b"x-dev", b"alice")])
    assert not hit(rule, [(b"x-dev", b"alice2")])
    assert not hit(rule, [(b"x-dev", b"malice")])
    assert hit(parse_rule("header-regex", "x-dev=alice.*"), [(b"x-dev", b"alice2")])


def test_header_regex_matches_any_repeated_line():
    rule = parse_rule("header-regex", "x-dev=al.*")
    assert hit(rule, [(b"x-dev", b"bob"), (b"x-dev", b"alex")])
    assert not hit(rule, [(b"x-dev", b"bob"), (b"x-other", b"alex")])


def test_header_regex_tries_the_comma_joined_value():
    rule = parse_rule("header-regex", "x-dev=a, b")
    assert hit(rule, [(b"x-dev", b"a"), (b"x-dev", b"b")])
    assert not hit(rule, [(b"x-dev", b"a")])


def test_header_regex_matches_a_member_whether_on_one_line_or_several():
    rule = parse_rule("header-regex", "x-dev=al.*")
    assert hit(rule, [(b"x-dev", b"bob, alex")])
    assert hit(rule, [(b"x-dev", b"bob"), (b"x-dev", b"alex")])
    assert not hit(rule, [(b"x-dev", b"bob, carl")])
    whole = parse_rule("header-regex", "x-dev=a, b")
    assert hit(whole, [(b"x-dev", b"a,b")]) and hit(whole, [(b"x-dev", b"a"), (b"x-dev", b"b")])


def test_header_regex_needing_backtracking_is_refused_saying_why():
    for pattern in (r"(a)\1", "a(?=b)", "(?<!x)a", "((a{100}){100}){100}"):
        with pytest.raises(UsageError, match="cannot run in linear time"):
            parse_rule("header-regex", f"x-dev={pattern}")


def test_header_regex_that_backtracks_in_python_runs_in_linear_time():
    # (a+)+b against a long run of a's: Python's re takes exponential time; RE2 answers at once
    rule = parse_rule("header-regex", "x-dev=(a+)+b")
    assert not hit(rule, [(b"x-dev", b"a" * 50_000 + b"c")])
    assert hit(rule, [(b"x-dev", b"aaab")])


def test_header_regex_names_are_case_insensitive():
    rule = parse_rule("header-regex", "X-DEV=al.*")
    assert rule.name == "x-dev"
    assert hit(rule, [(b"x-dev", b"alice")])


def test_header_regex_with_non_ascii_pattern_matches_characters():
    rule = parse_rule("header-regex", "x-dev=zo.")
    assert not hit(rule, [(b"x-dev", "zoë".encode())])  # ASCII pattern: '.' is one byte
    rule = parse_rule("header-regex", "x-dev=[zoë]+")
    assert hit(rule, [(b"x-dev", "zoë".encode())])
    assert not hit(rule, [(b"x-dev", b"zox")])
    assert not hit(rule, [(b"x-dev", b"\xff\xfe")])  # undecodable bytes do not raise


# --- path prefix -------------------------------------------------------------------


def test_path_prefix_is_a_plain_string_prefix():
    rule = parse_rule("path-prefix", "/api")
    assert hit(rule, target=b"/api")
    assert hit(rule, target=b"/api/orders")
    assert hit(rule, target=b"/apiv2")  # like Telepresence's --http-path-prefix
    assert not hit(rule, target=b"/ap")
    assert not hit(rule, target=b"/v1/api")
    assert not hit(rule, target=b"/API")


def test_path_prefix_with_trailing_slash_needs_the_slash():
    rule = parse_rule("path-prefix", "/api/")
    assert hit(rule, target=b"/api/x")
    assert not hit(rule, target=b"/api")
    assert not hit(rule, target=b"/apiv2/")


def test_path_prefix_ignores_the_query():
    rule = parse_rule("path-prefix", "/api/orders")
    assert hit(rule, target=b"/api/orders?x=1")
    assert not hit(rule, target=b"/api?x=/api/orders")
    assert not hit(rule, target=b"/api?/orders")
    assert not hit(parse_rule("path-prefix", "/a"), target=b"/?a=1")


def test_path_prefix_uses_the_path_of_an_absolute_form_target():
    rule = parse_rule("path-prefix", "/api")
    assert hit(rule, target=b"http://orders.default:8080/api/x?y=1")
    assert hit(rule, target=b"https://h/api")
    assert not hit(rule, target=b"http://h/other/api")
    assert not hit(rule, target=b"http://api/x")  # the authority is not the path
    assert not hit(rule, target=b"http://h?/api")  # nor is the query
    assert not hit(rule, target=b"http://h")


def test_root_path_prefix_matches_absolute_form_without_path():
    rule = parse_rule("path-prefix", "/")
    assert hit(rule, target=b"http://h")
    assert hit(rule, target=b"http://h?x=1")
    assert hit(rule, target=b"/anything")


def test_path_prefix_never_matches_asterisk_or_authority_form():
    rule = parse_rule("path-prefix", "/")
    assert not hit(rule, target=b"*", method=b"OPTIONS")
    assert not hit(rule, target=b"orders:8080", method=b"CONNECT")
    assert not hit(rule, target=b"")


def test_path_prefix_compares_the_percent_encoded_path():
    rule = parse_rule("path-prefix", "/caf%C3%A9")
    assert hit(rule, target=b"/caf%C3%A9/menu")
    assert hit(rule, target=b"/caf%c3%a9/menu")  # hex case does not matter
    assert not hit(rule, target="/café".encode())


@pytest.mark.parametrize("raw, normalized", [
    (b"/api/../secret", b"/secret"),
    (b"/api/./x", b"/api/x"),
    (b"/a/b/..", b"/a/"),
    (b"/a/b/.", b"/a/b/"),
    (b"/../../etc", b"/etc"),
    (b"/..", b"/"),
    (b"/%61pi/x", b"/api/x"),
    (b"/api/%2e%2E/secret", b"/secret"),
    (b"/a%2fb", b"/a%2Fb"),
    (b"/a%7E%5F%2D%2E", b"/a~_-."),
    (b"/100%", b"/100%"),
    (b"/%zz", b"/%zz"),
    (b"//a/./b", b"//a/b"),
    (b"/a.b/.c/..d", b"/a.b/.c/..d"),
])
def test_paths_are_normalized_as_rfc_3986_says(raw, normalized):
    assert normalize_path(raw) == normalized


def test_path_prefix_matches_the_normalized_path():
    rule = parse_rule("path-prefix", "/api")
    assert not hit(rule, target=b"/api/../secret")
    assert not hit(rule, target=b"/api/%2e%2e/secret?x=/api")
    assert hit(rule, target=b"/%61pi/x")
    assert hit(rule, target=b"/x/../api/y?z=1")
    assert hit(rule, target=b"http://h/%61pi/x?q=/..")
    assert not hit(rule, target=b"http://h/api/../x")
    assert hit(parse_rule("path-prefix", "/%61pi"), target=b"/api")  # the prefix is normalized too


def test_path_prefix_with_a_dot_segment_is_refused_with_the_fix():
    with pytest.raises(UsageError) as caught:
        parse_rule("path-prefix", "/api/../v2")
    assert "dot segment" in str(caught.value) and "--path-prefix /v2" in str(caught.value)


# --- baggage -----------------------------------------------------------------------


def test_baggage_spec_example_single_header():
    assert parse_baggage([b"userId=alice,serverNode=DF%2028,isProduction=false"]) == {
        "userId": "alice",
        "serverNode": "DF 28",
        "isProduction": "false",
    }


def test_baggage_spec_example_several_headers_form_one_list():
    assert parse_baggage([b"userId=alice", b"serverNode=DF%2028,isProduction=false"]) == {
        "userId": "alice",
        "serverNode": "DF 28",
        "isProduction": "false",
    }


def test_baggage_spec_example_whitespace_around_keys_and_values():
    assert parse_baggage([b"userId =   alice", b"serverNode = DF%2028, isProduction = false"]) == {
        "userId": "alice",
        "serverNode": "DF 28",
        "isProduction": "false",
    }
    assert parse_baggage([b"\t a=1 \t,\tb\t=\t2\t"]) == {"a": "1", "b": "2"}


def test_baggage_spec_example_properties_are_ignored():
    header = b"key1=value1;property1;property2, key2 = value2, key3=value3; propertyKey=propertyValue"
    assert parse_baggage([header]) == {"key1": "value1", "key2": "value2", "key3": "value3"}


def test_baggage_values_are_percent_decoded_as_utf8():
    assert parse_baggage([b"dev=zo%C3%AB"]) == {"dev": "zoë"}
    assert parse_baggage([b"dev=a%2Cb%3Bc"]) == {"dev": "a,b;c"}
    assert parse_baggage([b"dev=%E2%9C%93"]) == {"dev": "\u2713"}


def test_baggage_invalid_utf8_becomes_replacement_character():
    assert parse_baggage([b"dev=a%FFb"]) == {"dev": "a\ufffdb"}


def test_baggage_stray_percent_is_kept_literally():
    assert parse_baggage([b"dev=100%,x=%zz"]) == {"dev": "100%", "x": "%zz"}


def test_baggage_value_may_contain_equals_signs():
    assert parse_baggage([b"token=a=b=="]) == {"token": "a=b=="}


def test_baggage_empty_value_is_valid():
    assert parse_baggage([b"a=,b=2"]) == {"a": "", "b": "2"}


def test_baggage_invalid_members_are_skipped_not_the_whole_header():
    header = b'good=1, no-equals, bad key=2, =3, quoted="x", sp=a b, back=a\\b, ok=2,,'
    assert parse_baggage([header]) == {"good": "1", "ok": "2"}
    assert parse_baggage([b"k\xff=1,fine=yes", b"v=\xc3\xa9,also=yes"]) == {"fine": "yes", "also": "yes"}


def test_baggage_duplicate_key_first_wins():
    assert parse_baggage([b"dev=alice,dev=bob"]) == {"dev": "alice"}
    assert parse_baggage([b"dev=alice", b"dev=bob"]) == {"dev": "alice"}
    # An invalid first member does not shadow a later valid one.
    assert parse_baggage([b"dev=a b,dev=bob"]) == {"dev": "bob"}


def test_baggage_keys_are_case_sensitive():
    assert parse_baggage([b"Dev=alice"]) == {"Dev": "alice"}
    assert not hit(parse_rule("baggage", "dev=alice"), [(b"baggage", b"Dev=alice")])


@pytest.mark.parametrize(
    "values",
    [
        [],
        [b""],
        [b","],
        [b";;;"],
        [b"="],
        [b"%"],
        [b"a=%"],
        [b"\x00\xff\r\n"],
        [b"a=1;" * 1000],
        [b",".join([b"k%d=v" % i for i in range(5000)])],
        [bytes(range(256))],
    ],
)
def test_baggage_malformed_input_never_raises(values):
    assert isinstance(parse_baggage(values), dict)


def test_baggage_random_bytes_never_raise():
    rng = random.Random(1234)
    alphabet = b"=,;% \t\"\\aZ09-%FFC3\x00\xff"
    for _ in range(2000):
        line = bytes(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        result = parse_baggage([line, bytes(rng.randrange(256) for _ in range(8))])
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in result.items())


def test_baggage_rule_matches_member_across_header_lines():
    rule = parse_rule("baggage", "dev=alice")
    assert hit(rule, [(b"baggage", b"userId=x"), (b"accept", b"*/*"), (b"baggage", b"dev = alice;p=1")])
    assert hit(rule, [(b"baggage", b"dev=al%69ce")])
    assert not hit(rule, [(b"baggage", b"dev=alice2")])
    assert not hit(rule, [(b"baggage", b"developer=alice")])
    assert not hit(rule, [(b"x-baggage", b"dev=alice")])
    assert not hit(rule, [])


def test_baggage_rule_uses_the_first_member_with_its_key():
    rule = parse_rule("baggage", "dev=alice")
    assert not hit(rule, [(b"baggage", b"dev=bob"), (b"baggage", b"dev=alice")])
    assert hit(rule, [(b"baggage", b"dev=alice,dev=bob")])


def test_baggage_rule_value_with_spaces_matches_percent_encoded_member():
    rule = parse_rule("baggage", "node=DF 28")
    assert hit(rule, [(b"baggage", b"node=DF%2028")])


# --- rule parsing ------------------------------------------------------------------


def test_parse_rule_builds_each_kind():
    assert parse_rule("header", "x-dev=alice") == HeaderEquals("x-dev", "alice")
    assert parse_rule("header-regex", "x-dev=al.*") == HeaderRegex("x-dev", "al.*")
    assert parse_rule("baggage", "dev=alice") == Baggage("dev", "alice")
    assert parse_rule("path-prefix", "/api") == PathPrefix("/api")


def test_rule_error_names_flag_value_and_fix():
    with pytest.raises(UsageError) as caught:
        parse_rule("header", "x dev=alice")
    assert str(caught.value) == (
        "--header 'x dev=alice': header name 'x dev' is not a valid HTTP token; "
        "write NAME=VALUE, e.g. --header x-dev=alice"
    )


@pytest.mark.parametrize(
    "kind, text, expected",
    [
        ("header", "x-dev", ["--header x-dev", "NAME=VALUE"]),
        ("header", "x-dev: alice", ["--header 'x-dev: alice'", "--header x-dev=alice"]),
        ("header", "=alice", ["not a valid HTTP token"]),
        ("header", "x(dev)=alice", ["'x(dev)'", "not a valid HTTP token"]),
        ("header", "x-dév=alice", ["not a valid HTTP token"]),
        ("header", "x-dev=", ["value is empty"]),
        ("header", "x-dev= alice", ["whitespace", "--header x-dev=alice"]),
        ("header", "x-dev=a\r\nb", ["control characters"]),
        ("header-regex", "x-dev=(", ["--header-regex", "not a valid regular expression"]),
        ("header-regex", "x-dev=", ["pattern is empty"]),
        ("header-regex", "x dev=a", ["not a valid HTTP token"]),
        ("header-regex", "x-dev", ["NAME=REGEX"]),
        ("baggage", "dev", ["--baggage dev", "KEY=VALUE"]),
        ("baggage", "dev=", ["value is empty", "--baggage dev=alice"]),
        ("baggage", "de v=alice", ["baggage key 'de v'", "not a valid HTTP token"]),
        ("path-prefix", "api", ["must start with '/'", "--path-prefix /api"]),
        ("path-prefix", "", ["must start with '/'"]),
        ("path-prefix", "/api?x=1", ["query", "--path-prefix /api"]),
        ("path-prefix", "/a b", ["--path-prefix '/a b'", "--path-prefix /a%20b"]),
        ("path-prefix", "/café", ["--path-prefix /caf%C3%A9"]),
        ("cookie", "a=b", ["unknown rule kind 'cookie'", "header-regex"]),
    ],
)
def test_parse_rule_rejects_bad_input_with_the_fix(kind, text, expected):
    with pytest.raises(UsageError) as caught:
        parse_rule(kind, text)
    for part in expected:
        assert part in str(caught.value)
    assert caught.value.exit_code == 2


def test_rules_cannot_be_built_invalid_directly():
    with pytest.raises(UsageError):
        HeaderEquals("x dev", "alice")
    with pytest.raises(UsageError):
        HeaderRegex("x-dev", "[")
    with pytest.raises(UsageError):
        Baggage("dev", "")
    with pytest.raises(UsageError):
        PathPrefix("api")


# --- routes ------------------------------------------------------------------------


def test_route_requires_all_rules():
    r = route("header:x-dev=alice", "path-prefix:/api")
    assert hit(r, [(b"x-dev", b"alice")], target=b"/api/x")
    assert not hit(r, [(b"x-dev", b"alice")], target=b"/web")
    assert not hit(r, [(b"x-dev", b"bob")], target=b"/api/x")


def test_route_without_rules_takes_all_traffic():
    r = Route(frozenset())
    assert hit(r, [], target=b"*")
    assert r.describe() == "all traffic"
    assert r.to_json() == []


def test_route_describe_each_kind():
    assert route("header:x-dev=alice").describe() == "x-dev: alice"
    assert route("header-regex:x-dev=al.*").describe() == "x-dev matching al.*"
    assert route("baggage:dev=alice").describe() == "baggage dev=alice"
    assert route("path-prefix:/api").describe() == "path /api*"


def test_route_describe_is_deterministic():
    specs = ["path-prefix:/api", "baggage:dev=alice", "header:x-b=2", "header-regex:x-dev=al.*", "header:x-a=1"]
    expected = "x-a: 1 and x-b: 2 and x-dev matching al.* and baggage dev=alice and path /api*"
    for seed in range(5):
        random.Random(seed).shuffle(specs)
        assert route(*specs).describe() == expected


def test_route_json_round_trip():
    r = route("header:X-Dev=alice", "header-regex:x-team=core|web", "baggage:dev=a b", "path-prefix:/api")
    data = r.to_json()
    assert data == [
        {"kind": "header", "name": "x-dev", "value": "alice"},
        {"kind": "header-regex", "name": "x-team", "pattern": "core|web"},
        {"kind": "baggage", "key": "dev", "value": "a b"},
        {"kind": "path-prefix", "prefix": "/api"},
    ]
    again = Route.from_json(data)
    assert again == r
    assert again.describe() == r.describe()
    assert hit(again, [(b"x-dev", b"alice"), (b"x-team", b"web"), (b"baggage", b"dev=a%20b")], target=b"/api")


def test_route_equality_ignores_rule_order_and_name_case():
    assert route("header:X-Dev=alice", "path-prefix:/a") == route("path-prefix:/a", "header:x-dev=alice")
    assert hash(route("header:X-Dev=alice")) == hash(route("header:x-dev=alice"))
    assert route("header:x-dev=alice") != route("header-regex:x-dev=alice")


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"kind": "header"}, "expected a list"),
        (["header"], "expected an object"),
        ([{"name": "x", "value": "y"}], "unknown kind"),
        ([{"kind": "cookie", "name": "x", "value": "y"}], "unknown kind 'cookie'"),
        ([{"kind": "header", "name": "x-dev"}], "field 'value' must be a string"),
        ([{"kind": "header", "name": "x-dev", "value": 3}], "field 'value' must be a string"),
        ([{"kind": "header", "name": "x-dev", "value": "a", "extra": 1}], "unexpected field(s) extra"),
        ([{"kind": "header", "name": "x dev", "value": "a"}], "not a valid HTTP token"),
        ([{"kind": "header-regex", "name": "x-dev", "pattern": "("}], "not a valid regular expression"),
        ([{"kind": "baggage", "key": "dev", "value": ""}], "value is empty"),
        ([{"kind": "path-prefix", "prefix": "api"}], "must start with '/'"),
    ],
)
def test_route_from_json_validates(data, expected):
    with pytest.raises(UsageError) as caught:
        Route.from_json(data)
    assert expected in str(caught.value)


# --- route table -------------------------------------------------------------------


def test_empty_table_matches_nothing():
    table = RouteTable()
    assert len(table) == 0
    assert table.match(b"GET", b"/", [(b"x-dev", b"alice")]) is None


def test_request_with_matching_header_reaches_its_route():
    table = RouteTable()
    alice = table.add("s-alice", "alice", route("header:x-dev=alice"))
    bob = table.add("s-bob", "bob", route("header:x-dev=bob"))
    assert table.match(b"GET", b"/", [(b"x-dev", b"alice")]) is alice
    assert table.match(b"GET", b"/", [(b"x-dev", b"bob")]) is bob
    assert table.match(b"GET", b"/", [(b"x-dev", b"carol")]) is None
    assert table.match(b"GET", b"/", []) is None


def test_first_registered_route_wins():
    table = RouteTable()
    broad = table.add("s1", "alice", route("header:x-dev=alice"))
    narrow = table.add("s2", "bob", route("header:x-dev=alice", "path-prefix:/api"))
    assert table.match(b"GET", b"/api", [(b"x-dev", b"alice")]) is broad
    table.remove(broad.id)
    assert table.match(b"GET", b"/api", [(b"x-dev", b"alice")]) is narrow


def test_first_registered_route_wins_regardless_of_specificity_or_id_order():
    table = RouteTable()
    first = table.add("s1", "alice", route("path-prefix:/"))
    table.add("s2", "bob", route("path-prefix:/api/orders"))
    assert table.match(b"GET", b"/api/orders/1", []) is first


def test_identical_rule_set_held_by_other_session_names_the_holder():
    table = RouteTable()
    table.add("s-bob", "bob", route("header:x-dev=alice"))
    with pytest.raises(RouteConflict) as caught:
        table.add("s-alice", "alice", route("header:X-Dev=alice"))
    assert caught.value.holder == "bob"
    assert str(caught.value) == (
        "route x-dev: alice is already held by bob; choose another header value, or ask bob to leave"
    )
    assert caught.value.exit_code == 6
    assert len(table) == 1


def test_conflict_with_same_developer_in_another_session_says_so():
    table = RouteTable()
    table.add("s1", "alice", route("baggage:dev=alice"))
    with pytest.raises(RouteConflict) as caught:
        table.add("s2", "alice", route("baggage:dev=alice"))
    assert "alice (in another session)" in str(caught.value)
    assert "choose another baggage value" in str(caught.value)


def test_overlapping_but_different_rule_sets_are_allowed():
    table = RouteTable()
    table.add("s1", "alice", route("header:x-dev=alice"))
    table.add("s2", "bob", route("header:x-dev=alice", "path-prefix:/api"))
    table.add("s3", "carol", route("header-regex:x-dev=alice"))
    assert len(table) == 3


def test_all_traffic_refused_while_another_session_holds_a_route():
    table = RouteTable()
    table.add("s-bob", "bob", route("header:x-dev=bob"))
    with pytest.raises(RouteConflict) as caught:
        table.add("s-alice", "alice", Route(frozenset()))
    assert caught.value.holder == "bob"
    assert "all traffic" in str(caught.value)
    assert "bob holds route x-dev: bob" in str(caught.value)
    assert len(table) == 1


def test_route_refused_while_another_session_holds_all_traffic():
    table = RouteTable()
    table.add("s-bob", "bob", Route(frozenset()))
    with pytest.raises(RouteConflict) as caught:
        table.add("s-alice", "alice", route("header:x-dev=alice"))
    assert caught.value.holder == "bob"
    assert "all traffic is already held by bob" in str(caught.value)
    with pytest.raises(RouteConflict):
        table.add("s-carol", "carol", Route(frozenset()))
    assert len(table) == 1


def test_same_session_re_adding_identical_route_is_idempotent():
    table = RouteTable()
    first = table.add("s1", "alice", route("header:x-dev=alice", "path-prefix:/api"))
    again = table.add("s1", "alice", route("path-prefix:/api", "header:X-DEV=alice"))
    assert again is first
    assert len(table) == 1


def test_same_session_may_hold_several_routes_and_all_traffic():
    table = RouteTable()
    a = table.add("s1", "alice", route("header:x-dev=alice"))
    b = table.add("s1", "alice", route("path-prefix:/debug"))
    everything = table.add("s1", "alice", Route(frozenset()))
    assert len({a.id, b.id, everything.id}) == 3
    assert table.match(b"GET", b"/other", []) is everything


def test_remove_drops_one_route_and_ignores_unknown_ids():
    table = RouteTable()
    a = table.add("s1", "alice", route("header:x-dev=alice"))
    b = table.add("s1", "alice", route("header:x-dev=al"))
    table.remove(a.id)
    table.remove(a.id)
    table.remove(999)
    assert len(table) == 1
    assert table.match(b"GET", b"/", [(b"x-dev", b"alice")]) is None
    assert table.match(b"GET", b"/", [(b"x-dev", b"al")]) is b


def test_remove_session_drops_its_routes_and_frees_them_for_others():
    table = RouteTable()
    a1 = table.add("s-alice", "alice", route("header:x-dev=alice"))
    b1 = table.add("s-bob", "bob", route("header:x-dev=bob"))
    a2 = table.add("s-alice", "alice", route("path-prefix:/api"))
    removed = table.remove_session("s-alice")
    assert removed == [a1, a2]
    assert len(table) == 1
    assert table.match(b"GET", b"/api", [(b"x-dev", b"alice")]) is None
    assert table.match(b"GET", b"/", [(b"x-dev", b"bob")]) is b1
    assert table.remove_session("s-alice") == []
    taken = table.add("s-carol", "carol", route("header:x-dev=alice"))
    assert taken.holder == "carol"


def test_all_traffic_is_free_again_after_its_holder_leaves():
    table = RouteTable()
    table.add("s-bob", "bob", Route(frozenset()))
    table.remove_session("s-bob")
    assert table.add("s-alice", "alice", route("header:x-dev=alice")).holder == "alice"


def test_route_ids_are_never_reused():
    table = RouteTable()
    a = table.add("s1", "alice", route("header:x-dev=alice"))
    table.remove(a.id)
    b = table.add("s1", "alice", route("header:x-dev=alice"))
    assert b.id != a.id


def test_snapshot_lists_routes_in_registration_order():
    table = RouteTable()
    a = table.add("s-alice", "alice", route("path-prefix:/api", "header:x-dev=alice"))
    b = table.add("s-bob", "bob", route("baggage:dev=bob"))
    assert table.snapshot() == [
        {
            "id": a.id,
            "holder": "alice",
            "session": "s-alice",
            "rules": [
                {"kind": "header", "name": "x-dev", "value": "alice"},
                {"kind": "path-prefix", "prefix": "/api"},
            ],
            "description": "x-dev: alice and path /api*",
        },
        {
            "id": b.id,
            "holder": "bob",
            "session": "s-bob",
            "rules": [{"kind": "baggage", "key": "dev", "value": "bob"}],
            "description": "baggage dev=bob",
        },
    ]


def test_registered_route_carries_session_and_holder():
    table = RouteTable()
    registered = table.add("s1", "alice", route("header:x-dev=alice"))
    assert isinstance(registered, RegisteredRoute)
    assert (registered.session_id, registered.holder) == ("s1", "alice")
    assert registered.route == route("header:x-dev=alice")


# -- the route index gives the linear scan's answer ---------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NAMES = ["x-dev", "X-Dev", "x-tenant", "baggage"]
_VALUES = ["alice", "bob", "alice,bob", "bob, alice", '"a,b"', "al"]
_RULES = st.one_of(
    st.builds(lambda n, v: HeaderEquals(n, v), st.sampled_from(_NAMES[:3]), st.sampled_from(_VALUES)),
    st.builds(lambda n, p: HeaderRegex(n, p), st.sampled_from(_NAMES[:3]), st.sampled_from(["al.*", "bob", "a.*, b.*", ".*"])),
    st.builds(lambda k, v: Baggage(k, v), st.sampled_from(["dev", "tenant"]), st.sampled_from(["alice", "bob", "a b"])),
    st.builds(PathPrefix, st.sampled_from(["/", "/api", "/api/v1", "/a", "/%61pi", "/shop"])),
)
_LINES = st.tuples(
    st.sampled_from([b"x-dev", b"x-tenant", b"baggage", b"host"]),
    st.sampled_from([b"alice", b"bob", b"alice, bob", b"bob,alice", b'"a,b"', b"al", b"", b"dev=alice",
                     b"dev=bob, tenant=alice", b"dev=a%20b", b"tenant=bob;p=1, dev=alice", b"dev=alice,dev=bob",
                     b"x,alice"]),
)
_TARGETS = st.sampled_from([b"/", b"/api", b"/api/v1/x?q=1", b"/apiv2", b"/%61pi/x", b"/api/../shop", b"/a/./b",
                            b"http://h", b"http://h/api?x", b"*", b"h:443", b"/shop?api", b"/a%2fb"])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(["s1", "s2", "s3", "s4"]), st.frozensets(_RULES, max_size=3),
                       st.sampled_from([None, 0.0, 4e9])), max_size=12),
    st.lists(st.tuples(_TARGETS, st.lists(_LINES, max_size=5)), min_size=1, max_size=8),
    st.lists(st.integers(0, 11), max_size=3),
)
def test_route_index_gives_the_linear_scans_answer(registrations, requests, removals):
    table = RouteTable()
    for session, rules, expires in registrations:
        if not rules and session != "s1":
            continue  # all traffic: at most one session, tested elsewhere
        try:
            table.add(session, session, Route(rules), expires=expires)
        except RouteConflict:
            pass
    for position in removals:  # the index follows removals too
        if position < len(table):
            table.remove(table.snapshot()[position]["id"])
    for target, lines in requests:
        headers = list(lines)
        expected = table.match_linear(b"GET", target, headers)
        assert table.match(b"GET", target, headers) is expected
        # the proxy hands over only the fields the table reads (RequestHead.fields): same answer
        assert table.match(b"GET", target, [f for f in headers if f[0] in table.names]) is expected


def test_the_first_registered_of_several_matching_routes_wins_through_the_index():
    table = RouteTable()
    first = table.add("s1", "ann", route("path-prefix:/api"))
    table.add("s2", "bob", route("header:x-dev=bob"))
    table.add("s3", "cat", route("header-regex:x-dev=b.*"))
    request = (b"GET", b"/api/x", [(b"x-dev", b"bob")])
    assert table.match(*request) is first
    table.remove(first.id)
    assert table.match(*request).holder == "bob"


def test_a_table_of_a_hundred_developers_finds_each_one():
    table = RouteTable()
    for i in range(100):
        kind = ("header:x-dev=dev{}", "baggage:dev=dev{}", "path-prefix:/dev{}/")[i % 3]
        table.add(f"s{i}", f"dev{i}", route(kind.format(i)))
    for i in range(100):
        lines = [(b"x-dev", f"dev{i}".encode())] if i % 3 == 0 else [(b"baggage", f"k=v, dev=dev{i}".encode())] if i % 3 == 1 else []
        got = table.match(b"GET", f"/dev{i}/x".encode(), lines)
        assert got is not None and got.holder == f"dev{i}"
    assert table.match(b"GET", b"/", [(b"host", b"x")]) is None


def test_mirrors_take_nothing_never_conflict_and_are_all_listed_for_a_request():
    from intercept.routing.match import Route, RouteTable, parse_rule

    alice = Route(frozenset({parse_rule("header", "x-dev=alice")}))
    table = RouteTable()
    intercept = table.add("s1", "alice", alice)
    bob = table.add("s2", "bob", alice, mirror=True)
    carol = table.add("s3", "carol", Route(), mirror=True)  # all traffic, beside alice's route
    assert table.add("s2", "bob", alice, mirror=True) is bob  # idempotent for its session
    view = (b"GET", b"/", [(b"x-dev", b"alice")])
    assert table.match(*view) is intercept
    assert table.mirrors_matching(*view) == [bob, carol]
    assert table.mirrors_matching(b"GET", b"/", []) == [carol]
    assert b"x-dev" in table.names
    bob.copied, bob.dropped = 3, 1
    assert [(r["holder"], r.get("mirror"), r.get("copied"), r.get("dropped")) for r in table.snapshot()] == [
        ("alice", None, None, None), ("bob", True, 3, 1), ("carol", True, 0, 0)]
    assert table.routes_of("s2") == [] and table.get(bob.id) is bob
    table.remove(bob.id)
    assert table.remove_session("s3") == [carol]
    assert not table.mirrors and table.match(*view) is intercept
