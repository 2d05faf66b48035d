"""OpenAPI 3.1 document generated from the route table and the msgspec schemas.

The committed copy lives at ``docs/openapi.json``; a test regenerates it and
fails when the two differ (run ``tetherless admin openapi > docs/openapi.json``).
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import msgspec

from protocol import codec
from protocol.errors import PROBLEM_CONTENT_TYPE, STATUS, Problem
from protocol.messages import API_VERSION

from .routing import PARAM_PATTERNS, Route

# Not listed per operation: any request may meet them, whatever its route.
GENERIC_ERRORS_NOTE = (
    "Each operation lists the problem codes it can answer with. Any request may also be answered "
    "400 bad_request or 413 body_too_large by the HTTP layer, 404 not_found or 405 method_not_allowed "
    "for a path or method no operation has, 503 unavailable (starting, draining, storage unavailable) "
    "and 500 internal (a bug; always logged)."
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _clean_descriptions(node: Any) -> Any:
    """Every ``description`` as ``inspect.cleandoc`` renders it.

    msgspec copies docstrings into schemas, and how it keeps their indentation
    changed between releases (0.23 dedents, earlier ones did not): normalising
    here keeps the committed document independent of the msgspec version.
    """
    if isinstance(node, dict):
        cleaned: dict[Any, Any] = {}
        for key, value in node.items():
            is_text = key == "description" and isinstance(value, str)
            cleaned[key] = inspect.cleandoc(value) if is_text else _clean_descriptions(value)
        return cleaned
    if isinstance(node, list):
        return [_clean_descriptions(item) for item in node]
    return node


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    types: list[Any] = [Problem]
    for route in routes:
        if route.body is not None:
            types.append(route.body)
        if route.response is not None:
            types.append(route.response)
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    components = _clean_descriptions(components)
    schema_of = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.operation_id,
            "tags": [route.tag],
            "responses": {},
        }
        params = [
            {
                "name": name[1:-1],
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": PARAM_PATTERNS[name[1:-1]]},
            }
            for name in route.template.split("/")
            if name.startswith("{")
        ]
        params += [
            {
                "name": q.name,
                "in": "query",
                "required": False,
                "description": q.description,
                "schema": {"type": "integer", "minimum": q.minimum, "maximum": q.maximum},
            }
            for q in route.query
        ]
        if params:
            op["parameters"] = params
        if route.auth:
            op["security"] = [{"bearer": []}]
        elif route.security:
            op["security"] = [{scheme: []} for scheme in route.security]  # any one of them
        if route.stream_body:
            op["requestBody"] = {
                "required": True,
                "description": "streamed as it arrives (not limited by the relay's max_body_bytes)",
                "content": {
                    route.stream_media_type: {"schema": {"type": "string", "contentMediaType": route.stream_media_type}}
                },
            }
        if route.body is not None:
            schema = schema_of[route.body]
            op["requestBody"] = {
                "required": route.method != "DELETE",
                "content": {codec.MSGPACK: {"schema": schema}, codec.JSON: {"schema": schema}},
            }
        if route.raw_content_type:
            content: dict[str, Any] = {route.raw_content_type: {}}
        elif route.stream:
            schema = schema_of[route.response]
            content = {
                codec.MSGPACK: {"schema": schema, "description": "length-framed MessagePack items"},
                codec.JSON_LINES: {"schema": schema},
            }
        else:
            schema = schema_of[route.response]
            content = {codec.MSGPACK: {"schema": schema}, codec.JSON: {"schema": schema}}
        op["responses"][str(route.status)] = {"description": route.summary, "content": content}
        if route.no_content:
            op["responses"]["204"] = {"description": route.no_content}
        by_status: dict[int, list[str]] = {}
        for code in route.errors:
            by_status.setdefault(STATUS[code], []).append(code.value)
        for status, codes in sorted(by_status.items()):
            op["responses"][str(status)] = {
                "description": "Problem: " + ", ".join(codes),
                "content": {PROBLEM_CONTENT_TYPE: {"schema": _ref("Problem")}},
            }
        paths.setdefault(route.template, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tetherless relay", "version": API_VERSION, "description": GENERIC_ERRORS_NOTE},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "capability": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Tetherless-Capability",
                    "description": "a blob's download capability, base64url of 32 bytes (docs/blobs.md)",
                },
            },
        },
    }


def openapi_bytes(routes: list[Route]) -> bytes:
    """The document as committed in docs/openapi.json (sorted keys, two-space indent)."""
    return (json.dumps(openapi_document(routes), indent=2, sort_keys=True) + "\n").encode()
