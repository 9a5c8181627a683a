"""The circuit breaker in front of the expensive tier, free of Ray."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

RECENT_CALLS = 64  # shared calls remembered, so each counts once however many it carried


class CircuitBreaker:
    """Closed; open after ``failures_to_open`` failures in a row; after ``reset_after_s``
    one trial call is let through (half-open): its success closes the breaker, its
    failure opens it again.

    A failure is a call, not a request: the requests that one coalesced call carried
    fail together (serve_graphs/decide/coalesce.py) and count once (``call``).

    Hand-written rather than pybreaker: that library is synchronous (its async support
    needs Tornado), and this is the whole of what the cascade needs.
    """

    def __init__(
        self,
        failures_to_open: int,
        reset_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures_to_open = failures_to_open
        self.reset_after_s = reset_after_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_in_flight = False
        self.counted: deque[object] = deque(maxlen=RECENT_CALLS)  # shared calls counted

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.reset_after_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def release_trial(self) -> None:
        """The trial ended without a verdict (cancelled, a bug): let the next one try."""
        self.trial_in_flight = False

    def record_success(self) -> None:
        self.failures, self.opened_at, self.trial_in_flight = 0, None, False

    def record_failure(self, call: object | None = None) -> None:
        """One failure; the requests of one shared ``call`` fail together and count once."""
        self.trial_in_flight = False
        if call is not None:
            if any(c is call for c in self.counted):
                return
            self.counted.append(call)
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.failures_to_open:
            self.opened_at = self.clock()
