"""Converters specialised per message type against json_format (issue 10, SPEC 3 `json`)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlvproxy.config.model import JsonOptions
from tlvproxy.errors import BadRequest
from tlvproxy.schema.codec import ProtobufCodec
from tlvproxy.schema.convert import INT_RANGES, PARSE_DICT_ERRORS, Converters, Fallback
from tlvproxy.schema.protos import compile_schema

HERE = Path(__file__).parent
DEMO = HERE.parent.parent / "proto"
T = FieldDescriptor

OPTIONS = [
    JsonOptions(field_names=names, enums=enums, emit_defaults=emit)
    for names, enums, emit in itertools.product(
        ("proto", "camel"), ("name", "number"), (True, False)
    )
]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def rich():
    return compile_schema([HERE], ["convert_test.proto"])


@pytest.fixture(scope="module")
def demo():
    return compile_schema([DEMO], ["demo/im.proto"])


def flags(options):
    return {
        "preserving_proto_field_name": options.field_names == "proto",
        "use_integers_for_enums": options.enums == "number",
        "always_print_fields_with_no_presence": options.emit_defaults,
    }


def reference(message, options, pool):
    return json_format.MessageToDict(message, descriptor_pool=pool, **flags(options))


def same_json(a, b):
    # Text comparison: tells -0.0 from 0.0 and True from 1, which == does not.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# ---------------------------------------------------------------- random messages


def scalar_values(field):
    cpp = field.cpp_type
    if cpp in INT_RANGES:
        return st.integers(*INT_RANGES[cpp])
    if cpp == T.CPPTYPE_DOUBLE:
        return st.floats()
    if cpp == T.CPPTYPE_FLOAT:
        return st.floats(width=32)
    if cpp == T.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == T.CPPTYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        # Open enums keep unknown numbers; json_format prints them as numbers.
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if field.type == T.TYPE_BYTES:
        return st.binary(max_size=8)
    return st.text(max_size=6)


def fill_well_known(draw, message):
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Timestamp":
        message.seconds = draw(st.integers(-62135596800, 253402300799))
        message.nanos = draw(st.integers(0, 999_999_999))
    elif name == "google.protobuf.Int64Value":
        message.value = draw(st.integers(-(2**63), 2**63 - 1))
    else:  # Struct: finite numbers only, as JSON has no other
        message.update(
            draw(
                st.dictionaries(
                    st.text(max_size=3),
                    st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.integers(-9, 9)),
                    max_size=3,
                )
            )
        )


def fill(draw, message, depth):
    descriptor = message.DESCRIPTOR
    if descriptor.full_name.startswith("google.protobuf."):
        fill_well_known(draw, message)
        return
    chosen = {
        oneof.name: draw(st.sampled_from([None, *oneof.fields]))
        for oneof in descriptor.oneofs
        if len(oneof.fields) > 1
    }
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.name in chosen and chosen[oneof.name] is not field:
            continue
        if not draw(st.booleans()):
            continue
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
            container = getattr(message, field.name)
            keys = draw(st.lists(scalar_values(key_field), max_size=3, unique=True))
            for key in keys:
                if value_field.message_type is not None:
                    fill(draw, container[key], depth + 1)
                else:
                    container[key] = draw(scalar_values(value_field))
        elif entry is not None and field.is_repeated:
            for _ in range(draw(st.integers(0, 2))):
                fill(draw, getattr(message, field.name).add(), depth + 1)
        elif entry is not None:
            if depth < 2:
                child = getattr(message, field.name)
                child.SetInParent()
                fill(draw, child, depth + 1)
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(scalar_values(field), max_size=3)))
        else:
            setattr(message, field.name, draw(scalar_values(field)))


@st.composite
def messages(draw, classes):
    message = draw(st.sampled_from(classes))()
    fill(draw, message, 0)
    return message


def classes_of(schema, prefix):
    return [schema.message_class(n) for n in schema.message_names if n.startswith(prefix)]


# ---------------------------------------------------------------- writers


def check_writers(message, pool):
    for options in OPTIONS:
        write = Converters(options, pool).writer(message.DESCRIPTOR)
        assert same_json(write(message), reference(message, options, pool)), options


@SETTINGS
@given(data=st.data())
def test_writer_equals_json_format_on_the_rich_schema(rich, data):
    message = data.draw(messages(classes_of(rich, "conv.")))
    check_writers(message, rich.pool)


@SETTINGS
@given(data=st.data())
def test_writer_equals_json_format_on_the_demo_schema(demo, data):
    message = data.draw(messages(classes_of(demo, "demo.")))
    check_writers(message, demo.pool)


@pytest.mark.parametrize(
    "value",
    [0.1, -0.0, 1e-45, 3.4028234663852886e38, 16777217.0, math.inf, -math.inf, math.nan],
)
def test_float32_and_special_values_print_like_json_format(rich, value):
    message = rich.message_class("conv.All")(f_float=value, f_double=value, r_float=[value])
    check_writers(message, rich.pool)


def test_unset_and_empty_nested_messages(rich):
    cls = rich.message_class("conv.All")
    empty = cls()
    empty.f_leaf.SetInParent()
    empty.m_string["k"].SetInParent()
    empty.o_leaf.SetInParent()
    for message in (cls(), empty, cls(p_int32=0, p_string="", o_string="")):
        check_writers(message, rich.pool)


# ---------------------------------------------------------------- readers


def check_reader(message, pool):
    canonical = JsonOptions(emit_defaults=False)
    for options in OPTIONS:
        value = reference(message, options, pool)
        parsed = type(message)()
        # The fast reader must take json_format's own output without falling back.
        Converters(options, pool).reader(message.DESCRIPTOR)(value, parsed, 0)
        assert same_json(reference(parsed, canonical, pool), reference(message, canonical, pool))
        try:
            expected = json_format.ParseDict(value, type(message)(), descriptor_pool=pool)
        except json_format.ParseError as exc:
            refusal = str(exc)
        else:
            refusal = ""
        if refusal:
            # json_format prints the largest float32 as 3.4028235e+38 and then
            # refuses it as beyond the largest float32; we read it back.
            assert "Float value too" in refusal  # large or small
            continue
        assert parsed.SerializeToString(deterministic=True) == expected.SerializeToString(
            deterministic=True
        )


@SETTINGS
@given(data=st.data())
def test_reader_takes_back_json_format_output_on_the_rich_schema(rich, data):
    check_reader(data.draw(messages(classes_of(rich, "conv."))), rich.pool)


@SETTINGS
@given(data=st.data())
def test_reader_takes_back_json_format_output_on_the_demo_schema(demo, data):
    check_reader(data.draw(messages(classes_of(demo, "demo."))), demo.pool)


# ---------------------------------------------------------------- malformed input

MALFORMED = [
    {"f_int32": "abc"},
    {"f_int32": 2**31},
    {"f_uint32": -1},
    {"f_int64": "9223372036854775808"},
    {"f_uint64": 2**64},
    {"f_int32": True},
    {"f_int32": 1.5},
    {"f_int32": [1]},
    {"f_string": 5},
    {"f_string": ["a"]},
    {"f_bool": 1},
    {"f_bool": "yes"},
    {"f_bytes": 5},
    {"f_double": "fast"},
    {"f_double": {}},
    {"f_float": 1e39},
    # Numbers that are not finite: 1e400 as the json module reads it, YAML's .inf and .nan.
    {"f_double": math.inf},
    {"f_double": -math.inf},
    {"f_double": math.nan},
    {"p_double": math.inf},
    {"f_float": math.inf},
    {"f_float": math.nan},
    {"r_double": [1.5, math.inf]},
    {"r_float": [math.nan]},
    {"m_sint32": {"1": -math.inf}},
    {"f_enum": "COLOR_GREEN"},
    {"f_enum": 2**31},
    {"f_leaf": 5},
    {"f_leaf": {"nope": 1}},
    {"f_leaf": {"count": "x"}},
    {"r_uint32": 5},
    {"r_uint32": [1, "x"]},
    {"r_uint32": [-1]},
    {"r_leaf": [5]},
    {"r_leaf": {}},
    {"m_int32": {"x": "a"}},
    {"m_int32": {"1": 5}},
    {"m_int32": []},
    {"m_bool": {"maybe": "a"}},
    {"m_uint32": {"1": "COLOR_GREEN"}},
    {"m_string": {"k": 5}},
    {"o_string": "a", "o_int64": 1},
    {"w_time": "yesterday"},
    {"w_int64": "x"},
    {"nope": 1},
    {"r_enum": ["COLOR_RED", "COLOR_GREEN"]},
]
# Stricter than ParseDict on purpose: it drops non-base64 characters and takes
# true as the enum number 1.
STRICTER = [{"f_bytes": "!!"}, {"f_enum": True}, {"r_enum": [False]}]
ACCEPTED = [
    {"f_int32": 5, "fInt64": "-7", "f_uint64": 18446744073709551615, "f_sint32": "-3"},
    {"f_double": "NaN", "f_float": "-Infinity", "r_double": [1, 2.5, "Infinity"]},
    {"f_bytes": "AAEC", "r_bytes": ["", "_-8"], "f_bool": False},
    {"f_enum": 7, "r_enum": ["COLOR_BLUE", 1], "p_enum": "COLOR_UNSPECIFIED"},
    {"m_bool": {"true": "t", "false": "f"}, "m_int64": {"-5": {"name": "x"}}},
    {"m_uint32": {"4294967295": "COLOR_RED"}, "m_sfixed64": {"-1": ""}},
    {"o_leaf": {}, "p_int32": 0, "renamed": "r"},
    {"w_time": "2024-01-02T03:04:05.5Z", "w_int64": "12", "w_struct": {"a": [1, None]}},
    {"f_self": {"f_self": {"f_leaf": {"color": "COLOR_RED"}}}},
]


def parse_dict_accepts(value, cls, pool, ignore_unknown):
    try:
        json_format.ParseDict(
            value, cls(), ignore_unknown_fields=ignore_unknown, descriptor_pool=pool
        )
    except PARSE_DICT_ERRORS:
        return False
    return True


def codec_result(schema, value, ignore_unknown, fast):
    options = JsonOptions(ignore_unknown_fields=ignore_unknown)
    cls = schema.message_class("conv.All")
    codec = ProtobufCodec("cmd", cls, cls, options, schema, fast=fast)
    try:
        return True, codec.encode_value(value)
    except BadRequest as exc:
        return False, exc.message


@pytest.mark.parametrize("ignore_unknown", [False, True])
@pytest.mark.parametrize("value", MALFORMED + ACCEPTED)
def test_accepts_and_rejects_what_parse_dict_does(rich, value, ignore_unknown):
    fast = codec_result(rich, value, ignore_unknown, fast=True)
    cls = rich.message_class("conv.All")
    assert fast[0] == parse_dict_accepts(value, cls, rich.pool, ignore_unknown)
    # Same bytes or the same error text as the reference (generic) path.
    assert fast == codec_result(rich, value, ignore_unknown, fast=False)
    if fast[0]:
        expected = json_format.ParseDict(
            value, cls(), ignore_unknown_fields=ignore_unknown, descriptor_pool=rich.pool
        )
        assert cls.FromString(fast[1]) == expected


# Valid values for a third of conv.All's fields: a body holding them is read
# by the generated reader, which looks each field up; a body holding fewer
# goes to the dispatching reader, which the cases above reach.
DENSE = {
    "f_double": 1.5,
    "f_float": 2.5,
    "f_int32": 1,
    "f_int64": "2",
    "f_uint32": 3,
    "f_uint64": 4,
    "f_sint32": -5,
    "f_sint64": "-6",
    "f_fixed32": 7,
    "f_fixed64": "8",
    "f_sfixed32": -9,
    "f_sfixed64": "-10",
    "f_bool": True,
    "f_string": "s",
    "f_bytes": "AAEC",
    "f_enum": "COLOR_RED",
    "f_leaf": {"name": "n", "color": 2, "count": 3},
    "r_string": ["a", "b"],
}


@pytest.mark.parametrize("ignore_unknown", [False, True])
@pytest.mark.parametrize("value", MALFORMED + ACCEPTED + STRICTER)
def test_the_generated_reader_agrees_with_the_reference_on_dense_bodies(
    rich, value, ignore_unknown
):
    # The value's fields replace DENSE's, whichever spelling either uses.
    fields = rich.descriptor("conv.All").fields
    named = {
        spelling
        for f in fields
        if {f.name, f.json_name} & set(value)
        for spelling in (f.name, f.json_name)
    }
    body = {**{k: v for k, v in DENSE.items() if k not in named}, **value}
    fast = codec_result(rich, body, ignore_unknown, fast=True)
    assert fast == codec_result(rich, body, ignore_unknown, fast=False)
    if value not in STRICTER:
        cls = rich.message_class("conv.All")
        assert fast[0] == parse_dict_accepts(body, cls, rich.pool, ignore_unknown)


def test_the_generated_reader_takes_a_dense_body_without_falling_back(rich):
    cls = rich.message_class("conv.All")
    message = cls()
    Converters(JsonOptions(), rich.pool).reader(cls.DESCRIPTOR)(DENSE, message, 0)
    assert message == json_format.ParseDict(DENSE, cls(), descriptor_pool=rich.pool)
    # Both spellings of a field, or a key that is no field's, is the generic
    # reader's to decide.
    for body in ({**DENSE, "fInt32": 1}, {**DENSE, "nope": 1}, {**DENSE, "f_leaf": None}):
        with pytest.raises(Fallback):
            Converters(JsonOptions(), rich.pool).reader(cls.DESCRIPTOR)(body, cls(), 0)


def body_result(schema, body, fast):
    cls = schema.message_class("conv.All")
    codec = ProtobufCodec("cmd", cls, cls, JsonOptions(), schema, fast=fast)
    try:
        return True, codec.encode_request(body, ())
    except BadRequest as exc:
        return False, exc.message


BIG = "100000000000000000000000"  # 1e22: orjson reads it as a float


@pytest.mark.parametrize(
    "body",
    [
        f'{{"f_double": {BIG}}}',
        f'{{"f_float": -{BIG}, "r_double": [18446744073709551616, 1]}}',
        f'{{"w_struct": {{"a": {BIG}}}, "m_sint32": {{"1": {BIG}}}}}',
        f'{{"f_int64": {BIG}}}',
        f'{{"f_uint64": 18446744073709551616, "f_double": {BIG}}}',
        '{"r_int64": [1, -9223372036854775809]}',
        f'{{"w_int64": {BIG}}}',
        # Read as the float -2**63, which json_format would take as INT64_MIN.
        '{"w_int64": -9223372036854775809}',
        '{"w_int64": -9223372036854776832, "f_double": 1.5}',
        '{"w_struct": {"a": [1, {"b": -9223372036854775809}]}}',
        # No float holds it: json_format's float() overflows.
        '{"w_struct": {"a": 1' + "0" * 400 + "}}",
        f'{{"f_string": {BIG}}}',
        json.dumps(DENSE)[:-1] + f', "f_int32": {BIG}}}',
    ],
)
def test_integers_outside_64_bits_read_as_the_exact_reading_does(rich, body):
    body = body.encode()
    fast = body_result(rich, body, fast=True)
    assert fast == body_result(rich, body, fast=False)
    if not fast[0]:
        # The error quotes the integer the body holds, not a float.
        assert "e+" not in fast[1]


@pytest.mark.parametrize("value", STRICTER)
def test_rejects_what_parse_dict_lets_through(rich, value):
    cls = rich.message_class("conv.All")
    assert parse_dict_accepts(value, cls, rich.pool, False)
    assert not codec_result(rich, value, False, fast=True)[0]
    assert codec_result(rich, value, False, fast=True) == codec_result(
        rich, value, False, fast=False
    )


def test_unknown_fields_and_enum_names_under_ignore_unknown_fields(rich):
    value = {"f_int32": 1, "nope": 2, "f_leaf": {"zzz": 1}, "f_enum": "COLOR_GREEN"}
    assert codec_result(rich, value, False, fast=True) == (
        False,
        "field 'nope': unknown field of conv.All (its fields: "
        + ", ".join(f.name for f in rich.descriptor("conv.All").fields)
        + ")",
    )
    accepted, body = codec_result(rich, value, True, fast=True)
    assert accepted
    message = rich.message_class("conv.All").FromString(body)
    assert message.f_int32 == 1
    assert message.HasField("f_leaf")
    assert message.f_enum == 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner, max_size=2)
    ),
    max_leaves=4,
)


@settings(max_examples=200, deadline=None)
@given(
    body=st.dictionaries(
        st.sampled_from(
            [
                "f_int32",
                "fInt32",
                "f_int64",
                "f_float",
                "f_bool",
                "f_string",
                "f_bytes",
                "f_enum",
                "f_leaf",
                "r_uint32",
                "r_leaf",
                "m_int32",
                "m_bool",
                "m_string",
                "o_string",
                "o_int64",
                "p_int32",
                "w_time",
                "renamed",
                "custom_json_name",
                "nope",
            ]
        ),
        JSON_VALUES,
        max_size=4,
    ),
    ignore_unknown=st.booleans(),
    dense=st.booleans(),
)
def test_fast_and_reference_codecs_agree_on_any_json(rich, body, ignore_unknown, dense):
    if dense:
        body = {**DENSE, **body}
    assert codec_result(rich, body, ignore_unknown, fast=True) == codec_result(
        rich, body, ignore_unknown, fast=False
    )


# ---------------------------------------------------------------- bugs the generic reader had


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"f_string": "\ud800"},
            "field 'f_string': expected a string, got \"\\ud800\" (it holds a lone surrogate)",
        ),
        (
            {"f_double": 10**400},
            "field 'f_double': expected a number (double), got "
            + "1"
            + "0" * 56
            + "... (out of range)",
        ),
        (
            {"f_int64": "1" * 5000},
            "field 'f_int64': expected an integer (int64), got \""
            + "1" * 56
            + "... (too many digits)",
        ),
    ],
)
def test_values_protobuf_or_python_cannot_hold_are_bad_requests(rich, value, message):
    assert codec_result(rich, value, False, fast=True) == (False, message)


# ---------------------------------------------------------------- the demo hot path


def test_demo_requests_and_overlays_take_the_fast_path(demo):
    converters = Converters(JsonOptions(), demo.pool)
    send = demo.message_class("demo.im.SendMessageRequest")
    message = send()
    converters.reader(send.DESCRIPTOR)({"to_uid": 42, "text": "hi"}, message, 0)
    converters.overlay(send.DESCRIPTOR)(message, {"client_ip": "127.0.0.1", "limit": "x"})
    assert message == send(to_uid=42, text="hi", client_ip="127.0.0.1")
    profile = demo.message_class("demo.im.GetProfileRequest")
    message = profile()
    converters.overlay(profile.DESCRIPTOR)(message, {"user_id": "7"})
    assert message.user_id == 7
    with pytest.raises(Fallback):
        converters.overlay(profile.DESCRIPTOR)(profile(), {"userId": "-1"})


def test_codec_answers_match_the_reference_codec(demo):
    request = demo.message_class("demo.im.GetProfileRequest")
    response = demo.message_class("demo.im.Profile")
    body = response(
        user_id=42, nickname="ann", gender=1, status=9, created_at=-5, tags=["a"]
    ).SerializeToString()
    for options in OPTIONS:
        fast = ProtobufCodec("p", request, response, options, demo)
        slow = ProtobufCodec("p", request, response, options, demo, fast=False)
        assert fast.response_json(body) == slow.response_json(body)
        assert fast.decode_response(body) == slow.decode_response(body)
        assert fast.encode_request(b'{"userId": 3}', [{"user_id": "4"}]) == slow.encode_request(
            b'{"userId": 3}', [{"user_id": "4"}]
        )
