"""The one error hierarchy of scaledl.

Every error a user can cause carries the HTTP status it maps to and a message that says
what to fix. Only the edges translate them: the CLI prints ``error: <message>`` and exits
non-zero, the ingress answers ``{"error": <message>}`` with ``status_code``.
"""

from __future__ import annotations


class ScaledlError(Exception):
    """Base class: an error with a user-facing message and an HTTP status."""

    status_code: int = 500
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(ScaledlError):
    """A setting, flag or config file is wrong or missing."""

    status_code = 400
    exit_code = 2


class InvalidRequest(ScaledlError):
    """A request body or its tensors do not match what the model accepts."""

    status_code = 400


class Conflict(ScaledlError):
    """A request that is well formed but conflicts with the state it acts on: a second
    rollout while one runs, pausing a paused one, resuming one that has ended."""

    status_code = 409


class Unauthorized(ScaledlError):
    """No credentials, or credentials that match no key."""

    status_code = 401


class Forbidden(ScaledlError):
    """A valid key without the scope the route needs."""

    status_code = 403


class NotFound(ScaledlError):
    """Something named by the user does not exist."""

    status_code = 404


class UnknownWorkload(NotFound):
    """A workload name that is not in the workload registry."""

    exit_code = 2


class DatasetVersionNotFound(NotFound):
    """A dataset version id (or 'latest') that has no manifest under the storage root."""


class ModelNotFound(NotFound):
    """A registered model, version or alias that the registry does not hold."""


class DataContractError(ScaledlError):
    """A data file or run breaks the contract beyond what quarantine may absorb."""

    status_code = 422


class CheckpointError(ScaledlError):
    """A checkpoint that cannot be read back, or a run that cannot be resumed."""

    status_code = 409


class PayloadTooLarge(ScaledlError):
    """A request body over the configured limit."""

    status_code = 413


class GatewayTimeout(ScaledlError):
    """A request that took longer than the service allows."""

    status_code = 504


class TooManyRequests(ScaledlError):
    """A key over its rate limit (``serve.rate_limits``): answered 429 with Retry-After."""

    status_code = 429


class ServiceUnavailable(ScaledlError):
    """A dependency (a model tier, the registry) cannot answer right now."""

    status_code = 503


class Overloaded(ServiceUnavailable):
    """Shed at once: a tier's callers already have as many rows waiting as they may
    (``serve.tier_max_waiting_rows``). Retrying would only add to the load, so it is not
    retried here; the client is asked to, after Retry-After."""


class TierError(ScaledlError):
    """A tier raised an error of its own (a bug in model code, not a dead replica): a
    500, logged with the request ids, and never retried as if it were transient."""

    status_code = 500


def find_scaledl_error(exc: BaseException) -> ScaledlError | None:
    """Our error inside ``exc``, also when Ray wrapped it (a task error, Ray Data's
    UserCodeException, Ray Train's failure), by walking causes and wrapped errors."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ScaledlError):
            return e
        todo.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
        todo.extend(getattr(e, "worker_failures", {}).values())
    return None
