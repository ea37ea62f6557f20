"""The bound on what one answer may expand to (issue 16, finding 8;
docs/reference.md "Answers too large to render").

The sizer's estimate is a lower bound of the JSON the codec writes, for any
message under any `json` options, so that no answer that fits is refused; and
the codec refuses what does not fit, from the estimate when the body is made
of empty elements, and from the JSON's length otherwise. Each message in a
list counts as at least OBJECT_WEIGHT bytes: building it costs that much and more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_convert import OPTIONS, SETTINGS, classes_of, messages

from tlvproxy.config.model import JsonOptions
from tlvproxy.errors import AnswerTooLarge, UpstreamProtocolError
from tlvproxy.schema.codec import ProtobufCodec
from tlvproxy.schema.protos import compile_schema
from tlvproxy.schema.sizing import OBJECT_WEIGHT, Sizers

HERE = Path(__file__).parent
DEMO = HERE.parent.parent / "proto"
EMIT = JsonOptions(field_names="proto", enums="name", emit_defaults=True)
LIST = "demo.im.ListMessagesResponse"
BOMB = b"\x0a\x00" * (512 * 1024)  # 524,288 empty ChatMessages in 1 MiB


@pytest.fixture(scope="module")
def rich():
    return compile_schema([HERE], ["convert_test.proto"])


@pytest.fixture(scope="module")
def demo():
    return compile_schema([DEMO], ["demo/im.proto"])


def _codec(schema, name, options, **kwargs):
    return ProtobufCodec("answer", None, schema.message_class(name), options, schema, **kwargs)


def check_lower_bound(schema, message):
    name = message.DESCRIPTOR.full_name
    for options in OPTIONS:
        rendered = _codec(schema, name, options).response_json(message.SerializeToString())
        sizers = Sizers(options, object_weight=0)
        descriptor = schema.descriptor(name)
        assert sizers.least(descriptor) <= len(rendered), options
        sizer = sizers.sizer(descriptor)
        if sizer is not None:
            assert sizer(message, 1 << 40) <= len(rendered), (options, rendered)


@SETTINGS
@given(data=st.data())
def test_the_estimate_never_exceeds_the_json_on_the_rich_schema(rich, data):
    check_lower_bound(rich, data.draw(messages(classes_of(rich, "conv."))))


@SETTINGS
@given(data=st.data())
def test_the_estimate_never_exceeds_the_json_on_the_demo_schema(demo, data):
    check_lower_bound(demo, data.draw(messages(classes_of(demo, "demo."))))


def check_per_byte(schema, message):
    name = message.DESCRIPTOR.full_name
    descriptor = schema.descriptor(name)
    body = message.SerializeToString()
    for options in OPTIONS:
        for sizers in (Sizers(options), Sizers(options, object_weight=0)):
            sizer = sizers.sizer(descriptor)
            if sizer is not None:
                bound = sizers.least(descriptor) + sizers.per_byte(descriptor) * len(body)
                assert sizer(message, 1 << 40) <= bound, options


@SETTINGS
@given(data=st.data())
def test_the_estimate_grows_at_most_per_byte_on_the_rich_schema(rich, data):
    check_per_byte(rich, data.draw(messages(classes_of(rich, "conv."))))


@SETTINGS
@given(data=st.data())
def test_the_estimate_grows_at_most_per_byte_on_the_demo_schema(demo, data):
    check_per_byte(demo, data.draw(messages(classes_of(demo, "demo."))))


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_empty_elements_grow_the_estimate_by_near_per_byte(demo, options):
    # The worst body: each two bytes an empty message the sizer weighs. The
    # bound charges each element its field's key, which the estimate counts
    # once: close enough that no body the sizer would refuse skips it needlessly.
    sizers = Sizers(options)
    descriptor = demo.descriptor(LIST)
    message = demo.message_class(LIST).FromString(BOMB[:20_000])
    grown = sizers.sizer(descriptor)(message, 1 << 40) - sizers.least(descriptor)
    assert grown <= sizers.per_byte(descriptor) * 20_000 < grown * 1.25


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_per_byte_is_the_same_whichever_type_is_asked_first(rich, demo, options):
    # One Sizers serves a table's codecs, and remembers each type's figure,
    # recursive types (conv.All holds itself) included.
    for schema, prefix in ((rich, "conv."), (demo, "demo.")):
        names = [cls.DESCRIPTOR.full_name for cls in classes_of(schema, prefix)]
        for order in (names, names[::-1]):
            shared = Sizers(options)
            for name in order:
                descriptor = schema.descriptor(name)
                assert shared.per_byte(descriptor) == Sizers(options).per_byte(descriptor)


def test_a_long_key_for_each_nested_message_counts_per_byte(tmp_path):
    (tmp_path / "wrap.proto").write_text(
        'syntax = "proto3";\npackage w;\n'
        "message Wrap { Wrap a_long_name_the_json_repeats_at_each_level = 1; }\n"
    )
    schema = compile_schema([tmp_path], ["wrap.proto"])
    body = b""
    for _ in range(50):
        body = b"\x0a" + _varint(len(body)) + body
    check_per_byte(schema, schema.message_class("w.Wrap").FromString(body))


def test_a_body_under_the_bound_skips_the_sizer_and_one_over_it_does_not(demo):
    sizers = Sizers(EMIT)
    descriptor = demo.descriptor(LIST)
    # Empty elements, the most the estimate grows by per byte, up to just
    # over max_rendered: refused from the estimate, before the JSON is built.
    limit = 200_000
    count = limit // (2 * sizers.per_byte(descriptor)) + 1000
    codec = _codec(demo, LIST, EMIT, max_rendered=limit)
    with pytest.raises(AnswerTooLarge):
        codec.decode_response(b"\x0a\x00" * count)
    # A body short enough that even empty elements cannot be over the limit.
    fits = (limit - sizers.least(descriptor)) // sizers.per_byte(descriptor) // 2
    assert len(codec.response_json(b"\x0a\x00" * fits)) <= limit


@pytest.mark.parametrize("count", [0, 1, 2, 1000])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_the_estimate_of_empty_elements_is_their_json(demo, count, options):
    # What amplifies is structure, and structure is counted exactly.
    body = b"\x0a\x00" * count
    rendered = _codec(demo, LIST, options).response_json(body)
    message = demo.message_class(LIST).FromString(body)
    sizer = Sizers(options, object_weight=0).sizer(demo.descriptor(LIST))
    assert sizer(message, 1 << 40) == len(rendered)
    # Weighed, each message counts for at least OBJECT_WEIGHT bytes.
    weighed = Sizers(options).sizer(demo.descriptor(LIST))(message, 1 << 40)
    assert weighed >= count * OBJECT_WEIGHT
    assert weighed <= len(rendered) + count * OBJECT_WEIGHT


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_a_body_of_empty_elements_is_refused_whatever_the_options(demo, options):
    # Without emit_defaults its JSON is only 1.5 MB ({} each), but building it
    # would cost ~70 MiB: each message weighs OBJECT_WEIGHT bytes at least.
    with pytest.raises(AnswerTooLarge):
        _codec(demo, LIST, options).response_json(BOMB)


@pytest.mark.parametrize("fast", [True, False])
def test_a_body_of_empty_elements_is_refused_before_its_json_is_built(demo, fast):
    codec = _codec(demo, LIST, EMIT, fast=fast)  # 8 MiB: with the default max_body
    with pytest.raises(AnswerTooLarge) as raised:
        codec.response_json(BOMB)
    assert isinstance(raised.value, UpstreamProtocolError)  # answered 502
    assert raised.value.reason == "answer_too_large"
    assert "8388608 bytes as JSON" in raised.value.message
    with pytest.raises(AnswerTooLarge):
        codec.decode_response(BOMB)  # the WebSocket and status paths decode too


def test_the_bound_is_exact_on_the_json(demo):
    chat = b"\x08\x07\x10\x01\x18\x02\x22\x05hello\x28\x90\x4e"
    body = (b"\x0a" + bytes([len(chat)]) + chat) * 100
    size = len(_codec(demo, LIST, EMIT).response_json(body))
    assert len(_codec(demo, LIST, EMIT, max_rendered=size).response_json(body)) == size
    with pytest.raises(AnswerTooLarge):
        _codec(demo, LIST, EMIT, max_rendered=size - 1).response_json(body)


def test_a_recursive_type_is_sized_through_its_nesting(tmp_path):
    (tmp_path / "tree.proto").write_text(
        'syntax = "proto3";\npackage t;\n'
        "message Node { repeated Node children = 1; Node first = 2; uint32 n = 3; }\n"
    )
    schema = compile_schema([tmp_path], ["tree.proto"])
    # A chain of nodes, each holding 1,000 empty children: the estimate walks
    # into the children's parents, not into the children.
    inner = b"\x0a\x00" * 1000
    body = inner
    for _ in range(5):
        body = b"\x12" + _varint(len(body)) + body + inner
    codec = _codec(schema, "t.Node", EMIT)
    rendered = codec.response_json(body)
    message = schema.message_class("t.Node").FromString(body)
    estimate = Sizers(EMIT, object_weight=0).sizer(schema.descriptor("t.Node"))(message, 1 << 40)
    assert estimate <= len(rendered)
    assert estimate >= len(rendered) * 0.9
    weighed = Sizers(EMIT).sizer(schema.descriptor("t.Node"))(message, 1 << 40)
    with pytest.raises(AnswerTooLarge):
        _codec(schema, "t.Node", EMIT, max_rendered=weighed - 1).decode_response(body)
    assert codec.decode_response(body)["n"] == 0


def _varint(value):
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
