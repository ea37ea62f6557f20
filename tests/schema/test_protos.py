"""Compiling .proto files at load time into private pools (SPEC 3 `proto`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pool

from tlvproxy.schema.protos import SchemaError, compile_schema

DEMO = Path(__file__).resolve().parents[2] / "proto"

V1 = """
syntax = "proto3";
package reload.test;
message Note { string text = 1; }
"""
V2 = """
syntax = "proto3";
package reload.test;
message Note { string text = 1; uint32 stars = 2; }
message Added { bool ok = 1; }
"""


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_demo_schema_has_the_demo_messages():
    schema = compile_schema([DEMO], ["demo/im.proto"])
    for name in (
        "demo.im.SendMessageRequest",
        "demo.im.SendMessageResponse",
        "demo.im.GetProfileRequest",
        "demo.im.Profile",
        "demo.im.ListMessagesRequest",
        "demo.im.ListMessagesResponse",
        "demo.im.ChatMessage",
        "demo.im.MessagePush",
        "demo.im.Heartbeat",
    ):
        assert schema.has_message(name), name
    profile = schema.message_class("demo.im.Profile")(user_id=7, nickname="ann")
    again = schema.message_class("demo.im.Profile").FromString(profile.SerializeToString())
    assert again.nickname == "ann"
    assert schema.descriptor("demo.im.Profile").fields_by_name["gender"].enum_type.full_name == (
        "demo.im.Gender"
    )
    assert schema.enum_descriptor("demo.im.Status").values_by_name["STATUS_AWAY"].number == 2
    assert schema.files == ("demo/im.proto",)


def test_unknown_names_raise_key_error():
    schema = compile_schema([DEMO], ["demo/im.proto"])
    assert not schema.has_message("demo.im.Nope")
    with pytest.raises(KeyError):
        schema.message_class("demo.im.Nope")
    with pytest.raises(KeyError):
        schema.descriptor("demo.im.Nope")
    with pytest.raises(KeyError):
        schema.enum_descriptor("demo.im.Nope")


def test_reload_with_changed_messages_builds_an_independent_pool(tmp_path):
    first_root, second_root = tmp_path / "a", tmp_path / "b"
    write(first_root, "note.proto", V1)
    write(second_root, "note.proto", V2)
    first = compile_schema([first_root], ["note.proto"])
    second = compile_schema([second_root], ["note.proto"])

    assert first.pool is not second.pool
    assert first.digest != second.digest
    old, new = first.message_class("reload.test.Note"), second.message_class("reload.test.Note")
    assert old is not new
    assert "stars" not in old.DESCRIPTOR.fields_by_name
    assert new(text="x", stars=3).stars == 3
    with pytest.raises(ValueError, match="stars"):
        old(stars=3)
    assert second.has_message("reload.test.Added")
    assert not first.has_message("reload.test.Added")
    # Nothing went to the process-wide default pool.
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("reload.test.Note")


def test_same_sources_give_the_same_digest(tmp_path):
    write(tmp_path, "note.proto", V1)
    assert (
        compile_schema([tmp_path], ["note.proto"]).digest
        == compile_schema([tmp_path], ["note.proto"]).digest
    )


def test_imports_and_well_known_types(tmp_path):
    write(
        tmp_path, "lib/common.proto", 'syntax = "proto3"; package lib; message Id { int64 v = 1; }'
    )
    write(
        tmp_path,
        "app.proto",
        """syntax = "proto3";
package app;
import "lib/common.proto";
import "google/protobuf/timestamp.proto";
message Event { lib.Id id = 1; google.protobuf.Timestamp at = 2; }
""",
    )
    schema = compile_schema([tmp_path], ["app.proto", "lib/common.proto"])
    assert schema.files == ("lib/common.proto", "google/protobuf/timestamp.proto", "app.proto")
    assert schema.has_message("lib.Id")
    assert schema.has_message("google.protobuf.Timestamp")
    event = schema.message_class("app.Event")()
    event.at.seconds = 5
    assert event.at.seconds == 5


def test_protoc_errors_name_the_file_line_and_column(tmp_path):
    write(
        tmp_path,
        "bad.proto",
        'syntax = "proto3";\npackage bad;\nmessage A {\n  Missing m = 1;\n  strng s = 2;\n}\n',
    )
    with pytest.raises(SchemaError) as caught:
        compile_schema([tmp_path], ["bad.proto"])
    where = str(tmp_path / "bad.proto")
    assert caught.value.problems == [
        f'{where}:4:3: "Missing" is not defined.',
        f'{where}:5:3: "strng" is not defined.',
    ]


def test_syntax_error_is_located(tmp_path):
    write(tmp_path, "syntax.proto", 'syntax = "proto3";\nmessage A {\n  int32 a = ;\n}\n')
    with pytest.raises(SchemaError) as caught:
        compile_schema([tmp_path], ["syntax.proto"])
    assert caught.value.problems == [f"{tmp_path / 'syntax.proto'}:3:13: Expected field number."]


def test_every_file_is_compiled_before_failing(tmp_path):
    write(tmp_path, "one.proto", 'syntax = "proto3";\nmessage One { Nope n = 1; }\n')
    with pytest.raises(SchemaError) as caught:
        compile_schema([tmp_path], ["one.proto", "absent.proto"])
    problems = caught.value.problems
    assert len(problems) == 2
    assert problems[0].startswith(f"{tmp_path / 'one.proto'}:2:15: ")
    assert problems[1] == f"absent.proto: file not found in the import paths ({tmp_path})"
