"""Comparing a command's answer with its mirror's, decoded field by field
(SPEC 4.6 `compare`): nested messages, repeated fields, maps, presence, other
message types, JSON and raw bodies, statuses, and what a path may show."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.schema.test_convert import classes_of, messages
from tlvproxy.config.model import JsonOptions
from tlvproxy.errors import UpstreamProtocolError
from tlvproxy.schema.codec import JsonCodec, ProtobufCodec, RawCodec
from tlvproxy.schema.compare import (
    BODY_PATH,
    STATUS_PATH,
    Comparer,
    Comparison,
    compare_answers,
)
from tlvproxy.schema.protos import Schema, compile_schema

HERE = Path(__file__).parent
DEMO = HERE.parent.parent / "proto"


@pytest.fixture(scope="module")
def rich() -> Schema:
    return compile_schema([HERE], ["convert_test.proto"])


@pytest.fixture(scope="module")
def demo() -> Schema:
    return compile_schema([DEMO], ["demo/im.proto"])


def codec(schema: Schema, response: str) -> ProtobufCodec:
    return ProtobufCodec("c", None, schema.message_class(response), JsonOptions(), schema)


def compare(
    schema: Schema,
    left: dict[str, Any],
    right: dict[str, Any],
    message: str = "conv.All",
    other: str | None = None,
    **options: Any,
) -> Comparison:
    a, b = codec(schema, message), codec(schema, other or message)
    return compare_answers(
        (a, 0, a.encode_response(left)), (b, 0, b.encode_response(right)), **options
    )


def paths(comparison: Comparison) -> list[str]:
    return [d.path for d in comparison.differences]


def test_the_same_answer_is_the_same(rich: Schema) -> None:
    value = {"f_string": "x", "r_leaf": [{"name": "a"}], "m_string": {"k": {"count": "3"}}}
    comparison = compare(rich, value, value)
    assert comparison.same
    assert comparison == Comparison((), 0)


def test_scalars_and_nested_messages(rich: Schema) -> None:
    left = {"f_string": "a", "f_int32": 1, "f_leaf": {"name": "x", "color": "COLOR_RED"}}
    right = {"f_string": "b", "f_int32": 1, "f_leaf": {"name": "y", "color": "COLOR_RED"}}
    assert paths(compare(rich, left, right)) == ["f_string", "f_leaf.name"]


def test_repeated_fields_element_by_element(rich: Schema) -> None:
    left = {"r_string": ["a", "b"], "r_leaf": [{"name": "x"}, {"name": "y"}]}
    right = {"r_string": ["a", "c", "d"], "r_leaf": [{"name": "x"}, {"name": "z"}]}
    assert paths(compare(rich, left, right)) == ["r_string[1]", "r_string[2]", "r_leaf[1].name"]


def test_maps_key_by_key_with_the_keys_elided(rich: Schema) -> None:
    left = {"m_string": {"alice": {"count": "1"}, "bob": {"count": "2"}}, "m_int32": {"1": "a"}}
    right = {"m_string": {"alice": {"count": "9"}, "carol": {}}, "m_int32": {"1": "a"}}
    comparison = compare(rich, left, right)
    # The keys are values (user names): one path stands for any of them.
    assert paths(comparison) == ["m_string[*].count", "m_string[*]"]
    assert all(d.left is d.right is None for d in comparison.differences)


def test_maps_show_their_keys_and_the_values_when_asked(rich: Schema) -> None:
    left = {"m_string": {"alice": {"count": "1"}}, "m_int32": {"7": "a"}}
    right = {"m_string": {"alice": {"count": "9"}}, "m_int32": {"7": "b", "8": "c"}}
    comparison = compare(rich, left, right, show_values=True)
    shown = {d.path: (d.left, d.right) for d in comparison.differences}
    assert shown == {
        'm_string["alice"].count': ("1", "9"),
        "m_int32[7]": ('"a"', '"b"'),
        "m_int32[8]": (None, '"c"'),
    }


def test_presence_tells_unset_from_the_default(rich: Schema) -> None:
    assert paths(compare(rich, {"p_int32": 0}, {})) == ["p_int32"]
    assert paths(compare(rich, {"o_int64": "0"}, {})) == ["o_int64"]
    assert paths(compare(rich, {"f_leaf": {}}, {})) == ["f_leaf"]
    # Without presence, unset is the default, as the JSON mapping writes it.
    assert compare(rich, {"f_int32": 0}, {}).same
    assert compare(rich, {"r_string": []}, {}).same


def test_well_known_types_are_compared_as_their_fields(rich: Schema) -> None:
    left = {"w_struct": {"a": [1, {"b": True}]}, "w_time": "2024-01-01T00:00:00Z"}
    right = {"w_struct": {"a": [1, {"b": False}]}, "w_time": "2024-01-01T00:00:01Z"}
    assert paths(compare(rich, left, right)) == [
        "w_time.seconds",
        "w_struct.fields[*].list_value.values[1].struct_value.fields[*].bool_value",
    ]


def test_other_message_types_compare_fields_of_the_same_name(demo: Schema) -> None:
    profile = {"user_id": 7, "nickname": "x"}
    same = compare(demo, profile, {"user_id": 7}, "demo.im.Profile", "demo.im.GetProfileRequest")
    assert paths(same) == ["nickname"]
    assert compare(
        demo, {"user_id": 7}, {"user_id": 7}, "demo.im.Profile", "demo.im.GetProfileRequest"
    ).same


def test_different_statuses_are_one_difference(demo: Schema) -> None:
    a = codec(demo, "demo.im.Profile")
    comparison = compare_answers((a, 0, b""), (a, 2, b""), show_values=True)
    assert [(d.path, d.left, d.right) for d in comparison.differences] == [(STATUS_PATH, "0", "2")]
    assert compare_answers((a, 2, b""), (a, 2, b"")).same


def test_at_most_limit_paths_and_a_count_of_the_others(rich: Schema) -> None:
    comparison = compare(rich, {"r_string": list("abcdefgh")}, {"r_string": []}, limit=3)
    assert paths(comparison) == ["r_string[0]", "r_string[1]", "r_string[2]"]
    assert comparison.more == 5


def test_shown_values_are_cut_short(rich: Schema) -> None:
    comparison = compare(rich, {"f_string": "x" * 500}, {}, show_values=True)
    [difference] = comparison.differences
    assert difference.left is not None
    assert len(difference.left) == 100
    assert difference.left.endswith("...")
    assert difference.right == '""'


def test_json_answers_compare_their_values() -> None:
    json = JsonCodec()
    comparison = compare_answers(
        (json, 0, b'{"a": {"b": [1, 2]}, "odd key": 1, "c": null}'),
        (json, 0, b'{"a": {"b": [1, 3, 4]}, "odd key": 2, "d": 0}'),
    )
    # A key that does not read as a name may be a value: elided unless shown.
    assert paths(comparison) == ["a.b[1]", "a.b[2]", "[*]", "c", "d"]
    shown = compare_answers(
        (json, 0, b'{"odd key": 1, "42": 1}'), (json, 0, b'{"odd key": 2}'), show_values=True
    )
    assert paths(shown) == ['["odd key"]', '["42"]']
    # 1 and 1.0 are one number; true is no number.
    assert compare_answers((json, 0, b"[1, true]"), (json, 0, b"[1.0, true]")).same
    assert paths(compare_answers((json, 0, b"[1]"), (json, 0, b"[true]"))) == ["[0]"]


def test_json_nested_deeper_than_recursion_allows() -> None:
    json = JsonCodec()
    deep = b"[" * 900 + b"1" + b"]" * 900
    other = b"[" * 900 + b"2" + b"]" * 900
    assert paths(compare_answers((json, 0, deep), (json, 0, other))) == ["[0]" * 900]


def test_raw_answers_are_one_value() -> None:
    raw = RawCodec()
    assert compare_answers((raw, 0, b"\x00\x01"), (raw, 0, b"\x00\x01")).same
    assert paths(compare_answers((raw, 0, b"\x00"), (raw, 0, b"\x01"))) == [BODY_PATH]


def test_an_undecodable_body_raises(demo: Schema) -> None:
    a = codec(demo, "demo.im.Profile")
    with pytest.raises(UpstreamProtocolError):
        compare_answers((a, 0, b""), (a, 0, b"\xff\xff"))
    with pytest.raises(UpstreamProtocolError):
        compare_answers((JsonCodec(), 0, b"{"), (JsonCodec(), 0, b"{}"))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_answer_is_the_same_as_itself_and_its_copy(rich: Schema, data: st.DataObject) -> None:
    message = data.draw(messages(classes_of(rich, "conv.")))
    a = codec(rich, message.DESCRIPTOR.full_name)
    body = message.SerializeToString()
    copy = type(message).FromString(body).SerializeToString(deterministic=True)
    assert compare_answers((a, 0, body), (a, 0, copy)).same


def test_equal_bodies_read_alike_are_the_same_without_decoding(demo: Schema) -> None:
    profile = codec(demo, "demo.im.Profile")
    # Not a Profile at all: equal bytes of one message type need no decoding.
    assert compare_answers((profile, 0, b"\xff"), (profile, 0, b"\xff")).same
    assert compare_answers((JsonCodec(), 0, b"{"), (JsonCodec(), 0, b"{")).same
    # Another message type reads the same bytes otherwise: they are decoded.
    other = codec(demo, "demo.im.GetProfileRequest")
    with pytest.raises(UpstreamProtocolError):
        compare_answers((profile, 0, b"\xff"), (other, 0, b"\xff"))
    with pytest.raises(UpstreamProtocolError):
        compare_answers((JsonCodec(), 0, b"{"), (RawCodec(), 0, b"{"))


def test_a_large_answer_is_compared_a_step_at_a_time(rich: Schema) -> None:
    left = {"r_leaf": [{"name": str(n)} for n in range(3000)], "f_string": "a"}
    right = {"r_leaf": [{"name": str(n)} for n in range(2999)] + [{"name": "x"}], "f_string": "b"}
    a = codec(rich, "conv.All")
    answers = ((a, 0, a.encode_response(left)), (a, 0, a.encode_response(right)))
    comparer = Comparer(*answers)
    steps = 1
    while (comparison := comparer.step(1000)) is None:
        steps += 1
    assert steps > 5  # 3,000 leaves of several fields each: not in one step of 1,000
    assert paths(comparison) == ["f_string", "r_leaf[2999].name"]
    assert comparison == compare_answers(*answers)


def walk(comparer: Comparer, budget: int) -> tuple[Comparison, int, int]:
    """Run `comparer` to the end in steps of `budget`: the outcome, how many
    steps, and the most budget any one step spent."""
    steps, most = 0, 0
    while True:
        before = comparer.spent
        comparison = comparer.step(budget)
        steps += 1
        most = max(most, comparer.spent - before)
        if comparison is not None:
            return comparison, steps, most


def test_a_million_elements_are_taken_budget_by_budget(rich: Schema) -> None:
    # A 1 MiB packed repeated field: no step may take its elements all at once.
    size = 1_000_000
    cls = rich.message_class("conv.All")
    left, right = cls(), cls()
    left.r_uint32.extend(n % 100 for n in range(size))
    right.r_uint32.extend(n % 100 for n in range(size))
    right.r_uint32[size // 2] = 100
    a = codec(rich, "conv.All")
    comparer = Comparer((a, 0, left.SerializeToString()), (a, 0, right.SerializeToString()))
    comparison, steps, most = walk(comparer, 2000)
    assert paths(comparison) == [f"r_uint32[{size // 2}]"]
    assert most <= 2000
    assert steps >= size // 2000


@pytest.mark.parametrize("show", [False, True])
def test_a_large_map_is_taken_budget_by_budget_in_key_order(rich: Schema, show: bool) -> None:
    size = 100_000
    cls = rich.message_class("conv.All")
    left, right = cls(), cls()
    for n in range(size):
        left.m_int32[n] = right.m_int32[n] = "v"
    right.m_int32[77_777] = "w"
    right.m_int32[5] = "w"
    a = codec(rich, "conv.All")
    comparer = Comparer(
        (a, 0, left.SerializeToString()),
        (a, 0, right.SerializeToString()),
        show_values=show,
    )
    comparison, _, most = walk(comparer, 2000)
    assert most <= 2000
    assert paths(comparison) == (["m_int32[5]", "m_int32[77777]"] if show else ["m_int32[*]"])
