"""Per-key rate limits, free of Ray: a token bucket per key id and scope
(``serve.rate_limits``), off unless configured. A key over its limit gets a 429 that
says when to retry."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from app.errors import TooManyRequests
from app.keys import ApiKey, Scope
from app.sections import RateLimit


class RateLimiter:
    """``limits``: scope -> its rate and burst; a scope without one is not limited."""

    def __init__(
        self, limits: Mapping[str, RateLimit], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = dict(limits)
        self.clock = clock
        self.buckets: dict[tuple[str, str], tuple[float, float]] = {}  # -> (tokens, at)

    def check(self, key: ApiKey, scope: Scope) -> None:
        """Take one token from ``key``'s bucket for ``scope``, or raise a 429."""
        limit = self.limits.get(scope)
        if limit is None:
            return
        now = self.clock()
        tokens, at = self.buckets.get((key.id, scope), (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + (now - at) * limit.per_s)
        if tokens < 1:
            self.buckets[(key.id, scope)] = (tokens, now)
            wait = math.ceil((1 - tokens) / limit.per_s)
            error = TooManyRequests(
                f"key {key.id!r} is over its rate limit of {limit.per_s:g} requests/s "
                f"(burst {limit.burst}) for {scope}: retry after {wait} s"
            )
            error.retry_after_s = wait
            raise error
        self.buckets[(key.id, scope)] = (tokens - 1, now)
