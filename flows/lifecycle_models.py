"""The lifecycle flow's parameters (a form in the Prefect UI) and its secret-free summary."""

from __future__ import annotations

from pydantic import BaseModel, Field

from tasks.promote import PromotionPolicy


class LifecycleParams(BaseModel):
    """Parameters of one lifecycle run; the Prefect UI renders them as a form."""

    source: str = Field(default="demo", description="'demo' builds the demo model; else path:/hf:/run: SOURCE.")
    model_name: str = Field(default="demo", description="Registered model name in MLflow.")
    endpoint_spec: str = Field(default="deployments/demo.yaml", description="Endpoint spec YAML.")
    suite: str = Field(default="demo_routing", description="Eval suite for champion/candidate/frontier.")
    frontier: str | None = Field(default=None, description="e.g. frontier:gpt-4o-mini; skipped without its key.")
    frontier_standin: bool = Field(
        default=False, description="With no `frontier`: compare with the demo's frontier stand-in (local), a "
        "stronger model served by the endpoint's vLLM and priced as gpt-4o-mini (demo/standin.py).",
    )
    standin_steps: int | None = Field(default=None, ge=1, description="The stand-in's training steps (default 1200).")
    saturation: int | None = Field(
        default=None, ge=1, description="With a frontier: also load the endpoint at this concurrency (its "
        "max_num_seqs) during the candidate-vs-frontier comparison, to price a replica kept full.",
    )
    finetune_config: str = Field(default="demo/finetune.yaml", description="FinetuneConfig YAML.")
    finetune_max_steps: int | None = Field(default=None, ge=1, description="Override the config's max_steps.")
    eval_limit: int | None = Field(default=None, ge=1, description="Evaluate only the first N examples.")
    policy: PromotionPolicy = Field(default_factory=PromotionPolicy)
    tier: str | None = Field(default="cpu", description="Tier for self-hosted cost; None = unknown.")


class StepTiming(BaseModel):
    step: str
    seconds: float
    note: str = ""


class LifecycleSummary(BaseModel):
    model: str
    champion_before: str
    candidate: str | None = None
    base_score: float | None = None
    tuned_score: float | None = None
    metric: str = "accuracy"
    frontier: str = ""
    frontier_verdict: str | None = Field(default=None, description="Champion vs frontier: READY TO REPLACE / NOT YET.")
    candidate_frontier_verdict: str | None = Field(default=None, description="Tuned candidate vs frontier.")
    frontier_lines: list[str] = Field(
        default_factory=list, description="Both frontier comparisons: gap with its CI, latency, $/1M, break-even."
    )
    verdict: str | None = Field(default=None, description="Candidate vs champion on the suite's own tolerances.")
    promoted: bool = False
    decision: str = ""
    endpoint: str
    gateway_url: str
    mlflow_uri: str
    parent_run_id: str | None = None
    timings: list[StepTiming] = Field(default_factory=list)

    def text(self) -> str:
        lines = [
            f"model {self.model}: champion was v{self.champion_before}"
            + (f", candidate v{self.candidate}" if self.candidate else ""),
            f"{self.metric}: base {_f(self.base_score)} -> tuned {_f(self.tuned_score)}",
            f"frontier: {self.frontier}" + (f"; champion vs frontier: {self.frontier_verdict}"
                                            if self.frontier_verdict and not self.frontier_lines else ""),
            *self.frontier_lines,
            f"suite verdict (candidate vs champion, suite tolerances): {self.verdict or 'n/a'}",
            f"promoted: {'yes' if self.promoted else 'no'} ({self.decision})",
            f"endpoint: {self.gateway_url}/v1 model={self.endpoint}",
            f"MLflow: {self.mlflow_uri} (lifecycle run {self.parent_run_id})",
            "steps: " + ", ".join(f"{t.step} {t.seconds:.0f}s" for t in self.timings),
        ]
        return "\n".join(lines)


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
