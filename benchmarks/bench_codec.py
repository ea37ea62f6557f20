"""protobuf <-> JSON codec cost per request (issue 10): the REST hot paths
`encode_request` (JSON body + overlays -> frame body) and `response_json`
(frame body -> JSON answer) for the demo messages.

Rows: "fast" is the codec as the gateway builds it (converters specialised per
message type); "reference" is `ProtobufCodec(..., fast=False)`, the generic
reader and json_format writer the codec used before issue 10; "json_format" is
json_format.Parse / MessageToJson alone; "floor" is json.loads of the request body
(encode_request) or json.dumps of the answer (response_json), with no protobuf
at all; "round trip" is one of each, the issue's ~35 us vs ~5 us figure.
Microseconds per call, best of 5 runs, printed through benchmarks/harness.
Run: `.venv/bin/python benchmarks/bench_codec.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import json_format
from harness.figures import Column, FigureTable, timings

from tlvproxy.config.model import JsonOptions
from tlvproxy.schema.codec import ProtobufCodec
from tlvproxy.schema.protos import compile_schema

if TYPE_CHECKING:
    from collections.abc import Callable

RUNS = 5
CALLS = 20_000
PROTO = Path(__file__).resolve().parent.parent / "proto"


def best_us(fn: Callable[[], object]) -> float:
    """Microseconds per call of `fn`: the best of RUNS runs of CALLS calls."""

    def run() -> None:
        for _ in range(CALLS):
            fn()

    return min(timings(run, RUNS)) / CALLS * 1e6


def main() -> None:
    schema = compile_schema([PROTO], ["demo/im.proto"])
    options = JsonOptions()
    pool = schema.pool

    def codecs(request: str, response: str) -> tuple[ProtobufCodec, ProtobufCodec]:
        req, resp = schema.message_class(request), schema.message_class(response)
        return (
            ProtobufCodec("bench", req, resp, options, schema),
            ProtobufCodec("bench", req, resp, options, schema, fast=False),
        )

    send_request = schema.message_class("demo.im.SendMessageRequest")
    send_response = schema.message_class("demo.im.SendMessageResponse")
    profile = schema.message_class("demo.im.Profile")
    send_fast, send_ref = codecs("demo.im.SendMessageRequest", "demo.im.SendMessageResponse")
    profile_fast, profile_ref = codecs("demo.im.GetProfileRequest", "demo.im.Profile")

    # POST /v1/messages: a JSON body, client_ip from remote_addr as a `fields` overlay.
    body = b'{"to_uid": 42, "text": "hello, how are you today?"}'
    overlays = [{}, {}, {"client_ip": "127.0.0.1"}]
    # GET /v1/users/{user_id}/profile: no body, the path parameter as an overlay.
    path_overlays = [{}, {"user_id": "42"}]
    send_answer = send_response(msg_id=1234567890123, sent_at=1700000000000).SerializeToString()
    profile_answer = profile(
        user_id=42,
        nickname="ann",
        gender=1,
        status=1,
        created_at=1700000000000,
        tags=["admin", "beta"],
    ).SerializeToString()

    def json_format_encode(cls: type, text: bytes) -> Callable[[], object]:
        return lambda: json_format.Parse(text, cls(), descriptor_pool=pool).SerializeToString()

    def json_format_answer(cls: type, data: bytes) -> Callable[[], object]:
        return lambda: json_format.MessageToJson(
            cls.FromString(data),
            always_print_fields_with_no_presence=True,
            preserving_proto_field_name=True,
            indent=None,
        ).encode()

    def floor_in(data: object) -> Callable[[], object]:
        text = json.dumps(data).encode()
        return lambda: json.loads(text)

    def floor_out(data: object) -> Callable[[], object]:
        return lambda: json.dumps(data).encode()

    def both(*fns: Callable[[], object]) -> Callable[[], object]:
        first, second = fns
        return lambda: (first(), second())

    cases: list[tuple[str, dict[str, Callable[[], object]]]] = [
        (
            "encode_request SendMessageRequest",
            {
                "fast": lambda: send_fast.encode_request(body, overlays),
                "reference": lambda: send_ref.encode_request(body, overlays),
                "json_format": json_format_encode(send_request, body),
                "floor": floor_in(json.loads(body)),
            },
        ),
        (
            "encode_request GetProfileRequest",
            {
                "fast": lambda: profile_fast.encode_request(b"", path_overlays),
                "reference": lambda: profile_ref.encode_request(b"", path_overlays),
                "json_format": json_format_encode(
                    schema.message_class("demo.im.GetProfileRequest"), b'{"user_id": 42}'
                ),
                "floor": floor_in({"user_id": 42}),
            },
        ),
        (
            "response_json SendMessageResponse",
            {
                "fast": lambda: send_fast.response_json(send_answer),
                "reference": lambda: send_ref.response_json(send_answer),
                "json_format": json_format_answer(send_response, send_answer),
                "floor": floor_out(json.loads(send_fast.response_json(send_answer))),
            },
        ),
        (
            "response_json Profile",
            {
                "fast": lambda: profile_fast.response_json(profile_answer),
                "reference": lambda: profile_ref.response_json(profile_answer),
                "json_format": json_format_answer(profile, profile_answer),
                "floor": floor_out(json.loads(profile_fast.response_json(profile_answer))),
            },
        ),
        (
            "round trip send_message",
            {
                "fast": both(
                    lambda: send_fast.encode_request(body, overlays),
                    lambda: send_fast.response_json(send_answer),
                ),
                "reference": both(
                    lambda: send_ref.encode_request(body, overlays),
                    lambda: send_ref.response_json(send_answer),
                ),
                "json_format": both(
                    json_format_encode(send_request, body),
                    json_format_answer(send_response, send_answer),
                ),
                "floor": both(
                    floor_in(json.loads(body)),
                    floor_out(json.loads(send_fast.response_json(send_answer))),
                ),
            },
        ),
    ]
    figures = FigureTable(
        f"protobuf <-> JSON codec, us per call, best of {RUNS} x {CALLS:,}",
        "case",
        max(len(name) for name, _ in cases),
        [
            Column("fast", ".2f", 8),
            Column("reference", ".2f"),
            Column("json_format", ".2f"),
            Column("floor", ".2f", 8),
            Column("fast/floor", ".1f"),
        ],
    )
    for name, rows in cases:
        us = {label: best_us(fn) for label, fn in rows.items()}
        figures.row(
            name,
            us["fast"],
            us["reference"],
            us["json_format"],
            us["floor"],
            us["fast"] / us["floor"],
        )


if __name__ == "__main__":
    main()
