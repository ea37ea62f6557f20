"""The OpenAPI 3.1 document of the REST routes (SPEC 2 `tlvproxy openapi`, SPEC 6)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import jsonschema
import pytest
import yaml
from openapi_spec_validator import validate

from tests.auth.keys import jwks, rsa_jwk
from tests.fixtures import FIXTURE_TABLE
from tlvproxy.config.loader import load_table
from tlvproxy.openapi import ERROR_CODES, build_document

if TYPE_CHECKING:
    from pathlib import Path

ROOT = FIXTURE_TABLE.parents[2]

PROTO = """
syntax = "proto3";
package t;
import "google/protobuf/any.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/empty.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

enum Color { COLOR_UNSPECIFIED = 0; COLOR_RED = 1; COLOR_BLUE = 2; }

message Item {
  uint32 id = 1;
  repeated string tags = 2;
  Color color = 3;
  message Note { string text = 1; }
  Note note = 4;
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
  google.protobuf.Duration took = 22;
  google.protobuf.Value anything = 23;
  google.protobuf.ListValue list = 24;
  google.protobuf.Int64Value big_box = 25;
  google.protobuf.StringValue name_box = 26;
  google.protobuf.Any packed = 27;
  map<bool, int64> switches = 28;
  fixed64 stamp = 29;
}

message Tree { string name = 1; Tree child = 2; }

message Query {
  uint32 id = 1;
  string user_name = 2;
  Color color = 3;
  int64 since = 4;
  repeated string tags = 5;
  Item item = 6;
  string client_ip = 7;
}
"""

TABLE = """
proto: {paths: [proto], files: [t.proto]}
upstreams:
  svc: {nodes: [127.0.0.1:7001]}
commands:
  - {name: put_everything, command: 1, upstream: svc, request: t.Everything,
     response: t.Everything, http: {method: PUT, path: "/v1/things/{to_uid}"},
     uid: header.X-User-Id}
  - {name: get_query, command: 2, upstream: svc, request: t.Query, response: t.Tree,
     http: {method: GET, path: "/v1/query/{id}"}, uid: query.as_user,
     fields: {client_ip: remote_addr}}
  - {name: camel_tree, command: 3, upstream: svc, request: t.Tree, response: t.Item,
     http: {method: POST, path: /v1/trees}, json: {field_names: camel, enums: number}}
  - {name: echo, command: 4, upstream: svc, codec: json, http: {method: POST, path: /v1/echo}}
  - {name: blob, command: 5, upstream: svc, codec: raw, http: {method: POST, path: /v1/blob}}
  - {name: drop, command: 6, upstream: svc, request: t.Query,
     response: google.protobuf.Empty, http: {method: DELETE, path: "/v1/queries/{userName}"},
     fields: {clientIp: remote_addr}}
  - {name: pushed, command: 7, push: t.Tree}
status_map: {1: 400, 7: 409, 8: 409, 9: 418}
"""


def write_table(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "proto").mkdir(exist_ok=True)
    (tmp_path / "proto" / "t.proto").write_text(PROTO)
    path = tmp_path / "table.yaml"
    path.write_text(TABLE + extra)
    return path


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    table = load_table(write_table(tmp_path_factory.mktemp("openapi")))
    return table, build_document(table)


@pytest.fixture(scope="module")
def demo():
    table = load_table(FIXTURE_TABLE)
    return table, build_document(table)


def schema_validator(document, name):
    """A JSON Schema validator for component `name`, resolving the document's $refs."""
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(root)


def test_the_demo_document_is_valid_openapi_3_1(demo):
    _, document = demo
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert set(document["paths"]) == {
        "/v1/messages",
        "/v1/users/{user_id}/profile",
        "/v1/echo",
        "/v1/users/{user_id}/messages",
    }


def test_the_rich_document_is_valid_openapi_3_1(rich):
    _, document = rich
    validate(document)
    # Every routed command is an operation; the push command is not.
    ids = {op["operationId"] for methods in document["paths"].values() for op in methods.values()}
    assert ids == {"put_everything", "get_query", "camel_tree", "echo", "blob", "drop"}


def test_demo_path_parameter_is_typed_from_the_request_field(demo):
    _, document = demo
    operation = document["paths"]["/v1/users/{user_id}/profile"]["get"]
    assert operation["operationId"] == "get_profile"
    (param,) = operation["parameters"]
    assert param["name"] == "user_id"
    assert param["in"] == "path"
    assert param["required"] is True
    assert param["schema"]["type"] == "integer"
    assert param["schema"]["maximum"] == 2**32 - 1
    assert "requestBody" not in operation


def test_demo_post_has_a_json_body_and_the_uid_header(demo):
    _, document = demo
    operation = document["paths"]["/v1/messages"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/demo.im.SendMessageRequest"}
    assert operation["parameters"] == [
        {
            "name": "x-user-id",
            "in": "header",
            "required": False,
            "description": "The user id sent in the frame header (default 0).",
            "schema": {"type": "string"},
        }
    ]
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/demo.im.SendMessageResponse"}
    assert "client_ip (from remote_addr)" in operation["description"]


def test_demo_int64_fields_are_strings_and_enums_are_names(demo):
    _, document = demo
    schemas = document["components"]["schemas"]
    sent = schemas["demo.im.SendMessageResponse"]["properties"]
    assert sent["msg_id"]["type"] == "string"
    assert sent["sent_at"]["type"] == "string"
    profile = schemas["demo.im.Profile"]["properties"]
    assert profile["gender"] == {"$ref": "#/components/schemas/demo.im.Gender"}
    assert schemas["demo.im.Gender"]["enum"] == [
        "GENDER_UNSPECIFIED",
        "GENDER_FEMALE",
        "GENDER_MALE",
    ]
    assert profile["tags"] == {"type": "array", "items": {"type": "string"}}


def test_demo_get_lists_scalar_request_fields_as_query_parameters(demo):
    _, document = demo
    params = document["paths"]["/v1/users/{user_id}/messages"]["get"]["parameters"]
    assert [(p["name"], p["in"]) for p in params] == [("user_id", "path"), ("limit", "query")]


def test_every_error_status_answers_the_spec_error_body(demo):
    _, document = demo
    responses = document["paths"]["/v1/messages"]["post"]["responses"]
    expected = {400, 403, 404, 405, 408, 413, 429, 431, 500, 502, 503, 504}
    assert set(ERROR_CODES) == expected | {401}
    # 409 comes from the demo's status_map {3: 409}; 401 only for commands with
    # an authenticator, which the tests' table has none of.
    assert {int(s) for s in responses} == {200, 409} | expected
    components = document["components"]["responses"]
    for status in expected | {409}:
        ref = responses[str(status)]["$ref"]
        answer = components[ref.rsplit("/", 1)[1]]
        schema = answer["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}
        assert "X-Request-Id" in answer["headers"]
    assert "Allow" in components["Error405"]["headers"]
    assert "Retry-After" in components["Error429"]["headers"]
    assert "upstream_status" in components["Error400"]["description"]  # status_map {1: 400}


def test_the_error_body_schema_accepts_real_errors_and_refuses_others(demo):
    _, document = demo
    check = schema_validator(document, "ErrorBody")
    check.validate({"error": {"code": "bad_request", "message": "m", "request_id": "r"}})
    check.validate(
        {
            "error": {
                "code": "upstream_status",
                "message": "m",
                "request_id": "r",
                "status": 3,
                "body": {"msg_id": "1"},
            }
        }
    )
    assert not check.is_valid({"error": {"code": "nope", "message": "m", "request_id": "r"}})
    assert not check.is_valid({"error": {"code": "bad_request", "message": "m"}})


def test_rich_schemas_describe_every_field_kind(rich):
    _, document = rich
    schemas = document["components"]["schemas"]
    props = schemas["t.Everything"]["properties"]
    assert props["big"]["type"] == "string"
    assert props["huge"]["pattern"] == "^[0-9]+$"
    assert props["stamp"]["type"] == "string"  # fixed64
    assert props["signed"]["format"] == "int64"
    assert props["delta"] == {"type": "integer", "format": "int32"}
    assert props["data"]["contentEncoding"] == "base64"
    assert props["flag"] == {"type": "boolean"}
    assert props["ratio"]["oneOf"][0] == {"type": "number", "format": "double"}
    assert props["item"] == {"$ref": "#/components/schemas/t.Item"}
    assert props["items"] == {"type": "array", "items": {"$ref": "#/components/schemas/t.Item"}}
    assert props["by_name"] == {
        "type": "object",
        "additionalProperties": {"$ref": "#/components/schemas/t.Item"},
    }
    assert props["labels"]["additionalProperties"] == {"type": "string"}
    assert props["labels"]["propertyNames"] == {"pattern": "^-?[0-9]+$"}
    assert props["switches"]["propertyNames"] == {"enum": ["true", "false"]}
    assert props["switches"]["additionalProperties"]["type"] == "string"
    assert props["numbers"] == {"type": "array", "items": {"type": "integer", "format": "int32"}}
    # Nested messages are components of their own.
    assert schemas["t.Item"]["properties"]["note"] == {"$ref": "#/components/schemas/t.Item.Note"}
    assert schemas["t.Item.Note"]["properties"] == {"text": {"type": "string"}}


def test_rich_well_known_types(rich):
    _, document = rich
    schemas = document["components"]["schemas"]
    assert schemas["google.protobuf.Timestamp"]["format"] == "date-time"
    assert schemas["google.protobuf.Duration"]["pattern"].endswith("s$")
    assert schemas["google.protobuf.Struct"]["type"] == "object"
    assert "type" not in schemas["google.protobuf.Value"]
    assert schemas["google.protobuf.ListValue"]["type"] == "array"
    assert schemas["google.protobuf.Int64Value"]["type"] == "string"
    assert schemas["google.protobuf.StringValue"]["type"] == "string"
    assert schemas["google.protobuf.Any"]["required"] == ["@type"]
    # Empty is an ordinary message with no fields: {}.
    assert schemas["google.protobuf.Empty"]["properties"] == {}


def test_oneof_members_exclude_each_other(rich):
    _, document = rich
    schema = document["components"]["schemas"]["t.Everything"]
    assert schema["dependentSchemas"] == {
        "email": {"properties": {"phone": False}},
        "phone": {"properties": {"email": False}},
    }
    # The synthetic oneof of `optional uint32 maybe` is no constraint.
    assert "maybe" not in schema["dependentSchemas"]
    check = schema_validator(document, "t.Everything")
    assert check.is_valid({"email": "a@b"})
    assert not check.is_valid({"email": "a@b", "phone": 1})


def test_real_protobuf_json_output_validates_against_the_schema(rich):
    table, document = rich
    codec = table.codecs["put_everything"]
    message = codec.response(
        to_uid=7,
        big=-(2**62),
        huge=2**64 - 1,
        data=b"\x00\xff",
        ratio=float("nan"),
        color=2,
        items=[{"id": 1, "tags": ["x"], "note": {"text": "n"}}],
        by_name={"a": {"id": 2}},
        labels={3: "three"},
        phone=5,
        maybe=0,
        switches={True: 9},
        stamp=2**63,
    )
    message.at.FromSeconds(1_700_000_000)
    message.took.FromSeconds(90)
    message.extra.update({"k": [1, "two", None]})
    message.big_box.value = 12
    output = codec.decode_response(message.SerializeToString())
    assert output["big"] == str(-(2**62))
    schema_validator(document, "t.Everything").validate(output)
    # The schema is strict enough to catch a 64-bit integer written as a number.
    assert not schema_validator(document, "t.Everything").is_valid({**output, "big": 5})
    assert not schema_validator(document, "t.Everything").is_valid({**output, "color": 2})


def test_recursive_messages_are_one_self_referencing_component(rich):
    _, document = rich
    tree = document["components"]["schemas"]["t.Tree"]
    assert tree["properties"]["child"] == {"$ref": "#/components/schemas/t.Tree"}
    schema_validator(document, "t.Tree").validate({"name": "a", "child": {"child": {"name": "c"}}})


def test_command_json_options_give_a_component_variant(rich):
    table, document = rich
    schemas = document["components"]["schemas"]
    operation = document["paths"]["/v1/trees"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/t.Tree-camel-number"}
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/t.Item-camel-number"}
    item = schemas["t.Item-camel-number"]
    assert item["properties"]["color"] == {"$ref": "#/components/schemas/t.Color-numbers"}
    assert schemas["t.Color-numbers"]["enum"] == [0, 1, 2]
    assert schemas["t.Color"]["enum"] == ["COLOR_UNSPECIFIED", "COLOR_RED", "COLOR_BLUE"]
    # camel names: the variant of Everything has userName where the default has user_name.
    assert "user_name" in schemas["t.Everything"]["properties"]
    output = table.codecs["camel_tree"].decode_response(b"")
    schema_validator(document, "t.Item-camel-number").validate(output)


def test_camel_field_names_follow_json_name(tmp_path):
    table = load_table(write_table(tmp_path, "json: {field_names: camel}\n"))
    document = build_document(table)
    validate(document)
    props = document["components"]["schemas"]["t.Everything"]["properties"]
    assert "userName" in props
    assert "user_name" not in props
    assert "byName" in props


def test_get_query_parameters_skip_messages_repeated_and_gateway_fields(rich):
    _, document = rich
    params = document["paths"]["/v1/query/{id}"]["get"]["parameters"]
    assert [(p["name"], p["in"]) for p in params] == [
        ("id", "path"),
        ("user_name", "query"),
        ("color", "query"),
        ("since", "query"),
        ("as_user", "query"),  # the uid key expression
    ]
    by_name = {p["name"]: p for p in params}
    assert by_name["since"]["schema"]["type"] == "string"  # int64
    assert by_name["color"]["schema"] == {"$ref": "#/components/schemas/t.Color"}


def test_json_and_raw_codecs(rich):
    _, document = rich
    echo = document["paths"]["/v1/echo"]["post"]
    assert echo["requestBody"]["content"]["application/json"]["schema"] == {
        "description": "Any JSON value"
    }
    blob = document["paths"]["/v1/blob"]["post"]
    assert list(blob["requestBody"]["content"]) == ["application/octet-stream"]
    assert list(blob["responses"]["200"]["content"]) == ["application/octet-stream"]


def test_delete_route_and_status_map_outside_the_error_table(rich):
    _, document = rich
    drop = document["paths"]["/v1/queries/{userName}"]["delete"]
    assert "requestBody" not in drop
    # The path parameter and `fields` use JSON names; neither field is a query parameter.
    assert [(p["name"], p["in"]) for p in drop["parameters"]] == [
        ("userName", "path"),
        ("id", "query"),
        ("color", "query"),
        ("since", "query"),
    ]
    assert drop["parameters"][0]["schema"] == {"type": "string"}
    methods = document["paths"]["/v1/things/{to_uid}"]
    responses = document["components"]["responses"]
    assert "upstream status 9" not in responses["Error409"]["description"]
    assert "status 7, 8 here" in responses["Error409"]["description"]
    assert "status 9 here" in responses["Error418"]["description"]
    assert methods["put"]["responses"]["418"] == {"$ref": "#/components/responses/Error418"}


def test_envelope_tables_describe_the_envelope(tmp_path):
    table = load_table(write_table(tmp_path, "envelope: true\n"))
    document = build_document(table)
    validate(document)
    responses = document["paths"]["/v1/trees"]["post"]["responses"]
    assert set(responses) == {"200"}
    schema = responses["200"]["content"]["application/json"]["schema"]
    assert schema["allOf"][0] == {"$ref": "#/components/schemas/Envelope"}
    assert "ErrorBody" not in document["components"]["schemas"]
    assert document["components"]["responses"] == {}
    envelope = document["components"]["schemas"]["Envelope"]
    assert envelope["required"] == ["code", "msg", "data"]
    root = {**schema, "components": document["components"]}
    jsonschema.Draft202012Validator(root).validate({"code": 0, "msg": "ok", "data": {"id": 1}})
    jsonschema.Draft202012Validator(root).validate({"code": 504, "msg": "late", "data": None})
    assert not jsonschema.Draft202012Validator(root).is_valid({"code": 0, "msg": "ok"})


def test_the_document_is_json_and_stable(demo):
    table, document = demo
    text = json.dumps(document, sort_keys=True)
    assert json.dumps(build_document(table), sort_keys=True) == text
    assert document["info"]["version"] == table.version


def test_the_listener_and_the_authenticators_are_in_the_document(tmp_path):
    keys = tmp_path / "jwks.json"
    keys.write_text(jwks(rsa_jwk()))
    document = yaml.safe_load(FIXTURE_TABLE.read_text())
    document["proto"]["paths"] = [str(ROOT / "proto")]
    document["listen"] = {"http": "0.0.0.0:8080"}
    document["auth"] = [
        {"name": "users", "type": "jwt", "keys": str(keys)},
        {"name": "partners", "type": "api_key", "query": "key", "keys": {}},
    ]
    for command in document["commands"]:
        if command["name"] == "send_message":
            command["auth"] = "users"
        if command["name"] == "echo":
            command["auth"] = "partners"
    path = tmp_path / "commands.yaml"
    path.write_text(yaml.safe_dump(document))
    built = build_document(load_table(path))
    validate(built)
    assert built["servers"] == [
        {
            "url": "http://{host}:8080",
            "variables": {"host": {"default": "localhost", "description": "the gateway's host"}},
        }
    ]
    assert built["components"]["securitySchemes"] == {
        "users": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
        "partners": {"type": "apiKey", "in": "query", "name": "key"},
    }
    send = built["paths"]["/v1/messages"]["post"]
    assert send["security"] == [{"users": []}]
    assert "401" in send["responses"]
    profile = built["paths"]["/v1/users/{user_id}/profile"]["get"]
    assert profile["security"] == []
    assert "401" not in profile["responses"]


TRAFFIC = """
proto: {paths: [proto], files: [t.proto]}
upstreams:
  svc: {nodes: [127.0.0.1:7001]}
  svc_next: {nodes: [127.0.0.1:7002]}
commands:
  - name: get_query
    command: 2
    upstream: svc
    request: t.Query
    response: t.Tree
    http: {method: GET, path: "/v1/query/{id}"}
    idempotent: true
    split: [{key: query.did, percent: 10, to: get_query_next}]
    fallback: {body: {name: offline}, last_good: {key: path.id, ttl: 1m}}
  - {name: get_query_next, command: 2, upstream: svc_next, request: t.Query, response: t.Item}
  - name: echo
    command: 4
    upstream: svc
    codec: json
    http: {method: POST, path: /v1/echo}
    mirror: {to: echo_next, percent: 2.5}
  - {name: echo_next, command: 4, upstream: svc_next, codec: json}
"""


@pytest.mark.parametrize("envelope", [False, True])
def test_split_answers_and_the_fallback_header(tmp_path: Path, envelope: bool) -> None:
    (tmp_path / "proto").mkdir()
    (tmp_path / "proto" / "t.proto").write_text(PROTO)
    path = tmp_path / "table.yaml"
    path.write_text(TRAFFIC + ("envelope: true\n" if envelope else ""))
    document = build_document(load_table(path))
    validate(document)
    query = document["paths"]["/v1/query/{id}"]["get"]
    echo = document["paths"]["/v1/echo"]["post"]
    answer = query["responses"]["200"]
    assert answer["headers"]["X-Fallback"]["schema"] == {
        "type": "string",
        "enum": ["static", "last_good"],
    }
    assert "X-Fallback" not in echo["responses"]["200"]["headers"]
    # Split requests are answered by get_query_next, whose response is another message.
    schema = answer["content"]["application/json"]["schema"]
    either = {
        "anyOf": [{"$ref": "#/components/schemas/t.Tree"}, {"$ref": "#/components/schemas/t.Item"}]
    }
    if envelope:
        assert schema["allOf"][1]["properties"]["data"]["anyOf"][0] == either
    else:
        assert schema == either
    assert "Split: some requests are sent as get_query_next instead" in query["description"]
    assert "Fallback: when the upstream cannot answer" in query["description"]
    assert "Mirrored: a copy of 2.5% of the requests goes to echo_next" in echo["description"]
