"""Structured logs: one JSON object per line, with the same keys wherever scaledl logs.

Every stage logs its events with :func:`event` on the logger :func:`events` returns
(``scaledl.<component>``). Lines are formatted by Ray's own JSON formatter, the one
``ray.LoggingConfig(encoding="JSON")`` and Serve's ``LoggingConfig(encoding="JSON")`` use,
with Ray's context filter: so a training worker's line, an ingest driver's and a Serve
replica's share their keys (``asctime``, ``levelname``, ``message``, ``job_id``,
``worker_id``, ``node_id``, ``actor_id`` where there is one) and add the event's own.

Where each lands: a Ray worker's stderr is its log file in the session's ``logs/``
(``worker-*.err``); a driver's stderr is the terminal, or the job's log for
``ray job submit``. Serving logs through Serve's logger instead (``serve_graphs/api/
observe.py``), whose lines also carry the request id, route and replica, into
``logs/serve/``.

Fields are names, versions, counts and durations only: never a record's values, a key
or a token (tests/integration/test_transactions.py scans every log file and both storage
roots for them).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

EVENT = "event"  # the key that names what happened: "ingest.done", "train.epoch", ...


def events(component: str) -> logging.Logger:
    """The logger of ``component``'s events, writing JSON lines to stderr at INFO.

    Its own handler, not the root logger's: a library's chatter keeps its format and
    level, and the events do not depend on how a process configured logging."""
    logger = logging.getLogger(f"scaledl.{component}")
    if not any(getattr(h, "scaledl_json", False) for h in logger.handlers):
        from ray._common.filters import CoreContextFilter
        from ray._common.formatters import JSONFormatter

        handler = _Stderr()
        handler.setFormatter(JSONFormatter())
        handler.addFilter(CoreContextFilter())
        handler.scaledl_json = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # one line per event, not a second one from the root
    return logger


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a line is written, not when the
    logger was first asked for: a process that redirects its stderr later (a job runner,
    pytest's capture) still gets the lines."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def event(logger: logging.Logger, name: str, **fields: Any) -> None:
    """Log the event ``name`` with ``fields`` as keys of its line (its message is the name)."""
    logger.info(name, extra={EVENT: name, **fields})
