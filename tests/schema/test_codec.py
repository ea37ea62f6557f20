"""Per-command body codecs: proto3 JSON with the table's options, json, raw (SPEC 3, 4.1)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tlvproxy.config.model import JsonOptions
from tlvproxy.errors import BadRequest, UpstreamProtocolError
from tlvproxy.schema.codec import JsonCodec, ProtobufCodec, RawCodec
from tlvproxy.schema.protos import compile_schema

PROTO = """
syntax = "proto3";
package t;
import "google/protobuf/timestamp.proto";
import "google/protobuf/struct.proto";

enum Color { COLOR_UNSPECIFIED = 0; COLOR_RED = 1; COLOR_BLUE = 2; }

message Item {
  uint32 id = 1;
  repeated string tags = 2;
  Color color = 3;
}

message Everything {
  uint32 to_uid = 1;
  int32 delta = 2;
  int64 big = 3;
  uint64 huge = 4;
  bool flag = 5;
  string user_name = 6;
  bytes data = 7;
  double ratio = 8;
  float small = 9;
  Color color = 10;
  Item item = 11;
  repeated Item items = 12;
  map<string, Item> by_name = 13;
  map<uint32, string> labels = 14;
  repeated int32 numbers = 15;
  google.protobuf.Timestamp at = 16;
  google.protobuf.Struct extra = 17;
  oneof target { string email = 18; uint32 phone = 19; }
  optional uint32 maybe = 20;
  sint64 signed = 21;
}

message Tree { string name = 1; Tree child = 2; }
"""

DEFAULT = JsonOptions()


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    root = tmp_path_factory.mktemp("proto")
    (root / "t.proto").write_text(PROTO)
    return compile_schema([root], ["t.proto"])


def codec(schema, options=DEFAULT, request="t.Everything", response="t.Everything"):
    return ProtobufCodec(
        "cmd",
        schema.message_class(request) if request else None,
        schema.message_class(response),
        options,
        schema,
    )


def bad_request(fn, *args):
    with pytest.raises(BadRequest) as caught:
        fn(*args)
    return caught.value.message


def parse(schema, body, name="t.Everything"):
    return schema.message_class(name).FromString(body)


# ---------------------------------------------------------------- round trips


def test_round_trip_of_every_kind_of_field(schema):
    value = {
        "to_uid": 42,
        "delta": -3,
        "big": "-9007199254740993",
        "huge": "18446744073709551615",
        "flag": True,
        "user_name": "ann",
        "data": "AAEC",
        "ratio": 0.5,
        "small": 1.5,
        "color": "COLOR_BLUE",
        "item": {"id": 1, "tags": ["a", "b"], "color": "COLOR_RED"},
        "items": [{"id": 2, "tags": [], "color": "COLOR_UNSPECIFIED"}],
        "by_name": {"x": {"id": 3, "tags": ["t"], "color": "COLOR_UNSPECIFIED"}},
        "labels": {"7": "seven"},
        "numbers": [1, -2, 3],
        "at": "2024-01-02T03:04:05Z",
        "extra": {"k": [1.0, "v", None, True]},
        "email": "a@b.c",
        "maybe": 0,
        "signed": "-5",
    }
    c = codec(schema)
    body = c.encode_value(value)
    message = parse(schema, body)
    assert message.huge == 2**64 - 1
    assert message.data == b"\x00\x01\x02"
    assert message.HasField("maybe")
    assert c.decode_response(body) == value
    assert c.decode_request(body) == value
    assert c.encode_response(value) == body
    assert json.loads(c.response_json(body)) == value


def test_response_json_is_compact_and_int64_are_strings(schema):
    c = codec(schema, JsonOptions(emit_defaults=False))
    body = schema.message_class("t.Everything")(to_uid=5, big=7, user_name="é").SerializeToString()
    assert c.response_json(body) == '{"to_uid":5,"big":"7","user_name":"é"}'.encode()


@given(
    to_uid=st.integers(0, 2**32 - 1),
    big=st.integers(-(2**63), 2**63 - 1),
    name=st.text(),
    numbers=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5),
    flag=st.booleans(),
)
def test_property_encode_then_decode_is_identity(schema, to_uid, big, name, numbers, flag):
    c = codec(schema, JsonOptions(emit_defaults=False))
    value = {"to_uid": to_uid, "big": big, "user_name": name, "numbers": numbers, "flag": flag}
    decoded = c.decode_request(c.encode_value(value))
    expected = {k: v for k, v in value.items() if v not in (0, "", [], False)}
    if "big" in expected:
        expected["big"] = str(big)
    assert decoded == expected


# ---------------------------------------------------------------- json options


def test_field_names_camel_on_output_and_both_on_input(schema):
    camel = codec(schema, JsonOptions(field_names="camel", emit_defaults=False))
    proto = codec(schema, JsonOptions(field_names="proto", emit_defaults=False))
    body = camel.encode_value({"toUid": 1, "user_name": "x"})
    assert camel.decode_response(body) == {"toUid": 1, "userName": "x"}
    assert proto.decode_response(body) == {"to_uid": 1, "user_name": "x"}


def test_enums_by_name_or_number(schema):
    names = codec(schema, JsonOptions(enums="name", emit_defaults=False))
    numbers = codec(schema, JsonOptions(enums="number", emit_defaults=False))
    body = names.encode_value({"color": 2, "item": {"color": "COLOR_RED"}})
    assert names.decode_response(body) == {"color": "COLOR_BLUE", "item": {"color": "COLOR_RED"}}
    assert numbers.decode_response(body) == {"color": 2, "item": {"color": 1}}


def test_open_enums_keep_unknown_numbers(schema):
    c = codec(schema, JsonOptions(emit_defaults=False))
    assert c.decode_response(c.encode_value({"color": 99})) == {"color": 99}


def test_emit_defaults(schema):
    body = codec(schema).encode_value({"to_uid": 1})
    quiet = codec(schema, JsonOptions(emit_defaults=False)).decode_response(body)
    loud = codec(schema, JsonOptions(emit_defaults=True)).decode_response(body)
    assert quiet == {"to_uid": 1}
    assert loud["big"] == "0"
    assert loud["flag"] is False
    assert loud["items"] == []
    assert loud["color"] == "COLOR_UNSPECIFIED"
    # Fields with presence (messages, oneofs, proto3 optional) stay absent when unset.
    assert "item" not in loud
    assert "email" not in loud
    assert "maybe" not in loud


def test_ignore_unknown_fields(schema):
    strict = codec(schema)
    lenient = codec(schema, JsonOptions(ignore_unknown_fields=True, emit_defaults=False))
    body = b'{"to_uid": 1, "nope": 2, "item": {"zzz": 1}, "color": "COLOR_GREEN"}'
    assert lenient.decode_response(lenient.encode_request(body, [])) == {
        "to_uid": 1,
        "item": {},
    }
    assert bad_request(strict.encode_request, body, []) == (
        "field 'nope': unknown field of t.Everything (its fields: to_uid, delta, big, huge, "
        "flag, user_name, data, ratio, small, color, item, items, by_name, labels, numbers, "
        "at, extra, email, phone, maybe, signed)"
    )


# ---------------------------------------------------------------- errors name the field


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"to_uid": "abc"}, "field 'to_uid': expected an integer (uint32), got \"abc\""),
        (
            {"to_uid": -1},
            "field 'to_uid': expected an integer (uint32), got -1 (out of range 0..4294967295)",
        ),
        ({"to_uid": 1.5}, "field 'to_uid': expected an integer (uint32), got 1.5"),
        ({"to_uid": True}, "field 'to_uid': expected an integer (uint32), got true"),
        (
            {"big": "12345678901234567890"},
            "field 'big': expected an integer (int64), got "
            '"12345678901234567890" (out of range -9223372036854775808..9223372036854775807)',
        ),
        ({"flag": "true"}, "field 'flag': expected a boolean (true or false), got \"true\""),
        ({"user_name": 5}, "field 'user_name': expected a string, got 5"),
        ({"data": "!!"}, "field 'data': expected a base64 string (bytes), got \"!!\""),
        ({"ratio": "fast"}, "field 'ratio': expected a number (double), got \"fast\""),
        (
            {"small": 1e39},
            "field 'small': expected a number (float), got 1e+39 (out of range for float)",
        ),
        (
            {"color": "GREEN"},
            "field 'color': expected an enum t.Color (COLOR_UNSPECIFIED, COLOR_RED, COLOR_BLUE, "
            'or its number), got "GREEN"',
        ),
        ({"item": {"id": "x"}}, "field 'item.id': expected an integer (uint32), got \"x\""),
        ({"item": 5}, "field 'item': expected an object (t.Item), got 5"),
        (
            {"items": [{"id": 1}, {"color": "NOPE"}]},
            "field 'items[1].color': expected an enum t.Color (COLOR_UNSPECIFIED, COLOR_RED, "
            'COLOR_BLUE, or its number), got "NOPE"',
        ),
        ({"items": {}}, "field 'items': expected a list of an object (t.Item), got {}"),
        ({"items": [None]}, "field 'items[0]': null is not allowed in a list"),
        (
            {"by_name": {"k": {"tags": [1]}}},
            "field 'by_name[\"k\"].tags[0]': expected a string, got 1",
        ),
        (
            {"labels": {"seven": "x"}},
            'field \'labels["seven"]\': a map key must be an integer (uint32), got "seven"',
        ),
        ({"numbers": [1, "two"]}, "field 'numbers[1]': expected an integer (int32), got \"two\""),
        (
            {"item": {"nope": 1}},
            "field 'item.nope': unknown field of t.Item (its fields: id, tags, color)",
        ),
        ({"toUid": 1, "to_uid": 2}, "field 'to_uid': given twice, as 'toUid' and 'to_uid'"),
        ({"email": "a", "phone": 1}, "field 'phone': oneof 'target' is already set by 'email'"),
    ],
)
def test_bad_fields_name_their_path_and_expected_type(schema, body, message):
    assert bad_request(codec(schema).encode_value, body) == message
    assert bad_request(codec(schema).encode_request, json.dumps(body).encode(), []) == message


def test_well_known_type_errors_name_the_field(schema):
    message = bad_request(codec(schema).encode_value, {"at": "yesterday"})
    assert message.startswith(
        "field 'at': expected the JSON form of google.protobuf.Timestamp, got \"yesterday\": "
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b"{",
            "the body is not valid JSON: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)",
        ),
        (b'{"ratio": NaN}', "the body is not valid JSON: NaN is not valid JSON"),
        (
            b"\xff",
            "the body is not valid JSON: 'utf-8' codec can't decode byte 0xff in "
            "position 0: invalid start byte",
        ),
        (b"[1, 2]", "the body must be a JSON object (t.Everything), got [1, 2]"),
        (b"null", "the body must be a JSON object (t.Everything), got null"),
    ],
)
def test_bad_json_bodies(schema, body, message):
    assert bad_request(codec(schema).encode_request, body, []) == message


def test_deeply_nested_bodies_are_refused(schema):
    c = codec(schema, request="t.Tree", response="t.Tree")
    value: dict = {"name": "leaf"}
    for _ in range(150):
        value = {"child": value}
    assert "nests more than 100 levels" in bad_request(c.encode_value, value)
    deep = b'{"child":' * 5000 + b"{}" + b"}" * 5000
    assert bad_request(c.encode_request, deep, []) == (
        "the body is not valid JSON: the JSON nests too deeply"
    )


def test_null_means_unset(schema):
    c = codec(schema, JsonOptions(emit_defaults=False))
    body = c.encode_value({"to_uid": None, "item": None, "items": None, "extra": None})
    assert c.decode_response(body) == {}


# ---------------------------------------------------------------- REST overlays


def test_empty_body_is_the_empty_object(schema):
    assert codec(schema).encode_request(b"", []) == b""
    assert codec(schema).encode_request(b"  \r\n", []) == b""


def test_overlays_apply_in_order_and_convert_types(schema):
    c = codec(schema, JsonOptions(emit_defaults=False))
    body = b'{"to_uid": 1, "user_name": "body", "flag": false}'
    query = {"to_uid": "2", "flag": "true", "color": "COLOR_RED", "cache_buster": "123"}
    path = {"to_uid": "3", "numbers": "7"}
    fields = {"user_name": "from-fields", "ratio": "0.25", "color": "2", "big": "-4"}
    value = c.decode_response(c.encode_request(body, [query, path, fields]))
    assert value == {
        "to_uid": 3,
        "flag": True,
        "user_name": "from-fields",
        "color": "COLOR_BLUE",
        "numbers": [7],
        "ratio": 0.25,
        "big": "-4",
    }


def test_overlays_accept_json_names_and_well_known_strings(schema):
    c = codec(schema, JsonOptions(emit_defaults=False))
    value = c.decode_response(
        c.encode_request(b"", [{"userName": "x", "at": "1970-01-01T00:00:10Z"}])
    )
    assert value == {"user_name": "x", "at": "1970-01-01T00:00:10Z"}


def test_overlay_replaces_a_oneof_member(schema):
    c = codec(schema, JsonOptions(emit_defaults=False))
    value = c.decode_response(c.encode_request(b'{"email": "a@b"}', [{"phone": "5"}]))
    assert value == {"phone": 5}


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ({"to_uid": "abc"}, "field 'to_uid': expected an integer (uint32), got \"abc\""),
        (
            {"to_uid": "4294967296"},
            "field 'to_uid': expected an integer (uint32), got "
            '"4294967296" (out of range 0..4294967295)',
        ),
        ({"flag": "yes"}, "field 'flag': expected a boolean (true or false), got \"yes\""),
        (
            {"color": "PURPLE"},
            "field 'color': expected an enum t.Color (COLOR_UNSPECIFIED, "
            'COLOR_RED, COLOR_BLUE, or its number), got "PURPLE"',
        ),
        (
            {"item": "1"},
            "field 'item': an object (t.Item) cannot be set from a string; send it "
            "in the JSON body",
        ),
    ],
)
def test_bad_overlay_values_name_the_field(schema, overlay, message):
    assert bad_request(codec(schema).encode_request, b"", [overlay]) == message


# ---------------------------------------------------------------- push and upstream bodies


def test_push_codec_decodes_and_encodes_the_push_only(schema):
    push = codec(schema, JsonOptions(emit_defaults=False), request=None, response="t.Item")
    body = push.encode_response({"id": 9, "tags": ["x"]})
    assert push.decode_response(body) == {"id": 9, "tags": ["x"]}
    assert bad_request(push.encode_request, b"{}", []) == "cmd is a push command; it cannot be sent"
    assert bad_request(push.encode_value, {}) == "cmd is a push command; it cannot be sent"
    assert bad_request(push.decode_request, b"") == "cmd is a push command; it cannot be sent"


def test_undecodable_upstream_body_is_a_protocol_error(schema):
    c = codec(schema)
    with pytest.raises(UpstreamProtocolError, match=r"not a valid t\.Everything"):
        c.decode_response(b"\xff\xff\xff")
    with pytest.raises(UpstreamProtocolError):
        c.response_json(b"\x0a\x05ab")
    with pytest.raises(BadRequest, match=r"not a valid t\.Everything"):
        c.decode_request(b"\xff\xff\xff")


def test_content_types():
    assert JsonCodec().content_type == "application/json"
    assert RawCodec().content_type == "application/octet-stream"


# ---------------------------------------------------------------- json and raw codecs


def test_json_codec_passes_valid_json_through_unchanged():
    c = JsonCodec()
    body = b'{ "b": 1,  "a": [true, null] }'
    assert c.encode_request(body, [{"ignored": "x"}]) is body
    assert c.encode_request(b"", []) == b"{}"
    assert c.response_json(body) is body
    assert c.response_json(b"") == b"null"
    assert c.decode_response(body) == {"b": 1, "a": [True, None]}
    assert c.decode_response(b"") is None
    assert c.encode_value({"x": "é"}) == '{"x":"é"}'.encode()
    assert c.decode_request(b"[1]") == [1]
    assert c.encode_response([1]) == b"[1]"


def test_json_codec_errors():
    c = JsonCodec()
    assert bad_request(c.encode_request, b"{oops}", []).startswith("the body is not valid JSON: ")
    assert bad_request(c.encode_value, float("nan")).startswith(
        "the body cannot be written as JSON: "
    )
    with pytest.raises(UpstreamProtocolError, match="not valid JSON"):
        c.response_json(b"<html>")
    with pytest.raises(BadRequest, match="not valid JSON"):
        c.decode_request(b"{")


# JSON-looking bytes: real documents (with NaN, huge and tiny numbers, lone
# surrogates), in UTF-8, -16 or -32, and fragments built from JSON's own tokens.
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 5, max_value=2**70)
    | st.integers(min_value=-(2**70), max_value=-(2**63) + 5)
    | st.floats()
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)
_json_bytes = st.one_of(
    st.builds(
        lambda value, encoding: json.dumps(value).encode(encoding, "surrogatepass"),
        _json_values,
        st.sampled_from(["utf-8", "utf-16", "utf-32", "utf-8-sig"]),
    ),
    st.lists(
        st.sampled_from(
            [
                "[",
                "]",
                "{",
                "}",
                ",",
                ":",
                '"',
                "\\u",
                "d800",
                "1",
                "-",
                ".",
                "e",
                "400",
                "9" * 25,
                "true",
                "nul",
                "NaN",
                "Infinity",
                " ",
                "\x01",
                "\xff",
                "é",
            ]
        ),
        max_size=12,
    ).map(lambda tokens: "".join(tokens).encode("utf-8", "surrogatepass")),
)


def _strict_json(body: bytes) -> object:
    """The reference: the json module, refusing NaN and Infinity."""

    def refuse(name: str) -> object:
        raise ValueError(name)

    return json.loads(body, parse_constant=refuse)


def _same(a: object, b: object) -> bool:
    """Equal and of the same types all the way down (1 is not 1.0, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=1000)
@given(body=_json_bytes)
def test_json_bodies_parse_exactly_as_the_json_module_parses_them(body):
    # Bodies are parsed by a faster parser first: it must never change which
    # bodies are valid (SPEC 4.1) nor the value read (big integers included).
    assume(body.strip())  # an empty body means {} or null, not a parse
    try:
        expected = _strict_json(body)
        valid = True
    except (ValueError, RecursionError):
        valid = False
    c = JsonCodec()
    try:
        value = c.decode_request(body)
        assert valid
        assert _same(value, expected)
    except BadRequest:
        assert not valid
    try:
        assert c.encode_request(body, []) is body
        assert valid
    except BadRequest:
        assert not valid
    try:
        assert c.response_json(body) is body
        assert valid
    except UpstreamProtocolError:
        assert not valid


def test_raw_codec_bytes_both_ways_and_base64_values():
    c = RawCodec()
    body = bytes(range(256))
    assert c.encode_request(body, []) is body
    assert c.response_json(body) is body
    value = c.decode_response(body)
    assert isinstance(value, str)
    assert c.encode_value(value) == body
    assert c.decode_request(b"\x00\xff") == "AP8="
    assert c.encode_response("AP8") == b"\x00\xff"
    assert c.encode_value("_-8") == b"\xff\xef"
    assert c.encode_value(b"\x01") == b"\x01"
    assert bad_request(c.encode_value, "not base64!") == (
        'a raw body must be base64, got "not base64!"'
    )
    assert bad_request(c.encode_value, 5) == "a raw body must be a base64 string, got 5"
