"""Whether the graph can answer, free of Ray: what ``/v2/health/ready`` and
``/v2/models/<m>[/versions/<v>]/ready`` say.

Ready means each tier that the served versions need has a running replica, or may start
one on the first request (``min_replicas: 0``), and each routed version's models loaded
on the tiers. A Serve replica runs only once its model has loaded (``reconfigure``), so a
running replica answers for the deployed version; a routed version's models are loaded
when a routing table names it (``TierModel.load``), and recorded here.
"""

from __future__ import annotations

from collections.abc import Callable

TIERS = ("cheap", "expensive")
PUBLIC_LOAD_REASON = (
    "a routed version's models are loading or failed to load: "
    "/v2/models/<model>/versions/<version>/ready, with a key, says which and why"
)


class Readiness:
    """``replicas``: tier -> running replicas, kept current by the ingress
    (``tier_calls.watch_replicas``); ``cold_start()``: the tiers that may scale from
    zero."""

    def __init__(self, replicas: dict[str, int], cold_start: Callable[[], set[str]] = set) -> None:
        self.replicas = replicas
        self.cold_start = cold_start
        self.loads: dict[str, str | None] = {}  # routed version -> None (loaded) or why not

    def loading(self, version: str) -> None:
        self.loads[version] = f"version {version}'s models are loading on the tiers"

    def loaded(self, version: str, error: str | None = None) -> None:
        """``version``'s models loaded, or failed to (``error``: why, for the answer)."""
        self.loads[version] = (
            None if error is None else f"version {version}'s models failed to load: {error}"
        )

    def reason(self, versions: list[str], deployed: str, *, public: bool = False) -> str | None:
        """Why the graph cannot answer ``versions`` now, or None: it can. ``public``: said
        without naming a version (nor its load error), for a route that takes no key."""
        for tier in TIERS:
            if self.replicas.get(tier, 0) < 1 and tier not in self.cold_start():
                return f"the {tier} tier has no running replica yet"
        for version in versions:
            if version != deployed and self.loads.get(version) is not None:
                return PUBLIC_LOAD_REASON if public else self.loads[version]
        return None
