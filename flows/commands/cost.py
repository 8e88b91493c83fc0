"""`llmhost cost ENDPOINT`: $ per 1M output tokens, the break-even volume, and the last 24 h priced both ways."""

from __future__ import annotations

import typer

from flows.commands._output import json_option

COST_KEYS = ("endpoint", "source", "tier", "tier_usd_per_hour", "instance", "frontier",
             "self_usd_per_1m_out_eval", "self_usd_per_1m_out_saturation", "api_usd_per_1m_out",
             "break_even_tokens_per_day", "capacity_tokens_per_day", "last_24h")  # fmt: skip


def register(app: typer.Typer) -> None:
    @app.command("cost")
    def cost(
        endpoint: str = typer.Argument(..., help="Endpoint name."),
        frontier: str = typer.Option(None, "--frontier", help="Frontier name in frontiers.yaml; default: the "
                                     "one of the endpoint's latest eval comparison."),
        tier: str = typer.Option(None, "--tier", help="Price as this catalog tier when no eval comparison has "
                                 "the endpoint; default: the live revision's hardware, else cpu."),
        as_json: bool = json_option("one object", COST_KEYS, "source is the MLflow comparison run id, or "
                                    "'catalog' when no eval measured throughput; last_24h holds tokens_in, "
                                    "tokens_out, api_usd, tier_usd, replicas."),
    ) -> None:
        """Self-hosted vs API: $ per 1M output tokens, break-even tokens/day, and a day of real traffic.

        The figures are the endpoint's latest `llmhost eval compare` against a frontier (the same as its report
        and MLflow metrics); without one, the catalogs' prices alone (no throughput, so no $ per 1M).
        """
        from flows.commands._output import console, emit_json
        from tasks import store
        from tasks.core.errors import EvalError
        from tasks.evaluate.cost import catalog_cost_report, day_cost, latest_comparison_cost, usd

        view = next((e for e in store.list_endpoints() if e.name == endpoint), None)
        if view is None:
            raise EvalError(f"endpoint={endpoint!r} is not registered; see `llmhost endpoints`")
        since = store.utcnow() - store.parse_duration("24h", field_name="window")
        rows = store.summarize_usage(endpoint=endpoint, since=since)
        t_in, t_out = sum(r.prompt_tokens for r in rows), sum(r.completion_tokens for r in rows)
        t_out += sum(r.reasoning_tokens for r in rows)  # billed as output
        found = None if tier else latest_comparison_cost(endpoint, frontier)
        if found is not None:
            report, source = found
        else:
            if not frontier:
                raise EvalError(f"{endpoint}: no eval comparison with a frontier yet; run `llmhost eval compare "
                                f"SUITE --targets endpoint:{endpoint} frontier:NAME --tier TIER`, or pass --frontier")
            from tasks.evaluate.cost import TokenMix

            n = sum(r.requests for r in rows)
            mix = TokenMix(tokens_in=t_in / n, tokens_out=t_out / n) if n and t_out else None
            report, source = catalog_cost_report(tier or _hardware(endpoint) or "cpu", frontier, mix), "catalog"
        day = day_cost(report, t_in, t_out, replicas=len(view.replicas) or 1)
        if as_json:
            m = report.metrics()
            emit_json({
                "endpoint": endpoint, "source": source, "tier": report.tier.tier,
                "tier_usd_per_hour": report.tier.hourly_usd, "instance": report.tier.instance,
                "frontier": report.api.name if report.api else None,
                **{k: m.get(k) for k in COST_KEYS[6:11]},
                "last_24h": day.model_dump(),
            })
            return
        out = console()
        where = "catalog prices" if source == "catalog" else f"eval comparison run {source}"
        out.print(f"cost of {endpoint} ({where})")
        for line in report.lines():
            out.print(f"  {line}", highlight=False)
        api = usd(day.api_usd)
        out.print(f"  last 24 h: {day.tokens_in} in / {day.tokens_out} out tokens; at the API's rates {api}; "
                  f"the tier for the day ${day.tier_usd:.2f} ({day.replicas} replica(s))", highlight=False)


def _hardware(endpoint: str) -> str | None:
    """The live revision's `hardware` tier, when it names one (not `auto`)."""
    from tasks import store

    for rev in store.list_revisions(endpoint):
        spec = rev.spec or {}
        hw = spec.get("hardware")
        if rev.status == "live" and isinstance(hw, str) and hw != "auto":
            return hw
    return None
