"""Wire shapes of the gateway: OpenAI-style errors, the model list, and what it reads from upstream bodies."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel

Route = Literal["chat", "completions", "embeddings"]
UPSTREAM_PATHS: dict[str, str] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}
STREAMABLE: frozenset[str] = frozenset({"chat", "completions"})


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ApiError(Exception):
    """Raised inside handlers; rendered as OpenAI's error body with `status`, so SDKs raise their typed errors."""

    def __init__(self, status: int, message: str, *, type: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}})


def split_model(model: object) -> tuple[str, str | None]:
    """`endpoint` or `endpoint:adapter` -> (endpoint, adapter)."""
    if not isinstance(model, str) or not model:
        raise ApiError(400, "The request has no `model`: set model to an endpoint name (GET /v1/models lists "
                       "the ones your key may call).", type="invalid_request_error", param="model",
                       code="model_required")
    endpoint, sep, adapter = model.partition(":")
    return endpoint, (adapter if sep else None)


def usage_of(obj: dict[str, Any]) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) from an OpenAI body or stream chunk (embeddings: completion 0)."""
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None, None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    return (int(prompt) if isinstance(prompt, int) else None,
            int(completion) if isinstance(completion, int) else (0 if isinstance(prompt, int) else None))


def is_usage_only_chunk(chunk: dict[str, Any]) -> bool:
    """The trailing chunk that `stream_options.include_usage` adds: usage set, no choices."""
    return isinstance(chunk.get("usage"), dict) and chunk.get("choices") == []


def sse_error(message: str, *, type: str = "server_error", code: str = "replica_failed") -> bytes:
    """An error event mid-stream (status is already 200); the OpenAI SDK raises it as APIError."""
    return b"data: " + orjson.dumps({"error": {"message": message, "type": type, "param": None,
                                               "code": code}}) + b"\n\n"
