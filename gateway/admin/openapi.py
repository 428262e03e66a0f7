"""The OpenAPI 3.1 document of the admin API, built from the endpoint registry and the pydantic body models, so
it cannot drift from what is served."""

from __future__ import annotations

import re
from typing import Any

from gateway.admin.routing import ENDPOINTS, Endpoint

_PATH_PARAM = re.compile(r"\{(\w+)(?::([^}]+))?\}")
_ERROR = {"$ref": "#/components/responses/Error"}
_ERRORS = {
    "400": {"description": "Invalid request", **_ERROR},
    "401": {"description": "Missing or wrong admin key", **_ERROR},
    "403": {"description": "This role may not do that (e.g. a team admin and another team)", **_ERROR},
    "404": {"description": "Not found", **_ERROR},
    "409": {"description": "Conflict with the current state", **_ERROR},
}


def _path(spec: Endpoint) -> tuple[str, list[dict[str, Any]]]:
    parameters = []
    for name, pattern in _PATH_PARAM.findall(spec.path):
        schema: dict[str, Any] = {"type": "string"}
        if pattern:
            schema["enum"] = pattern.split("|")
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    return _PATH_PARAM.sub(r"{\1}", spec.path), parameters


def _operation(spec: Endpoint, components: dict[str, Any]) -> dict[str, Any]:
    path_params = _path(spec)[1]
    query = [
        {
            "name": param.name,
            "in": "query",
            "required": False,
            "description": param.description,
            "schema": {"type": param.type, **({"enum": list(param.enum)} if param.enum else {})},
        }
        for param in spec.query
    ]
    content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if spec.produces_csv:
        content["text/csv"] = {"schema": {"type": "string"}}
    operation: dict[str, Any] = {
        "operationId": spec.operation_id,
        "summary": spec.summary,
        "tags": [spec.tag],
        "parameters": path_params + query,
        "responses": {str(spec.status): {"description": "OK", "content": content}, **_ERRORS},
        "x-roles": ["org_admin"] if spec.org_only else ["org_admin", "team_admin"],
    }
    if spec.body is not None:
        schema = spec.body.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            components[name] = definition
        components[spec.body.__name__] = schema
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{spec.body.__name__}"}}},
        }
    return operation


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        }
    }
    for spec in ENDPOINTS:
        path = _path(spec)[0]
        paths.setdefault(path, {})[spec.method.lower()] = _operation(spec, schemas)
    paths["/admin/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document (no key needed).",
            "tags": ["session"],
            "security": [],
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {}}}}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-gateway admin API",
            "version": "1",
            "description": (
                "Teams, users, API keys, limits and budgets, prices, usage reports, audit log and budget alerts. "
                "Authenticate with `Authorization: Bearer <key>`: an organisation admin key (all teams) or a team "
                "admin API key (its own team only; anything else is 403). Every change is written to the audit log. "
                "Errors have OpenAI's shape."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
            "responses": {
                "Error": {
                    "description": "An error in OpenAI's shape",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            },
        },
    }
