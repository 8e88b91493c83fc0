"""Plan an external endpoint (`target: external`): a hosted OpenAI-compatible API the gateway calls for users.

The revision records where the provider is, which model, the NAME of the key's variable (or the key file's
path), the catalog's prices and the request rules that apply, never the key itself: the gateway reads the key on
its own host for every request. Changing the catalog entry and redeploying makes a new revision.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from tasks import store
from tasks.core.errors import ConfigError
from tasks.deploy.spec import EndpointSpec

# why: the catalog and its request rules live with the eval step that compares against frontier APIs; the
# deploy step only reads them, so an endpoint and an eval target of the same name behave the same.
from tasks.evaluate.frontier_rules import RuleEntry, dialects_for, provider_of
from tasks.evaluate.targets import load_dialects, load_frontiers

# Fields of a spec that say what an external revision calls; the rest (vLLM, sizing, smoke) does not apply.
_IDENTITY_FIELDS = {"name", "target", "frontier", "base_url", "model", "api_key_env", "api_key_file"}


class ExternalPlan(BaseModel):
    """An external revision: its identity (what the content hash is taken over) and the provider config."""

    endpoint: str
    content_hash: str
    served_model_name: str = Field(description="The provider's model name, sent as `model`.")
    external: dict[str, Any] = Field(description="provider, base_url, model, api_key_env/file, prices, rules.")
    identity: dict[str, Any]


def plan_external(spec: EndpointSpec) -> ExternalPlan:
    """Resolve the spec's catalog entry (or its base_url + model) into the revision's provider config."""
    if spec.frontier is not None:
        catalog = load_frontiers()
        entry = catalog.get(spec.frontier)
        if entry is None:
            raise ConfigError("frontier", spec.frontier,
                              f"is not in eval_suites/frontiers.yaml or $LLMHOST_HOME/frontiers.yaml; known: "
                              f"{', '.join(sorted(catalog))}")
        rules = RuleEntry(**entry.model_dump(
            include={"base_url", "model", "provider", "reasoning", "reasoning_effort", "params"}))
        prices: dict[str, Any] = {
            "price_in_per_1m": entry.price_in_per_1m, "price_out_per_1m": entry.price_out_per_1m,
            "prices_as_of": entry.prices_as_of.isoformat(), "pricing_url": entry.pricing_url,
        }
        key_env = spec.api_key_env or (None if spec.api_key_file else entry.api_key_env)
    else:
        assert spec.base_url is not None  # the spec's validator asks for one of frontier or base_url
        rules = RuleEntry(base_url=spec.base_url, model=spec.model)
        prices = {"price_in_per_1m": None, "price_out_per_1m": None, "prices_as_of": None, "pricing_url": None}
        key_env = spec.api_key_env
    applicable = dialects_for(rules, load_dialects())
    external = {
        "provider": provider_of(rules),
        "frontier": spec.frontier,
        "base_url": rules.base_url.rstrip("/"),
        "model": rules.model,
        "api_key_env": key_env,
        "api_key_file": spec.api_key_file,
        **prices,
        "rules": rules.model_dump(mode="json"),
        "dialects": {name: d.model_dump(mode="json") for name, d in applicable},
    }
    identity = {
        "kind": "external",
        "spec": spec.model_dump(mode="json", include=_IDENTITY_FIELDS),
        "served_model_name": rules.model,
        "external": external,
    }
    return ExternalPlan(endpoint=spec.name, content_hash=store.spec_hash(identity), served_model_name=rules.model,
                        external=external, identity=identity)


def check_fallback(spec: EndpointSpec) -> None:
    """A self-hosted spec's `fallback` must name an external endpoint that is deployed."""
    if spec.fallback is None:
        return
    routes = store.load_routes()[1]
    fb = routes.get(spec.fallback)
    if fb is None or fb.external is None:
        raise ConfigError("fallback", spec.fallback,
                          "is not a deployed external endpoint; deploy one first (target: external, e.g. "
                          "deployments/frontier-gpt-4o-mini.yaml), or remove fallback")
