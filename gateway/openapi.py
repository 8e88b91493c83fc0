"""The gateway's OpenAPI 3.1 document, served at /openapi.json.

Written by hand because the proxied routes skip FastAPI (see gateway.app.GatewayApp) and pass bodies through
unvalidated: the request schemas here say what the gateway itself reads (`model`, `stream`, `stream_options`)
and leave the rest to vLLM. Every response the gateway can produce on its own is listed; a status relayed
from a replica or provider carries the `x-llmhost-upstream-status` header (see gateway.proxy).
"""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
_UPSTREAM_HEADER = {
    "x-llmhost-upstream-status": {
        "description": "Set when the status (or the failure) was relayed from the replica or provider: its HTTP "
                       "status, or `none` when it gave no answer.",
        "schema": {"type": "string"},
    }
}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "headers": _UPSTREAM_HEADER,
            "content": {"application/json": {"schema": _ERROR}}}


def _proxied(summary: str, body: dict[str, Any], answer: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                "200": {"description": answer, "content": {"application/json": {"schema": {"type": "object"}},
                                                           "text/event-stream": {"schema": {"type": "string"}}}},
                "400": _err("Not JSON, not an object, no `model`, or the replica refused the body."),
                "401": _err("No key, a malformed header, or an unknown, revoked or expired key."),
                "403": _err("The key's user and team have no grant on the endpoint."),
                "404": _err("`model` names no endpoint (or no adapter of it)."),
                "422": _err("The replica refused a field of the body."),
                "502": _err("The replica or provider failed mid-request (relayed: see the header)."),
                "503": _err("The endpoint is disabled, has no live revision or no healthy replica right now."),
            },
        }
    }


_STREAM_FIELDS: dict[str, Any] = {
    "model": {"type": "string", "description": "An endpoint name, or ENDPOINT:ADAPTER."},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                   "content": {"type": "string"}},
}
CHAT = {"type": "object", "required": ["model", "messages"],
        "properties": {**_STREAM_FIELDS, "messages": {"type": "array", "items": _MESSAGE}}}
COMPLETION = {"type": "object", "required": ["model", "prompt"],
              "properties": {**_STREAM_FIELDS, "prompt": {"type": "string"}}}
EMBEDDING = {"type": "object", "required": ["model", "input"],
             "properties": {"model": _STREAM_FIELDS["model"],
                            "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}}

_WINDOW = {"name": "window", "in": "query", "required": False,
           "description": "1h, 24h or 7d; anything else shows 1h.", "schema": {"type": "string"}}


def _page(summary: str, params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "security": [{"session": []}],
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                           *(params or [])],
            "responses": {
                "200": {"description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}},
                "303": {"description": "No session: to /ui/login."},
                "404": {"description": "No such endpoint, or not one the viewer may call.",
                        "content": {"text/html": {"schema": {"type": "string"}}}},
            },
        }
    }


def openapi_document() -> dict[str, Any]:
    """The gateway's routes: the OpenAI ones, /health, /metrics, and the dashboard's pages and admin API."""
    window = _WINDOW
    paths: dict[str, Any] = {
        "/v1/chat/completions": _proxied("OpenAI chat completions, routed by `model`.", CHAT, "The replica's answer."),
        "/v1/completions": _proxied("OpenAI completions, routed by `model`.", COMPLETION, "The replica's answer."),
        "/v1/embeddings": _proxied("OpenAI embeddings, routed by `model`.", EMBEDDING, "The replica's answer."),
        "/v1/models": {"get": {
            "summary": "The endpoints (and their adapters) the key may call.",
            "security": [{"bearer": []}],
            "responses": {
                "200": {"description": "An OpenAI model list.",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}}},
                "401": _err("No key, or an unknown, revoked or expired key."),
            },
        }},
        "/health": {"get": {"summary": "The gateway is up.", "security": [],
                            "responses": {"200": {"description": "ok",
                                                  "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics.", "security": [],
                             "responses": {"200": {"description": "Prometheus text format.",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/ui/api/prometheus/targets": {"get": {
            "summary": "Prometheus HTTP service discovery: the live replicas' /metrics (admin key).",
            "security": [{"bearer": []}],
            "responses": {
                "200": {"description": "Target groups.",
                        "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}},
                "401": {"description": "No key or a bad key.",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                "403": {"description": "The key's user is not a dashboard admin.",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
            },
        }},
        "/ui/login": {"post": {
            "summary": "Dashboard sign-in with an API key; sets the session cookie.",
            "security": [],
            "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
                "type": "object", "properties": {"api_key": {"type": "string"}, "next": {"type": "string"}}}}}},
            "responses": {
                "303": {"description": "Signed in: to `next` (a /ui path) or /ui."},
                "401": {"description": "The key was refused.",
                        "content": {"text/html": {"schema": {"type": "string"}}}},
            },
        }},
        "/ui": {"get": {"summary": "The endpoints the viewer may call.", "security": [{"session": []}],
                        "responses": {"200": {"description": "The page.",
                                              "content": {"text/html": {"schema": {"type": "string"}}}},
                                      "303": {"description": "No session: to /ui/login."}}}},
        "/ui/endpoints/{name}/overview": _page("An endpoint's Overview tab."),
        "/ui/endpoints/{name}/calling": _page("An endpoint's Calling tab: base URL and snippets."),
        "/ui/endpoints/{name}/usage": _page("An endpoint's Usage tab.", [window]),
        "/ui/endpoints/{name}/health": _page("An endpoint's System Health tab.", [window]),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmhost gateway", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An llmhost key (llmh-...)."},
                "session": {"type": "apiKey", "in": "cookie", "name": "llmhost_ui",
                            "description": "The dashboard's signed session cookie (POST /ui/login)."},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type"],
                    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
                "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
                    "object": {"const": "list"},
                    "data": {"type": "array", "items": {"type": "object", "required": ["id", "object", "created",
                                                                                      "owned_by"]}}}},
            },
        },
    }
