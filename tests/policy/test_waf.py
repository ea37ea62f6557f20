"""The WAF (SPEC 4.4): rules per location, deny/log, the body bound, and the
catastrophic-pattern check `tlvproxy check` relies on."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlvproxy.config.model import WafRule
from tlvproxy.errors import Forbidden
from tlvproxy.policy.waf import Waf, WafMatch, catastrophic_reason

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
        ("query", "id=1%20union%0aselect", None),  # raw query: not percent-decoded
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


def test_body_scan_is_bounded_to_head_and_tail():
    waf = Waf([waf_rule("sql_injection", SQL)], max_scan_bytes=1024)
    probe = b"union select"
    padding = b"a" * 10_000
    assert inspect(waf, body=probe + padding) == [WafMatch("sql_injection", "deny", "body")]
    assert inspect(waf, body=padding + probe) == [WafMatch("sql_injection", "deny", "body")]
    # Documented limit: the middle of a body over max_scan_bytes is not scanned.
    assert inspect(waf, body=padding + probe + padding) == []
    # A body of exactly max_scan_bytes is scanned whole.
    middle = b"a" * 500 + probe + b"a" * (1024 - 500 - len(probe))
    assert len(middle) == 1024
    assert inspect(waf, body=middle) == [WafMatch("sql_injection", "deny", "body")]
    # The two halves are scanned apart: no match made of the head's end and tail's start.
    split = b"union " + b"a" * 5000 + b"select"
    assert inspect(waf, body=split) == []
    # At most max_scan_bytes in all: one byte over, a probe across the middle is unseen.
    across = b"a" * 506 + probe + b"a" * (1025 - 506 - len(probe))
    assert len(across) == 1025
    assert inspect(waf, body=across) == []


def test_message_scan_is_bounded_like_a_body():
    waf = Waf([waf_rule("sql_injection", SQL)], max_scan_bytes=1024)
    padding = "a" * 10_000
    assert waf.inspect_message("union select" + padding) != []
    assert waf.inspect_message(padding + "union select") != []
    assert waf.inspect_message(padding + "union select" + padding) == []


def test_bad_scan_bound_is_rejected():
    with pytest.raises(ValueError, match="max_scan_bytes must be >= 2"):
        Waf(DEMO, max_scan_bytes=1)


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
