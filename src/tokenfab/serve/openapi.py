"""The OpenAPI 3.1 description of the gateway (GET /openapi.json), its request bodies taken from the
pydantic models that validate them, so the description cannot drift from what the server accepts."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from tokenfab.serve.protocol import ChatRequest, CompletionRequest

_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
_JSON = {"type": "object"}


def _responses(ok: str, media: str = "application/json", errors: tuple[int, ...] = ()) -> dict[str, Any]:
    body = _JSON if media == "application/json" else {"type": "string"}
    out: dict[str, Any] = {"200": {"description": ok, "content": {media: {"schema": body}}}}
    for code in errors:
        out[str(code)] = {"description": _REASONS[code],
                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return out


_REASONS = {
    400: "the request is malformed or cannot be served as asked (the message says which field and why)",
    401: "missing, malformed, invalid or revoked API key", 402: "the tenant's budget cannot cover the request",
    403: "the key's tier is not offered here", 404: "no such model", 413: "the body is over the size limit",
    429: "shed: the tier's queue is full or its SLO cannot be met now (see Retry-After)",
    500: "the engine failed this request (the others went on)",
}
_GENERATE_ERRORS = (400, 401, 402, 403, 404, 413, 429, 500)


def openapi_document(model_name: str) -> dict[str, Any]:
    _, defs = models_json_schema([(CompletionRequest, "validation"), (ChatRequest, "validation")],
                                 ref_template="#/components/schemas/{model}")
    schemas = {**defs["$defs"], "Error": _ERROR}
    for name in ("CompletionRequest", "ChatRequest"):  # this server answers for one model, by name
        schemas[name]["properties"]["model"] = {"type": "string", "enum": [model_name], "title": "Model"}

    def generate(op: str, schema: str, summary: str) -> dict[str, Any]:
        return {"post": {
            "operationId": op, "summary": summary, "security": [{"bearer": []}, {}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{schema}"}}}},
            "responses": _responses("the completion (JSON), or with stream=true server-sent events",
                                    errors=_GENERATE_ERRORS),
        }}

    return {
        "openapi": "3.1.0",
        "info": {"title": "tokenfab", "version": "1",
                 "description": f"An OpenAI-compatible token factory serving '{model_name}'."},
        "paths": {
            "/v1/completions": generate("createCompletion", "CompletionRequest", "Complete a prompt"),
            "/v1/chat/completions": generate("createChatCompletion", "ChatRequest", "Answer a conversation"),
            "/v1/models": {"get": {"operationId": "listModels", "responses": _responses("the served models")}},
            "/v1/models/{model}": {"get": {
                "operationId": "retrieveModel",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": _responses("the model", errors=(404,))}},
            "/v1/usage": {"get": {
                "operationId": "listUsage", "security": [{"bearer": []}],
                "parameters": [
                    {"name": "since", "in": "query", "required": False,
                     "schema": {"type": "number"}, "description": "unix seconds"},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 10_000}}],
                "responses": _responses("the tenant's usage records, oldest first", errors=(400, 401))}},
            "/health": {"get": {"operationId": "health", "responses": _responses("engine, admission and ledger state")}},
            "/metrics": {"get": {"operationId": "metrics",
                                 "responses": _responses("Prometheus text, by tier and model", media="text/plain")}},
            "/openapi.json": {"get": {"operationId": "openapi", "responses": _responses("this document")}},
        },
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
