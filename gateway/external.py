"""External endpoints: a hosted OpenAI-compatible API called on the user's behalf with a key the gateway holds.

The provider key is read on the gateway host for every request, from the variable (or file) the revision names,
so rotating it needs no redeploy; it is sent only to the provider, never stored, logged or returned. Requests
are shaped by the catalog's request rules (the same `apply_rules` the evals use), and usage rows carry the
provider's token counts and the cost at the catalog's rates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.protocol import ApiError

# why: the request rules are data with one pure function over them; the gateway and the evals must shape a
# request to a provider the same way.
from tasks.evaluate.frontier_rules import Applied, Dialect, RuleEntry, apply_rules
from tasks.store.routes import EndpointRoute

# Provider headers that are passed on with an error answer (the SDKs read Retry-After to back off).
_KEPT_ERROR_HEADERS = ("retry-after", "retry-after-ms", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")


@dataclass(frozen=True)
class ExternalConfig:
    """An external revision's provider, parsed once per revision."""

    endpoint: str
    provider: str
    base_url: str
    model: str
    api_key_env: str | None
    api_key_file: str | None
    price_in_per_1m: float | None
    price_out_per_1m: float | None
    rules: RuleEntry
    dialects: dict[str, Dialect]

    @classmethod
    def of(cls, route: EndpointRoute) -> ExternalConfig:
        ext = route.external or {}
        return cls(
            endpoint=route.name, provider=str(ext.get("provider") or "openai"),
            base_url=str(ext["base_url"]).rstrip("/"), model=str(ext["model"]),
            api_key_env=ext.get("api_key_env"), api_key_file=ext.get("api_key_file"),
            price_in_per_1m=ext.get("price_in_per_1m"), price_out_per_1m=ext.get("price_out_per_1m"),
            rules=RuleEntry.model_validate(ext.get("rules") or {"base_url": ext["base_url"], "model": ext["model"]}),
            dialects={n: Dialect.model_validate(d) for n, d in (ext.get("dialects") or {}).items()},
        )

    @property
    def key_source(self) -> str:
        return f"file {self.api_key_file}" if self.api_key_file else f"${self.api_key_env}"

    def read_key(self) -> str:
        """The provider key, read now on this host; a missing one is a 503 naming what to set."""
        if self.api_key_file:
            path = Path(self.api_key_file).expanduser()
            try:
                key = path.read_text().strip()
            except OSError:
                key = ""
            if not key:
                raise ApiError(503, f"Endpoint {self.endpoint!r} has no provider key: write it to {path} on "
                               "the gateway host.", type="server_error", code="provider_key_missing")
            return key
        key = os.environ.get(self.api_key_env or "", "").strip()
        if not key:
            raise ApiError(503, f"Endpoint {self.endpoint!r} has no provider key: set {self.api_key_env} in "
                           "the gateway's environment and restart it.", type="server_error",
                           code="provider_key_missing")
        return key

    def shape(self, kind: str, payload: dict[str, Any]) -> tuple[dict[str, Any], Applied | None]:
        """The body to send: the provider's model name, and for chat the catalog's request rules applied."""
        if kind != "chat":
            return {**payload, "model": self.model}, None
        rest = {k: v for k, v in payload.items() if k not in ("messages", "model")}
        applied = apply_rules(self.rules, rest, self.dialects)
        return {"model": self.model, "messages": payload.get("messages"), **applied.kwargs}, applied

    def meter_fields(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        """provider, reasoning tokens and cost (USD at the catalog's rates) of one answer's usage."""
        out: dict[str, Any] = {"provider": self.provider}
        if not isinstance(usage, dict):
            return out
        details = usage.get("completion_tokens_details")
        reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
        if isinstance(reasoning, int):
            out["reasoning_tokens"] = reasoning
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if self.price_in_per_1m is not None and self.price_out_per_1m is not None and isinstance(prompt, int):
            # Reasoning tokens are billed as output and are already counted in completion_tokens.
            out["cost_usd"] = (prompt * self.price_in_per_1m
                               + (completion if isinstance(completion, int) else 0) * self.price_out_per_1m) / 1e6
        return out

    def error(self, status: int, body: bytes, headers: dict[str, str], key: str) -> ApiError:
        """The provider's error answer as an OpenAI-shaped error that says where it came from."""
        err: dict[str, Any] = {}
        try:
            parsed = orjson.loads(body)
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                err = parsed["error"]
            elif isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
                err = parsed
        except orjson.JSONDecodeError:
            pass
        said = str(err.get("message") or body[:300].decode(errors="replace") or "no message").strip()
        said = said.replace(key, "[provider key]") if key else said
        where = f"The provider ({self.provider}, model {self.model}) of endpoint {self.endpoint!r}"
        if status in (401, 403):
            # The user's llmhost key was accepted; it is the gateway's provider key that was refused.
            return ApiError(502, f"{where} refused the gateway's provider key ({status}: {said}); the operator "
                            f"should check {self.key_source} on the gateway host.", type="server_error",
                            code="provider_auth_failed", headers=headers)
        kind = err.get("type") if isinstance(err.get("type"), str) else None
        code = err.get("code") if isinstance(err.get("code"), str) else None
        param = err.get("param") if isinstance(err.get("param"), str) else None
        return ApiError(status, f"{where} answered {status}: {said}",
                        type=kind or ("invalid_request_error" if status < 500 else "server_error"),
                        code=code or "provider_error", param=param, headers=headers)

    def unreachable(self, exc: Exception) -> str:
        return (f"The provider ({self.provider}) of endpoint {self.endpoint!r} at {self.base_url} failed "
                f"({type(exc).__name__}); retry, and if it repeats check the provider's status page.")


def kept_error_headers(get: Any) -> dict[str, str]:
    """Rate-limit headers of a provider's error answer, to pass on (`get` reads one header)."""
    return {h: v for h in _KEPT_ERROR_HEADERS if (v := get(h))}


class ExternalConfigs:
    """Parsed configs per revision id (revisions are immutable, so a cached one never goes stale)."""

    def __init__(self) -> None:
        self._by_revision: dict[int, ExternalConfig] = {}

    def get(self, route: EndpointRoute) -> ExternalConfig:
        rid = route.revision_id or 0
        cfg = self._by_revision.get(rid)
        if cfg is None or cfg.endpoint != route.name:
            if len(self._by_revision) > 1000:
                self._by_revision.clear()
            cfg = self._by_revision[rid] = ExternalConfig.of(route)
        return cfg
