"""The OpenAPI 3.1 document of a table's REST routes (docs/operations.md "Admin listener").

Owns: turning a loaded `Table` into one OpenAPI document: an operation per REST
route with its path, query and header parameters, its request body and its
answers, and JSON Schemas generated from the protobuf descriptors as the proto3
JSON mapping writes them under the command's `json` options. Four modules, by
concept: `document` (the assembly: info, servers, paths, components,
security schemes), `operations` (one per route), `answers` (the error
answers, the envelope, the answers' headers) and `messages` (the message and
enum schemas). Callers import from here.
Must not: do I/O, import trio, or change the table. `tlvproxy openapi` prints the
result and the admin listener serves it at GET /openapi.json.
"""

from tlvproxy.openapi.answers import ERROR_CODES
from tlvproxy.openapi.document import OPENAPI_VERSION, build_document

__all__ = ["ERROR_CODES", "OPENAPI_VERSION", "build_document"]
