"""The WAF (docs/configuration.md `waf`): rules per location, deny/log, what
rules see (decoded views, every byte of a body) and what it costs, and the
catastrophic-pattern check `tlvproxy check` relies on."""

from __future__ import annotations

import json
import re
import time
from urllib.parse import parse_qsl, quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlvproxy.config.model import WafRule
from tlvproxy.errors import Forbidden
from tlvproxy.policy.waf import (
    Waf,
    WafMatch,
    body_views,
    catastrophic_reason,
    json_strings,
    message_views,
    query_views,
)

ALL = frozenset({"path", "query", "body", "headers"})
PHP = r"(?i)\b(eval|assert|base64_decode|system|passthru|shell_exec)\s*\("
SQL = r"(?i)union\s+select"
TRAVERSAL = r"\.\./"


def waf_rule(name, pattern, *, locations=ALL, action="deny", flags=0):
    return WafRule(
        name=name,
        locations=frozenset(locations),
        pattern=re.compile(pattern, flags),
        action=action,
    )


DEMO = [
    waf_rule("php_injection", PHP),
    waf_rule("sql_injection", SQL),
    waf_rule("path_traversal", TRAVERSAL),
]


def inspect(waf, *, path="/v1/messages", query="", body=b"", headers=()):
    return waf.inspect_request(path=path, query=query, body=body, headers=list(headers))


CHAT = [
    "I'll evaluate the system tomorrow",
    "the system, as planned (mostly), is down",
    "Let's meet at the union and select a table",
    "I assert that passthru is a word... right?",
    "base64_decode is a PHP function",
    "Système d'évaluation: 10/10 (très bien)",
    "拼音 (pinyin) 系统",
    "see section 4.2.1 / page 3",
    "",
]


@pytest.mark.parametrize("text", CHAT)
def test_normal_chat_text_passes(text):
    waf = Waf(DEMO)
    assert inspect(waf, body=f'{{"text": {text!r}}}'.encode()) == []
    assert inspect(waf, headers=[("x-note", text)]) == []
    assert waf.inspect_message(text) == []


@pytest.mark.parametrize(
    ("where", "probe", "rule"),
    [
        ("query", "q=eval(base64_decode('ZWNobyAx'))", "php_injection"),
        ("query", "cmd=system%28%27id%27%29&x=SYSTEM (1)", "php_injection"),
        ("body", '{"text": "<?php shell_exec (\\"ls\\"); ?>"}', "php_injection"),
        ("body", '{"q": "1 UNION SELECT password FROM users"}', "sql_injection"),
        ("query", "id=1%20union%0aselect", "sql_injection"),  # the query decoded
        ("query", "id=1 union\tselect 2", "sql_injection"),
        ("path", "/static/../../etc/passwd", "path_traversal"),
        ("headers", "() { :; }; passthru('id')", "php_injection"),
    ],
)
def test_probes_are_denied(where, probe, rule):
    waf = Waf(DEMO)
    if where == "path":
        found = inspect(waf, path=probe)
    elif where == "query":
        found = inspect(waf, query=probe)
    elif where == "body":
        found = inspect(waf, body=probe.encode())
    else:
        found = inspect(waf, headers=[("user-agent", probe)])
    expected = [] if rule is None else [WafMatch(rule, "deny", where)]
    assert found == expected


def test_invalid_utf8_body_is_scanned_with_replacement():
    waf = Waf(DEMO)
    body = b"\xff\xfe\x80 union select \xc3"
    assert inspect(waf, body=body) == [WafMatch("sql_injection", "deny", "body")]


@pytest.mark.parametrize("location", sorted(ALL))
def test_a_rule_applies_only_in_its_locations(location):
    waf = Waf([waf_rule("probe", "evil", locations={location})])
    hits = {
        "path": inspect(waf, path="/evil"),
        "query": inspect(waf, query="x=evil"),
        "body": inspect(waf, body=b"evil"),
        "headers": inspect(waf, headers=[("x-a", "evil")]),
    }
    for where, found in hits.items():
        assert found == ([WafMatch("probe", "deny", location)] if where == location else [])


@pytest.mark.parametrize("location", sorted(ALL))
def test_log_rules_match_in_each_location(location):
    waf = Waf([waf_rule("watch", "(?i)curl/", locations={location}, action="log")])
    args = {
        "path": {"path": "/curl/x"},
        "query": {"query": "ua=curl/8"},
        "body": {"body": b"curl/8.0"},
        "headers": {"headers": [("user-agent", "CURL/8.0")]},
    }[location]
    assert inspect(waf, **args) == [WafMatch("watch", "log", location)]


def test_every_matching_rule_once_deny_first_at_first_location():
    rules = [
        waf_rule("log_everything", "x", action="log"),
        waf_rule("php_injection", PHP),
        waf_rule("log_union", "union", action="log"),
        waf_rule("sql_injection", SQL),
    ]
    waf = Waf(rules)
    found = inspect(
        waf,
        path="/x",
        query="a=union select",
        body=b"eval(1) union select",
        headers=[("x", "x")],
    )
    assert found == [
        WafMatch("php_injection", "deny", "body"),
        WafMatch("sql_injection", "deny", "query"),
        WafMatch("log_everything", "log", "path"),
        WafMatch("log_union", "log", "query"),
    ]


def test_header_values_are_scanned_one_by_one():
    waf = Waf([waf_rule("exact", "^evil$", locations={"headers"})])
    assert inspect(waf, headers=[("a", "x"), ("b", "evil")]) == [
        WafMatch("exact", "deny", "headers")
    ]
    # Not matched across two values, nor in header names.
    assert inspect(waf, headers=[("a", "ev"), ("b", "il")]) == []
    assert inspect(waf, headers=[("evil", "x")]) == []


def test_websocket_messages_use_body_rules_only():
    waf = Waf(
        [
            waf_rule("path_only", "evil", locations={"path", "query", "headers"}),
            waf_rule("body_log", "(?i)hello", locations={"body"}, action="log"),
            waf_rule("sql_injection", SQL, locations={"body", "query"}),
        ]
    )
    assert waf.inspect_message("evil") == []
    assert waf.inspect_message('{"cmd": "send", "body": {"text": "Hello union select 1"}}') == [
        WafMatch("sql_injection", "deny", "body"),
        WafMatch("body_log", "log", "body"),
    ]
    assert Waf([waf_rule("path_only", "evil", locations={"path"})]).inspect_message("evil") == []


def test_every_byte_of_a_body_and_a_message_is_scanned():
    # Issue 16: only the first and last 32 KiB of a body were scanned, so an
    # 80,044-byte body with the probe at offset 40,000 passed.
    waf = Waf(DEMO)
    text = "a" * 39_989 + " eval(x) " + "a" * 40_034
    body = json.dumps({"text": text}).encode()
    assert (len(body), body.index(b"eval(")) == (80_044, 40_000)
    assert inspect(waf, body=body) == [WafMatch("php_injection", "deny", "body")]
    assert waf.inspect_message(body.decode()) == [WafMatch("php_injection", "deny", "body")]
    padding = b"a" * 600_000
    assert inspect(waf, body=padding + b" union select " + padding) == [
        WafMatch("sql_injection", "deny", "body")
    ]


def test_no_rules_match_nothing():
    waf = Waf([])
    assert inspect(waf, path="/../", query="union select", body=b"eval(1)") == []
    assert waf.inspect_message("eval(1)") == []


def test_deny_match_renders_as_forbidden_naming_the_rule():
    error = WafMatch("php_injection", "deny", "body").error()
    assert isinstance(error, Forbidden)
    assert (error.http_status, error.code, error.ws_close) == (403, "forbidden", 1008)
    assert "php_injection" in error.message


@pytest.mark.parametrize(
    ("pattern", "text"),
    [
        (SQL, "union \u017felect"),  # LATIN SMALL LETTER LONG S matches s
        (PHP, "\u017fy\u017ftem("),
        (r"(?i)kill", "\u212aill"),  # KELVIN SIGN matches k
        (r"(?i)\bin", "\u0131n"),  # DOTLESS I matches i
        (r"(?i)\bin", "\u0130N"),  # CAPITAL I WITH DOT ABOVE matches i
        (r"(?i)select", "SELECT"),
        (r"(?i:UNION)Select", "unionSelect"),
    ],
)
def test_case_insensitive_rules_see_every_case_variant(pattern, text):
    assert re.search(pattern, text), "the regex itself matches"
    waf = Waf([waf_rule("r", pattern)])
    assert inspect(waf, body=text.encode()) == [WafMatch("r", "deny", "body")]
    assert waf.inspect_message(text) == [WafMatch("r", "deny", "body")]


def test_case_sensitive_literal_is_not_folded():
    waf = Waf([waf_rule("r", r"(?i:UNION)Select")])
    assert inspect(waf, body=b"unionselect") == []


def test_every_character_matching_an_ascii_letter_case_insensitively_is_caught():
    # Scans every code point this Python's regex engine equates with an ASCII
    # character, so the WAF's quick literal search stays exact on newer versions.
    ascii_class = re.compile(r"(?i)[\x00-\x7f]")
    special = [chr(cp) for cp in range(128, 0x110000) if ascii_class.fullmatch(chr(cp))]
    assert special, "CPython equates at least the Kelvin sign with k"
    for char in special:
        for letter in "abcdefghijklmnopqrstuvwxyz":
            pattern = f"(?i)zq{letter}zq"
            text = f"zq{char}zq"
            if re.search(pattern, text):
                waf = Waf([waf_rule("r", pattern)])
                assert waf.inspect_message(text) != [], (hex(ord(char)), letter)


_RULES = [
    waf_rule("php", PHP),
    waf_rule("sql", SQL, action="log"),
    waf_rule("traversal", TRAVERSAL),
    waf_rule("flags", "select", flags=re.IGNORECASE),
    waf_rule("any_digit_run", r"\d{3}"),
    waf_rule("lookahead", r"ab(?=c)"),
    waf_rule("verbose", r"(?x) s y s  # a comment"),
    waf_rule("mixed_case", r"(?i:ab)Sce"),
    # These share "(" with `php`, so the three are indexed under it.
    waf_rule("php_eval", r"(?i)\beval\s*\("),
    waf_rule("php_system", r"\bsystem\s*\("),
]
# Tokens that make up the rules' literals, in several cases and with the
# characters Python's case-insensitive matching treats specially.
_token = st.sampled_from(
    [
        *"abcsyeSE(). /-0123 \n",
        *("union", "select", "SELECT", "eval", "EVAL", "..", "sys", "ab", "AB", "Sce", "sCE"),
        *("aBSce", "union select", "\u017fy\u017ftem(", "eval (", "../", "abc", "system"),
        *("\u017f", "\u212a", "\u0131", "\u0130", "é"),
    ]
)
_text = st.lists(_token, max_size=20).map("".join)


_rule_sets = st.lists(st.sampled_from(_RULES), min_size=1, unique_by=lambda rule: rule.name)


@settings(max_examples=500)
@given(rules=_rule_sets, path=_text, query=_text, body=_text, header=_text)
def test_verdict_equals_trying_every_regex(rules, path, query, body, header):
    # The literal pre-check must never change a verdict: compare with plain re.search.
    waf = Waf(rules)
    found = inspect(waf, path=path, query=query, body=body.encode(), headers=[("h", header)])
    expected = []
    for rule in rules:
        for where, text in (("path", path), ("query", query), ("body", body), ("headers", header)):
            if rule.pattern.search(text):
                expected.append(WafMatch(rule.name, rule.action, where))
                break
    expected.sort(key=lambda match: match.action != "deny")
    assert found == expected


@pytest.mark.parametrize(
    "pattern",
    [
        r"(a+)+",
        r"(a*)*",
        r"(.*a){20}",
        r"(x+x+)+y",
        r"(\w+\s?)*$",
        r"^(a+)+$",
        r"((ab)+)+",
        r"(a+?)+",
        r"(?:a+)*?",
        r"(?i)(a+A+)+",
        r"(a|a)*",
        r"(ab|ab)+",
        r"(.|\s)*",
        r"(?s)(.|\n)*",
        r"(?>(a+)+b)",
        r"x(\d+\d+)+y",
    ],
)
def test_catastrophic_patterns_are_flagged(pattern):
    reason = catastrophic_reason(pattern)
    assert reason is not None
    assert "exponential" in reason


@pytest.mark.parametrize(
    "pattern",
    [
        PHP,
        SQL,
        TRAVERSAL,
        r"a{2,5}",
        r"(ab)+",
        r"(a++)+",
        r"(?>a+)+",
        r"(a+)++",
        r"(?>(a+)+)",
        r"(a{2})+",
        r"(\d+\.){3}\d+",
        r"^[\w.+-]+@([\w-]+\.)+\w+$",
        r"(.|\n)*",
        r"(\w|\d)+",
        r"(ab?)+",
        r"a*a*b",
        r"(",
    ],
)
def test_safe_patterns_are_accepted(pattern):
    assert catastrophic_reason(pattern) is None


# ------------------------------------------------------------ decoded views (issue 16)


@pytest.mark.parametrize(
    "query",
    [
        # The inputs that passed before: the raw query holds no `eval(`.
        "text=eval%28phpinfo%28%29%29",
        "text=system+(id)",
        "text=%65val(x)",
        # Names are decoded too, fields apart, a name from its value at the first `=`.
        "%65val%28x%29",
        "a=1&%73ystem%20(id)=2",
        "a=b=%65val(x)",
        "a=%3D&b=pass%74hru%09%28",
    ],
)
def test_decoded_query_names_and_values_are_scanned(query):
    waf = Waf(DEMO)
    assert inspect(waf, query=query) == [WafMatch("php_injection", "deny", "query")]


@pytest.mark.parametrize(
    "query",
    [
        "q=50%25+off",
        "path=C%3A%5Cevals%5C&x",
        "text=evaluate+(later)",
        "text=%2565val(x)",  # decoded once: `%65val(x)` is what the upstream sees
        "text=%zz%65va",  # an invalid escape stays as it is
        "name=%E5%BC%A0+%FF",  # UTF-8, an invalid byte replaced
    ],
)
def test_ordinary_encoded_queries_pass(query):
    assert inspect(Waf(DEMO), query=query) == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "eval\\u0028phpinfo())"}',
        b'{"text": "\\u0065val(x)"}',
        b'{"text": "\\u0045\\u0056\\u0041\\u004C\\u0020("}',
        b'{"text": "system\\n(id)"}',  # the escape decodes to the whitespace \s matches
        b'{"\\u0065val(x)": 1}',  # an object key
        b'[1, {"a": [null, "x", {"b": "sys\\u0074em (1)"}]}]',
        b'"\\u0065val(x)"',  # a bare JSON string
        b'{"a": "\\"", "b": "\\\\", "c": "\\u0065val(1)"}',  # escaped quotes delimit nothing
        b'{"text": "\\x \\u0065val(x)"}',  # not JSON: read leniently all the same
        b'{"text": "\\u0065val(x)',  # unterminated
        '{"text": "eval(x)"}'.encode("utf-16"),  # JSON parsers read UTF-16 and -32
        '{"text": "eval(x)"}'.encode("utf-16-le"),
        '{"text": "eval(x)"}'.encode("utf-32-be"),
        '{"text": "\\u0065val(x)"}'.encode("utf-16-be"),
    ],
)
def test_json_strings_are_scanned_unescaped(body):
    waf = Waf(DEMO)
    assert inspect(waf, body=body) == [WafMatch("php_injection", "deny", "body")]
    if body.isascii() and b"\x00" not in body:
        assert waf.inspect_message(body.decode()) == [WafMatch("php_injection", "deny", "body")]


@pytest.mark.parametrize(
    "text",
    [
        '{"text": "\\\\u0065val(x)"}',  # an escaped backslash, then plain `u0065val(x)`
        '{"text": "caf\\u00e9 \\"system\\" (1)"}',
        '{"text": "\\ud83d\\ude00 \\ud800 (lone surrogate)"}',
        '{"text": "evaluate\\n(later)", "path": "C:\\\\evals\\\\"}',
        '"\\',
    ],
)
def test_ordinary_escaped_json_passes(text):
    waf = Waf(DEMO)
    assert inspect(waf, body=text.encode()) == []
    assert waf.inspect_message(text) == []


def test_views_are_built_only_when_decoding_changes_something():
    # The usual request pays a substring search per text, nothing more.
    assert query_views("did=d1&uid=1") == ("did=d1&uid=1",)
    assert query_views("a=%41&b=c&d+e=f") == ("a=%41&b=c&d+e=f", "A", "d e")
    assert body_views(b'{"to": 7, "text": "hi (there)"}') == ('{"to": 7, "text": "hi (there)"}',)
    assert body_views(b'{"a": "x\\ty", "b": "z"}') == ('{"a": "x\\ty", "b": "z"}', "x\ty")
    assert message_views('{"a": "b"}') == ('{"a": "b"}',)
    assert message_views('{"\\u0041": "b"}') == ('{"\\u0041": "b"}', "A")


def test_json_strings_are_exactly_the_strings_of_json_text():
    document = {"k\u00e9y\n": ['v"al\\ue', {"\u2028": "\U0001f600", "n": [1, None, "x"]}]}
    text = json.dumps(document)
    assert json_strings(text) == ["k\u00e9y\n", 'v"al\\ue', "\u2028", "\U0001f600"]


def _time(fn):
    """The best of five runs, in seconds: the least disturbed by other work."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize(
    "unit",
    [
        # Escaped strings full of the rules' literals: every view is built, the
        # `(` group's regexes run over all of it.
        b'"\\u0065val x", "sys\\u0074em; (", "union \\t", ',
        # A quote, then escaped quotes: one string to the end, never a retry per quote.
        b'\\"',
        # Unterminated strings and lone backslashes.
        b'"\\x(',
    ],
)
def test_inspection_time_is_linear_in_the_body_size(unit):
    waf = Waf(DEMO)
    small = b'["' + unit * (128 * 1024 // len(unit))
    large = b'["' + unit * (1024 * 1024 // len(unit))

    def scan(body):
        return lambda: inspect(waf, query="q=%28" * 100, body=body)

    scan(small)()  # warm up
    ratio = _time(scan(large)) / _time(scan(small))
    # 8 times the bytes: about 8 times the time; quadratic would be 64.
    assert ratio < 20, ratio
    assert waf.inspect_message(large.decode()) == inspect(waf, body=large)


# Random JSON documents whose strings are escaped at random, and random
# percent-encoded queries: the verdict must equal trying every regex on the
# raw text and on each string or query name and value as a parser reads it.
# The rules' tokens, and characters that encoding and escaping change.
_rich_text = st.lists(
    _token
    | st.sampled_from(['"', "\\", "%", "+", "&", "=", "%28", "\u2028", "\x00", "\U0001f600"]),
    max_size=20,
).map("".join)
_json_values = st.recursive(
    st.none() | st.integers(-5, 5) | _rich_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_rich_text, children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _escaped_json(draw):
    def encode(value):
        if isinstance(value, str):
            out = []
            for char in value:
                if char in '"\\' or char < " ":
                    out.append(json.dumps(char)[1:-1])
                elif draw(st.booleans()):
                    out.append(
                        json.dumps(char)[1:-1] if not char.isascii() else f"\\u{ord(char):04x}"
                    )
                else:
                    out.append(char)
            return '"' + "".join(out) + '"'
        if isinstance(value, list):
            return "[" + ", ".join(encode(item) for item in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{encode(k)}: {encode(v)}" for k, v in value.items()) + "}"
        return json.dumps(value)

    value = draw(_json_values)
    text = encode(value)
    assert json.loads(text) == value
    return value, text


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)


def _percent_encoded(draw_text):
    return draw_text.flatmap(
        lambda text: st.lists(st.booleans(), min_size=len(text), max_size=len(text)).map(
            lambda flags: "".join(
                quote(char, safe="") if flag else ("+" if char == " " else char)
                for char, flag in zip(text, flags, strict=True)
            )
        )
    )


_query_field = _percent_encoded(_rich_text)
_queries = st.lists(
    st.tuples(_query_field, _query_field).map("=".join) | _query_field, max_size=4
).map("&".join)


@settings(max_examples=300)
@given(rules=_rule_sets, document=_escaped_json(), query=_queries)
def test_verdict_on_decoded_views_equals_trying_every_regex(rules, document, query):
    value, body = document
    waf = Waf(rules)
    found = inspect(waf, query=query, body=body.encode())
    texts = {
        "query": [
            query,
            *(part for pair in parse_qsl(query, keep_blank_values=True) for part in pair),
        ],
        "body": [body, *_strings(value)],
    }
    expected = []
    for rule in rules:
        for where in ("query", "body"):
            if any(rule.pattern.search(text) for text in texts[where]):
                expected.append(WafMatch(rule.name, rule.action, where))
                break
    expected.sort(key=lambda match: match.action != "deny")
    assert found == expected
    in_message = [
        WafMatch(rule.name, rule.action, "body")
        for rule in rules
        if any(rule.pattern.search(text) for text in texts["body"])
    ]
    in_message.sort(key=lambda match: match.action != "deny")
    assert waf.inspect_message(body) == in_message
