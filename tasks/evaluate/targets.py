"""Eval targets: `endpoint:NAME[:adapter]` (through the gateway), `frontier:NAME` and `url:BASE_URL#MODEL`.

Keys are read when a client is made and are never stored on these models, so a target can be logged, printed
or put in a Prefect parameter without leaking a secret. The gateway key may be passed in by the caller (the
flows do); otherwise every key comes from its environment variable.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.core.errors import AccessError, EvalError
from tasks.core.settings import get_settings
from tasks.evaluate.frontier_rules import Dialect, Provider, ReasoningEffort, RuleEntry
from tasks.evaluate.suite import SUITES_DIR, SuiteError

FRONTIERS_FILE = SUITES_DIR / "frontiers.yaml"
GATEWAY_KEY_ENV = "LLMHOST_API_KEY"
URL_KEY_ENV = "LLMHOST_TARGET_API_KEY"


class TargetKeyError(AccessError, EvalError):
    """A target's API key variable is not set."""


class FrontierEntry(BaseModel):
    """A hosted API: where it is, which model, which env var holds the key, and its prices."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="OpenAI-compatible base URL.")
    model: str
    api_key_env: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="NAME of the key's env variable."
    )
    price_in_per_1m: float = Field(ge=0, description="USD per 1M input tokens.")
    price_out_per_1m: float = Field(ge=0, description="USD per 1M output tokens.")
    prices_as_of: date = Field(description="Date the prices were read from the pricing page.")
    pricing_url: str | None = None
    provider: Provider | None = Field(default=None, description="Dialect; default: from base_url's host.")
    reasoning: bool | None = Field(
        default=None, description="A reasoning model; default: by name (o1, o3, o4, gpt-5 and later)."
    )
    reasoning_effort: ReasoningEffort | None = Field(default=None, description="Sent to a reasoning model.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the suite's request params; null leaves one out."
    )
    rpm: int | None = Field(default=None, gt=0, description="Client-side limit: requests per minute.")
    tpm: int | None = Field(default=None, gt=0, description="Client-side limit: tokens per minute.")
    standin_for: str | None = Field(
        default=None, description="Set on a model served locally in place of this hosted API (the demo's "
        "stand-in): it is priced as that API, every report line names it 'frontier stand-in (local)', and its "
        "key variable may be unset (a local vLLM takes any key).",
    )


STANDIN_LABEL = "frontier stand-in (local)"


class Pricing(BaseModel):
    price_in_per_1m: float
    price_out_per_1m: float
    prices_as_of: date
    pricing_url: str | None = None


class ResolvedTarget(BaseModel):
    """Everything needed to call a target, except the key's value."""

    spec: str = Field(description="As given, e.g. endpoint:support-router or frontier:gpt-4o-mini.")
    kind: Literal["endpoint", "frontier", "url"]
    base_url: str
    model: str = Field(description="Value sent as `model`.")
    api_key_env: str | None = Field(
        default=None, description="Env var holding the key; None sends a dummy key."
    )
    pricing: Pricing | None = None
    rules: RuleEntry | None = Field(default=None, description="A frontier's request rules (frontiers.yaml).")
    dialects: dict[str, Dialect] = Field(default_factory=dict, description="The catalog's dialects.")
    rpm: int | None = None
    tpm: int | None = None
    standin_for: str | None = Field(default=None, description="The hosted API a local stand-in is priced as.")

    @property
    def self_hosted(self) -> bool:
        return self.kind != "frontier"

    @property
    def label(self) -> str:
        """The spec, and for a local stand-in what it stands in for, so no report presents it as hosted."""
        if self.standin_for:
            return f"{self.spec} ({STANDIN_LABEL}, priced as {self.standin_for})"
        return self.spec

    def api_key(self, gateway_key: str | None = None) -> str:
        """The key's value, read now; a missing variable names itself and how to set it.

        `gateway_key`, when given, is the key of an `endpoint:` target instead of its variable; other targets
        ignore it and read their own.
        """
        if gateway_key is not None and self.kind == "endpoint":
            return gateway_key
        if self.api_key_env is None:
            return os.environ.get(URL_KEY_ENV, "EMPTY")
        value = os.environ.get(self.api_key_env)
        if not value and self.standin_for:
            return "EMPTY"  # a local stand-in's vLLM takes any key
        if not value:
            hint = (
                "create a gateway key (llmhost keys create) and export it"
                if self.kind == "endpoint"
                else "export the provider's API key"
            )
            raise TargetKeyError(
                f"target {self.spec}: environment variable {self.api_key_env} is not set; {hint}"
            )
        return value


def _read_section(path: Path, section: str, model: type[BaseModel]) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text()) or {}
    entries = raw.get(section, {}) if isinstance(raw, dict) else {}
    out = {}
    for name, body in (entries or {}).items():
        try:
            out[str(name)] = model.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"])
            raise SuiteError(
                f"{section}.{name}.{field}", err.get("input"), err["msg"], source=str(path)
            ) from None
    return out


def _catalog_files(extra: Path | None) -> list[Path]:
    home = get_settings().home_abs
    drop_ins = sorted((home / "frontiers.d").glob("*.yaml")) if (home / "frontiers.d").is_dir() else []
    paths = (FRONTIERS_FILE, home / "frontiers.yaml", *drop_ins, extra)
    return [Path(p) for p in paths if p is not None and Path(p).is_file()]


def load_frontiers(extra: Path | None = None) -> dict[str, FrontierEntry]:
    """Shipped catalog, $LLMHOST_HOME/frontiers.yaml, its frontiers.d/*.yaml drop-ins (the demo writes its
    stand-in there), then `extra`; later files win per entry."""
    catalog: dict[str, FrontierEntry] = {}
    for path in _catalog_files(extra):
        catalog.update(_read_section(path, "frontiers", FrontierEntry))
    return catalog


def load_dialects(extra: Path | None = None) -> dict[str, Dialect]:
    """The request rules of each provider, merged like the entries (a user file may correct one)."""
    dialects: dict[str, Dialect] = {}
    for path in _catalog_files(extra):
        dialects.update(_read_section(path, "dialects", Dialect))
    return dialects


def resolve_target(spec: str, *, frontiers_file: Path | None = None) -> ResolvedTarget:
    """Parse a target spec into a `ResolvedTarget`; unknown forms and names say what is accepted."""
    kind, _, rest = spec.partition(":")
    if kind == "endpoint" and rest:
        name, _, adapter = rest.partition(":")
        s = get_settings()
        # The gateway routes `endpoint:adapter` to the adapter served by that endpoint's live revision.
        return ResolvedTarget(
            spec=spec,
            kind="endpoint",
            base_url=f"http://{s.gateway_host}:{s.gateway_port}/v1",
            model=f"{name}:{adapter}" if adapter else name,
            api_key_env=GATEWAY_KEY_ENV,
        )
    if kind == "frontier" and rest:
        catalog = load_frontiers(frontiers_file)
        if rest not in catalog:
            raise EvalError(
                f"target={spec!r}: no frontier named {rest!r}; known: {sorted(catalog)}. "
                "Add it to $LLMHOST_HOME/frontiers.yaml (base_url, model, api_key_env, prices)"
            )
        e = catalog[rest]
        return ResolvedTarget(
            spec=spec,
            kind="frontier",
            base_url=e.base_url,
            model=e.model,
            api_key_env=e.api_key_env,
            pricing=Pricing(
                **e.model_dump(include={"price_in_per_1m", "price_out_per_1m", "prices_as_of", "pricing_url"})
            ),
            rules=RuleEntry(
                **e.model_dump(include={"base_url", "model", "provider", "reasoning", "reasoning_effort", "params"})
            ),
            dialects=load_dialects(frontiers_file),
            rpm=e.rpm,
            tpm=e.tpm,
            standin_for=e.standin_for,
        )
    if kind == "url" and "#" in rest:
        base, _, model = rest.rpartition("#")
        if base.startswith(("http://", "https://")) and model:
            return ResolvedTarget(spec=spec, kind="url", base_url=base.rstrip("/"), model=model)
    raise EvalError(
        f"target={spec!r} is not understood; use endpoint:NAME[:adapter], frontier:NAME "
        "or url:http://HOST:PORT/v1#MODEL"
    )


class TargetInfo(BaseModel):
    """What the target said about itself before the run (its /models entry)."""

    model_entry: dict[str, Any] = Field(default_factory=dict)
    revision_hash: str

    @classmethod
    def from_entry(cls, target: ResolvedTarget, entry: dict[str, Any] | None) -> TargetInfo:
        entry = entry or {}
        # The gateway reports the live revision's content hash; a bare vLLM server is identified by what it
        # loaded (root dir, parent for adapters, context length), a frontier only by its model name.
        rev = entry.get("revision") or entry.get("revision_hash")
        if not rev:
            ident = {k: entry.get(k) for k in ("id", "root", "parent", "max_model_len")}
            ident["base_url"] = target.base_url
            rev = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return cls(model_entry=entry, revision_hash=str(rev))


def endpoint_revision(target: ResolvedTarget) -> tuple[str | None, str | None]:
    """(live revision hash, model version) of an `endpoint:` target from the control-plane store.

    The gateway's /v1/models lists names only; the store that the gateway routes from knows the revision.
    A store without the endpoint (a gateway run elsewhere) yields (None, None).
    """
    if target.kind != "endpoint":
        return None, None
    name = target.model.split(":", 1)[0]
    try:
        # why: SQLAlchemy loads only for endpoint targets, so `eval suites` and frontier runs stay light
        from tasks import store

        view = next((e for e in store.list_endpoints() if e.name == name), None)
    except Exception:  # store unreachable or not initialised: fall back to the /models identity
        return None, None
    if view is None:
        return None, None
    return view.live_revision, view.model_version
