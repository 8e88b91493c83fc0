"""$ per 1M output tokens and the break-even volume: the one place the eval report, `llmhost cost` and the
dashboard compute them, so the three show the same figures.

Self-hosted cost is a tier's hourly price spread over the tokens it served in that hour; an API's is its list
price per token. A tier costs the same per day at any volume (it runs all day), an API's bill grows with the
volume, so the two lines cross once: the break-even volume. Below it the API is cheaper.
"""

from __future__ import annotations

import math
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from tasks.core.errors import EvalError

if TYPE_CHECKING:  # the dashboard imports this module: keep it free of the runner's HTTP stack
    from tasks.evaluate.runner import RunStats

HOURS_PER_DAY = 24
SECONDS_PER_DAY = 86_400


class TierPrice(BaseModel):
    """What one replica of a self-hosted tier costs, and where the figure comes from."""

    tier: str
    hourly_usd: float = Field(ge=0)
    instance: str = ""
    source: str = ""
    as_of: date | None = None


def _catalog_tier(tier: str) -> Any:
    """The sizing catalog's tier (tasks/size/tiers.yaml + LLMHOST_TIERS_FILE); one line naming the known ones."""
    from tasks.size.io import load_tiers

    tiers = {t.name: t for t in load_tiers()}
    if tier not in tiers:
        raise EvalError(f"tier={tier!r} is not in the tier catalog; known tiers: {sorted(tiers)}")
    return tiers[tier]


def tier_price(tier: str | None, hourly_price: float | None) -> TierPrice | None:
    """The self-hosted side's price: the catalog tier (with its instance and source), or the given hourly price."""
    if hourly_price is not None:
        return TierPrice(tier=tier or "given hourly price", hourly_usd=hourly_price)
    if not tier:
        return None
    t = _catalog_tier(tier)
    return TierPrice(tier=t.name, hourly_usd=t.price_per_hour, instance=t.instance, source=t.price_source,
                     as_of=t.prices_as_of)


def tier_hourly_price(tier: str, path: Path | None = None) -> float:
    """Hourly USD price of `tier`: the sizing catalog (tasks/size/tiers.yaml + LLMHOST_TIERS_FILE), or `path`."""
    if path is None:
        return float(_catalog_tier(tier).price_per_hour)
    import yaml

    if not path.is_file():
        raise EvalError(f"tier={tier!r}: no tier catalog at {path}; pass --hourly-price USD instead")
    raw = yaml.safe_load(path.read_text()) or {}
    entries: Any = raw.get("tiers", raw) if isinstance(raw, dict) else raw
    if isinstance(entries, dict):
        entries = [{"name": k, **(v or {})} for k, v in entries.items()]
    for e in entries or []:
        if isinstance(e, dict) and e.get("name") == tier:
            for key in ("price_per_hour", "hourly_price_usd", "usd_per_hour"):
                if e.get(key) is not None:
                    return float(e[key])
            raise EvalError(f"tier={tier!r} in {path} has no price_per_hour; pass --hourly-price USD")
    names = [e.get("name") for e in entries or [] if isinstance(e, dict)]
    raise EvalError(f"tier={tier!r} is not in {path}; known tiers: {names}")


class ApiPrice(BaseModel):
    """A frontier API's list prices (USD per 1M tokens)."""

    name: str
    price_in_per_1m: float = Field(ge=0)
    price_out_per_1m: float = Field(ge=0)
    as_of: date | None = None


class TokenMix(BaseModel):
    """Mean input and output tokens per request (the eval's, or a day of usage's)."""

    tokens_in: float = Field(ge=0)
    tokens_out: float = Field(ge=0)

    @property
    def in_per_out(self) -> float:
        return self.tokens_in / self.tokens_out if self.tokens_out else 0.0


class Throughput(BaseModel):
    """Output tokens per second one replica served, at a concurrency."""

    output_tokens_per_s: float = Field(ge=0)
    concurrency: int


def throughput_of(stats: RunStats) -> Throughput | None:
    """A run's output tokens/s (successful requests per second x mean output tokens); None without usage."""
    if stats.throughput_rps <= 0 or not stats.tokens_out_mean:
        return None
    return Throughput(output_tokens_per_s=stats.throughput_rps * stats.tokens_out_mean, concurrency=stats.concurrency)


def mix_of(stats: RunStats) -> TokenMix | None:
    if stats.tokens_in_mean is None or not stats.tokens_out_mean:
        return None
    return TokenMix(tokens_in=stats.tokens_in_mean, tokens_out=stats.tokens_out_mean)


def self_hosted_per_1m_out(hourly_usd: float, tp: Throughput) -> float | None:
    """USD per 1M output tokens on a replica kept busy at `tp` (its input is served in the same time)."""
    if tp.output_tokens_per_s <= 0:
        return None
    return hourly_usd / (tp.output_tokens_per_s * 3600) * 1e6


def api_per_1m_out(api: ApiPrice, mix: TokenMix) -> float:
    """USD per 1M output tokens on the API, with the input tokens that come with them at this mix."""
    return api.price_out_per_1m + api.price_in_per_1m * mix.in_per_out


def api_bill(api: ApiPrice, tokens_in: float, tokens_out: float) -> float:
    """USD the API bills for these tokens (reasoning tokens are output)."""
    return (tokens_in * api.price_in_per_1m + tokens_out * api.price_out_per_1m) / 1e6


def api_usd_per_token(api: ApiPrice, mix: TokenMix) -> float:
    """USD per token (input and output together) at this mix."""
    total = mix.tokens_in + mix.tokens_out
    return api_bill(api, mix.tokens_in, mix.tokens_out) / total if total else 0.0


def tier_cost_per_day(hourly_usd: float, replicas: int = 1) -> float:
    return hourly_usd * HOURS_PER_DAY * replicas


def break_even_tokens_per_day(hourly_usd: float, api: ApiPrice, mix: TokenMix) -> float | None:
    """Tokens per day (input + output, at this mix) at which one replica's day costs the API's bill."""
    per_token = api_usd_per_token(api, mix)
    return tier_cost_per_day(hourly_usd) / per_token if per_token > 0 else None


def capacity_tokens_per_day(tp: Throughput, mix: TokenMix) -> float:
    """Tokens per day (input + output) one replica serves when busy all day at `tp`."""
    return tp.output_tokens_per_s * (1 + mix.in_per_out) * SECONDS_PER_DAY


class CostReport(BaseModel):
    """A self-hosted tier against an API: $ per 1M output tokens both ways and the break-even volume."""

    tier: TierPrice
    api: ApiPrice | None = None
    mix: TokenMix | None = None
    eval: Throughput | None = Field(default=None, description="Measured during the eval, at its concurrency.")
    saturation: Throughput | None = Field(default=None, description="Measured at max_num_seqs (opt-in).")
    self_per_1m_out_eval: float | None = None
    self_per_1m_out_saturation: float | None = None
    api_per_1m_out: float | None = None
    tier_per_day: float
    break_even_tokens_per_day: float | None = None
    capacity_tokens_per_day: float | None = Field(
        default=None, description="One replica at the best throughput measured (saturation, else eval)."
    )

    @property
    def reachable(self) -> bool | None:
        """Whether one replica can serve the break-even volume; False: the API is cheaper at any volume."""
        if self.break_even_tokens_per_day is None or self.capacity_tokens_per_day is None:
            return None
        return self.break_even_tokens_per_day <= self.capacity_tokens_per_day

    def metrics(self) -> dict[str, float]:
        """The report's numbers as MLflow metrics (unknown ones left out)."""
        named = {
            "tier_usd_per_hour": self.tier.hourly_usd,
            "tier_usd_per_day": self.tier_per_day,
            "self_usd_per_1m_out_eval": self.self_per_1m_out_eval,
            "self_usd_per_1m_out_saturation": self.self_per_1m_out_saturation,
            "api_usd_per_1m_out": self.api_per_1m_out,
            "break_even_tokens_per_day": self.break_even_tokens_per_day,
            "capacity_tokens_per_day": self.capacity_tokens_per_day,
            "eval_output_tokens_per_s": self.eval.output_tokens_per_s if self.eval else None,
            "saturation_output_tokens_per_s": self.saturation.output_tokens_per_s if self.saturation else None,
        }
        return {k: float(v) for k, v in named.items() if v is not None}

    def lines(self) -> list[str]:
        """The report in plain lines: the eval report, `llmhost cost` and the dashboard print these."""
        t = self.tier
        where = f" ({t.instance}, as published {t.as_of})" if t.instance else ""
        out = [f"tier {t.tier}: ${t.hourly_usd:g}/h{where} = ${self.tier_per_day:.2f}/day per replica"]
        if self.eval:
            out.append(f"self-hosted at the eval's concurrency ({self.eval.concurrency}): "
                       f"{usd(self.self_per_1m_out_eval)} per 1M output tokens "
                       f"({self.eval.output_tokens_per_s:.1f} output tokens/s)")
        else:
            out.append("self-hosted $ per 1M output tokens: unknown (no eval throughput measured)")
        if self.saturation:
            out.append(f"self-hosted at saturation (max_num_seqs {self.saturation.concurrency}): "
                       f"{usd(self.self_per_1m_out_saturation)} per 1M output tokens "
                       f"({self.saturation.output_tokens_per_s:.1f} output tokens/s)")
        if self.api is None or self.mix is None:
            out.append("API: no frontier or no token mix to price it at")
            return out
        a = self.api
        out.append(f"API {a.name}: {usd(self.api_per_1m_out)} per 1M output tokens with their input "
                   f"(${a.price_in_per_1m:g} in / ${a.price_out_per_1m:g} out per 1M, prices of {a.as_of}; "
                   f"{self.mix.tokens_in:.1f} in / {self.mix.tokens_out:.1f} out tokens per request)")
        if (line := self.break_even_line()) is not None:
            out.append(line)
        return out

    def break_even_line(self) -> str | None:
        """The break-even volume and whether one replica reaches it; None when unknown."""
        if self.break_even_tokens_per_day is None:
            return None
        line = (f"break-even: {human_tokens(self.break_even_tokens_per_day)} tokens/day; "
                "above it self-hosting is cheaper")
        if self.reachable is False:
            line += (f", but one replica serves at most {human_tokens(self.capacity_tokens_per_day)}/day: "
                     "at these prices the API is cheaper at any volume")
        elif self.capacity_tokens_per_day is not None:
            line += f" (one replica serves up to {human_tokens(self.capacity_tokens_per_day)}/day)"
        return line


def cost_report(
    tier: TierPrice,
    api: ApiPrice | None,
    mix: TokenMix | None,
    eval_tp: Throughput | None,
    saturation_tp: Throughput | None = None,
) -> CostReport:
    """Every figure of the comparison from prices, the token mix and the measured throughputs."""
    best = saturation_tp or eval_tp
    return CostReport(
        tier=tier,
        api=api,
        mix=mix,
        eval=eval_tp,
        saturation=saturation_tp,
        self_per_1m_out_eval=self_hosted_per_1m_out(tier.hourly_usd, eval_tp) if eval_tp else None,
        self_per_1m_out_saturation=self_hosted_per_1m_out(tier.hourly_usd, saturation_tp) if saturation_tp else None,
        api_per_1m_out=api_per_1m_out(api, mix) if api and mix else None,
        tier_per_day=tier_cost_per_day(tier.hourly_usd),
        break_even_tokens_per_day=break_even_tokens_per_day(tier.hourly_usd, api, mix) if api and mix else None,
        capacity_tokens_per_day=capacity_tokens_per_day(best, mix) if best and mix else None,
    )


class DayCost(BaseModel):
    """A day of an endpoint's real traffic priced both ways (the dashboard's Usage page, `llmhost cost`)."""

    tokens_in: int
    tokens_out: int
    api_usd: float | None = Field(description="What the frontier would have billed for these tokens.")
    tier_usd: float = Field(description="What the tier costs for the same day (replicas x hourly x 24).")
    replicas: int = 1


def day_cost(report: CostReport, tokens_in: int, tokens_out: int, replicas: int = 1) -> DayCost:
    api = api_bill(report.api, tokens_in, tokens_out) if report.api else None
    return DayCost(tokens_in=tokens_in, tokens_out=tokens_out, api_usd=api,
                   tier_usd=tier_cost_per_day(report.tier.hourly_usd, max(replicas, 1)), replicas=max(replicas, 1))


def usd(v: float | None) -> str:
    """Dollars for people: cents from $1 up, below it at least 4 decimals and 3 significant digits, so that two
    small costs a check compares (a CPU tier's cost per 1k requests, $0.000312 vs $0.000298) do not print alike."""
    if v is None:
        return "unknown"
    if v >= 1:
        return f"${v:,.2f}"
    if v <= 0 or not math.isfinite(v):
        return f"${v:.4f}"
    return f"${v:.{max(4, 2 - math.floor(math.log10(v)))}f}"


def human_tokens(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "n/a"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def plot_break_even(report: CostReport, path: Path) -> Path | None:
    """Cost per day against tokens per day: the tier (steps of one replica's capacity) and the API, crossing marked."""
    if report.api is None or report.mix is None or report.break_even_tokens_per_day is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    be = report.break_even_tokens_per_day
    cap = report.capacity_tokens_per_day
    hi = max(be * 3, (cap or 0) * 1.5, 1.0)
    x = np.linspace(0, hi, 400)
    per_token = api_usd_per_token(report.api, report.mix)
    replicas = np.maximum(np.ceil(x / cap), 1) if cap else np.ones_like(x)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, x * per_token, label=f"API {report.api.name}")
    ax.step(x, replicas * report.tier_per_day, where="post",
            label=f"self-hosted {report.tier.tier} (${report.tier.hourly_usd:g}/h per replica)")
    ax.scatter([be], [be * per_token], color="black", zorder=5)
    ax.annotate(f"break-even {human_tokens(be)} tokens/day", (be, be * per_token),
                textcoords="offset points", xytext=(8, -14))
    if cap:
        ax.axvline(cap, color="grey", ls=":", lw=1, label=f"one replica's capacity {human_tokens(cap)}/day")
    ax.set_xlabel("tokens per day (input + output, at the eval's mix)")
    ax.set_ylabel("USD per day")
    ax.set_title("cost per day vs volume")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- lookups


def _matches(spec: str, endpoint: str) -> bool:
    return spec == f"endpoint:{endpoint}" or spec.startswith(f"endpoint:{endpoint}:")


def latest_comparison_cost(endpoint: str, frontier: str | None = None) -> tuple[CostReport, str] | None:
    """The cost report of the newest eval comparison of `endpoint` with an API (with `frontier` if named),
    and its MLflow run id; None when no comparison has one."""
    import mlflow

    from tasks.core.tracking import configure_mlflow

    configure_mlflow()
    client = mlflow.MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return None
    runs = client.search_runs(exps, "tags.`llmhost.kind` = 'eval-comparison'", order_by=["attributes.start_time DESC"],
                              max_results=200)
    for run in runs:
        params = run.data.params
        sides = [params.get("candidate", ""), params.get("baseline", "")]
        if not any(_matches(s, endpoint) for s in sides):
            continue
        if frontier and f"frontier:{frontier}" not in sides:
            continue
        try:
            raw: Any = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/cost.json")
        except Exception:  # an older comparison without cost figures
            continue
        return CostReport.model_validate(raw), run.info.run_id
    return None


def catalog_cost_report(tier: str, frontier: str | None, mix: TokenMix | None) -> CostReport:
    """A report from the catalogs alone (no eval yet): prices and break-even, no measured throughput."""
    from tasks.evaluate.targets import load_frontiers
    from tasks.size.io import load_tiers

    tiers = {t.name: t for t in load_tiers()}
    if tier not in tiers:
        raise EvalError(f"tier={tier!r} is not in the tier catalog; known tiers: {sorted(tiers)}")
    t = tiers[tier]
    price = TierPrice(tier=t.name, hourly_usd=t.price_per_hour, instance=t.instance, source=t.price_source,
                      as_of=t.prices_as_of)
    api = None
    if frontier:
        entries = load_frontiers()
        if frontier not in entries:
            raise EvalError(f"frontier={frontier!r} is not in frontiers.yaml; known: {sorted(entries)}")
        e = entries[frontier]
        api = ApiPrice(name=f"frontier:{frontier}", price_in_per_1m=e.price_in_per_1m,
                       price_out_per_1m=e.price_out_per_1m, as_of=e.prices_as_of)
    return cost_report(price, api, mix, None)
