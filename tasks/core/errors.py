"""Typed errors. Each message is one line naming the field, the value and the fix."""

from __future__ import annotations


class LlmhostError(Exception):
    """Base of every error the CLI turns into one line and a non-zero exit."""


class ConfigError(LlmhostError):
    """Bad input: a spec, a flag or a file."""

    def __init__(self, field: str, value: object, fix: str, *, source: str | None = None):
        self.field, self.value, self.fix, self.source = field, value, fix, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}={value!r} is invalid: {fix}")


class SizingError(LlmhostError):
    """The model does not fit, or its config lacks what sizing needs."""


class PlacementError(LlmhostError):
    """A replica gets no GPUs: too few free on this host, or none in the Ray cluster; names what there is."""


class RegistryError(LlmhostError):
    """Registering or resolving a model failed."""


class ServingError(LlmhostError):
    """A replica could not be started, stopped or reached."""


class ReplicaStartError(ServingError):
    """vLLM exited or missed its deadline during startup; carries vLLM's own last error lines."""

    def __init__(self, message: str, *, log_tail: str = "", log_path: str | None = None):
        self.log_tail, self.log_path = log_tail, log_path
        super().__init__(message)


class GatewayError(LlmhostError):
    """Gateway configuration or store problem."""


class AccessError(LlmhostError):
    """A key, user, team or grant is missing or invalid."""


class EvalError(LlmhostError):
    """A suite or target is malformed or unreachable."""


class FinetuneError(LlmhostError):
    """Fine-tuning was refused or failed."""


class PromotionError(LlmhostError):
    """Promotion or rollback was refused."""


class DeployError(LlmhostError):
    """A deploy stopped before switching traffic."""


class TransientError(LlmhostError):
    """A failure that may pass on a retry (a host not reachable, a port race); the only kind Prefect retries.

    Subclass it together with the step's own error, e.g. `class TransientHubError(RegistryError, TransientError)`.
    """
