"""A/B, canary and shadow routing, free of Ray: which cascade version answers a request.

A routing table per model names cascade versions (of ``<workload>-cascade``) with integer
weights that sum to 100, and optionally a shadow version:

- A request is assigned by hashing its user key header (``serve.route_header``), so
  one user keeps seeing one version while the weights stand; a request without the
  header is assigned at random by weight. Weights map to contiguous hash buckets in
  table order, so moving 10 points from one version to the next moves only those users.
- A request that names a version (``/versions/{v}/``) bypasses the table; it may name
  any version in the table, a weight of 0 included, or the deployed one.
- The shadow version gets a copy of routed requests after the answer is computed, in a
  task of its own: its answers are compared with the primary's and recorded, never
  returned. At most ``shadow_limit`` copies are in flight; past that they are dropped
  and counted, so mirroring never queues the primary path.

The table lives in a :class:`RouteStore` (the registry, in production), so it outlives
replicas and every ingress replica converges on it (:meth:`Routing.watch`). With no
table, everything goes to the deployed cascade.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from app.errors import InvalidRequest, NotFound, ScaledlError, ServiceUnavailable
from serve_graphs.decide.cascade import CascadeCaller, Instances, Prediction, RoutedCascade

log = logging.getLogger("ray.serve")
_T = TypeVar("_T")

BUCKETS = 10_000  # hash buckets: weights are whole percents, 100 buckets each
MAX_VERSIONS = 4  # versions one table may name (routes and shadow): each tier replica
# keeps that many loaded beside its pinned version


def version_of(ref: str) -> str | None:
    """``7`` or ``v7`` -> ``"7"``; an alias -> None."""
    bare = ref[1:] if ref[:1] in ("v", "V") else ref
    return bare if bare.isdigit() else None


class RouteSpec(BaseModel):
    """What an operator asks for: refs (alias, ``7`` or ``v7``) with weights."""

    model_config = ConfigDict(extra="forbid")

    routes: dict[str, StrictInt] = Field(
        min_length=1,
        max_length=MAX_VERSIONS,
        description="Cascade version or alias -> percent of traffic; the weights sum to "
        "100. A weight of 0 keeps a version reachable by its explicit version path only.",
        examples=[{"champion": 90, "challenger": 10}],
    )
    shadow: str | None = Field(
        None,
        description="A version that gets a copy of the traffic; its answers are "
        "recorded for comparison, never returned.",
    )

    @field_validator("routes")
    @classmethod
    def _weights(cls, routes: dict[str, int]) -> dict[str, int]:
        bad = {ref: w for ref, w in routes.items() if not 0 <= w <= 100}
        if bad:
            ref, w = next(iter(bad.items()))
            raise ValueError(f"weight {w} for {ref!r} is outside 0..100")
        total = sum(routes.values())
        if total != 100:
            raise ValueError(f"the weights sum to {total}; they must sum to 100")
        return routes


class RouteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str = Field(description="What the operator named: an alias or a version.")
    version: str = Field(description="The cascade version it resolved to when set.")
    weight: int = Field(ge=0, le=100)


class RouteTable(BaseModel):
    """A model's routing table, as stored: refs resolved to versions when it was set, so
    moving an alias later does not silently move traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    routes: list[RouteEntry] = Field(min_length=1)
    shadow: RouteEntry | None = None
    updated_at: str = ""
    updated_by: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> RouteTable:
        versions = [e.version for e in self.routes]
        if sum(e.weight for e in self.routes) != 100:
            raise ValueError("the weights must sum to 100")
        if len(set(versions)) != len(versions):
            raise ValueError(f"a version appears twice: {versions}")
        if self.shadow is not None and self.shadow.version in versions:
            raise ValueError(f"shadow version {self.shadow.version} also takes traffic")
        if len(self.versions()) > MAX_VERSIONS:
            raise ValueError(f"at most {MAX_VERSIONS} versions (routes and shadow) at once")
        return self

    def versions(self) -> list[str]:
        shadow = [self.shadow.version] if self.shadow else []
        return [e.version for e in self.routes] + shadow

    def pick(self, bucket: int) -> RouteEntry:
        """The entry whose contiguous bucket range holds ``bucket`` (0 <= bucket < BUCKETS)."""
        edge = 0
        for entry in self.routes:
            edge += entry.weight * BUCKETS // 100
            if bucket < edge:
                return entry
        raise AssertionError("unreachable: the weights sum to 100")


def user_bucket(user: str) -> int:
    digest = hashlib.blake2b(user.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


class RouteStore(Protocol):
    """Where the table lives: its JSON text, or None when no table is set."""

    def load(self) -> str | None: ...

    def save(self, text: str | None) -> None: ...


class MemoryRouteStore:
    def __init__(self, text: str | None = None) -> None:
        self.text = text

    def load(self) -> str | None:
        return self.text

    def save(self, text: str | None) -> None:
        self.text = text


@dataclass(frozen=True)
class Route:
    """Where one request goes: its cascade version and that version's variant (None: the
    deployed cascade, on the tiers' pinned versions), and where its shadow copy goes."""

    version: str
    variant: RoutedCascade | None
    shadow: Route | None = None


# (ref) -> (version, RoutedCascade): resolves an alias or version; NotFound with a fix.
Resolve = Callable[[str], tuple[str, RoutedCascade]]
# (primary version, shadow version, primary, shadow or None on failure, shadow seconds)
OnShadow = Callable[[str, str, list[Prediction], list[Prediction] | None, float], None]


class Routing:
    def __init__(
        self,
        cascade: CascadeCaller,
        deployed: Callable[[], str],
        resolve: Resolve,
        store: RouteStore,
        *,
        on_shadow: OnShadow = lambda *args: None,
        shadow_limit: int = 8,
        shadow_timeout_s: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.cascade = cascade
        self.deployed = deployed  # the cascade version the tiers are pinned to
        self.resolve = resolve
        self.store = store
        self.on_shadow = on_shadow
        self.on_shadow_dropped: Callable[[str, str, int], None] = lambda *args: None
        self.shadow_limit = shadow_limit
        self.shadow_timeout_s = shadow_timeout_s
        self.rng = rng or random.Random()
        self.table: RouteTable | None = None
        self.variants: dict[str, RoutedCascade] = {}
        self.stored: str | None = None  # the store's text the table came from
        self.generation = 0  # counts tables applied: a stale read must not undo a newer one
        self.shadows: set[asyncio.Task] = set()
        self.shadow_dropped = 0

    @classmethod
    def fixed(cls, cascade: CascadeCaller, version: str) -> Routing:
        """One cascade version and no registry behind it (tests, benchmarks)."""

        def resolve(ref: str) -> tuple[str, RoutedCascade]:
            raise NotFound(f"only cascade version {version} is served here")

        return cls(cascade, lambda: version, resolve, MemoryRouteStore())

    # ------------------------------------------------------------------ requests

    def versions(self) -> list[str]:
        """Versions a request may name: the table's, and the deployed one."""
        listed = self.table.versions() if self.table else []
        return list(dict.fromkeys([*listed, self.deployed()]))

    def choose(self, *, user: str | None = None, named: str | None = None) -> Route:
        """The cascade version for a request: ``named`` if it names a served one (404
        otherwise), else the table's pick for ``user`` (at random without one).

        The choice is fixed here, variant and shadow included, so a table applied or a
        cascade swapped while the request runs does not move it."""
        table = self.table
        if named is not None:
            version = version_of(named) or named
            if version not in self.versions():
                raise NotFound(
                    f"version {named!r} is not served; served versions: "
                    f"{', '.join(self.versions())} (add one with `scaledl route set`; weight "
                    "0 keeps it off the routed traffic)"
                )
        elif table is None:
            return Route(self.deployed(), None)
        else:
            version = table.pick(user_bucket(user) if user else self.rng.randrange(BUCKETS)).version
        shadow = None
        if named is None and table.shadow is not None:
            shadow = Route(table.shadow.version, self._variant(table.shadow.version))
        return Route(version, self._variant(version), shadow)

    def _variant(self, version: str) -> RoutedCascade | None:
        return None if version == self.deployed() else self.variants[version]

    async def predict(self, route: Route, instances: Instances) -> list[Prediction]:
        """The answer of ``route``'s version; a copy goes to its shadow, if it has one."""
        predictions = await self.cascade.predict(instances, route.variant)
        if route.shadow is not None:
            self._mirror(route.version, route.shadow, instances, predictions)
        return predictions

    def _mirror(
        self, primary: str, target: Route, instances: Instances, answer: list[Prediction]
    ) -> None:
        shadow = target.version
        if len(self.shadows) >= self.shadow_limit:
            self.shadow_dropped += 1
            self.on_shadow_dropped(primary, shadow, len(instances))
            return

        async def run() -> None:
            started = time.perf_counter()
            try:
                mirrored = await asyncio.wait_for(
                    self.cascade.predict(instances, target.variant, record=False),
                    self.shadow_timeout_s,
                )
            except (ScaledlError, TimeoutError) as exc:
                log.warning("shadow %s failed: %s", shadow, exc)
                mirrored = None
            except Exception:  # a bug: logged here, as no one awaits this task
                log.exception("shadow %s failed unexpectedly", shadow)
                mirrored = None
            self.on_shadow(primary, shadow, answer, mirrored, time.perf_counter() - started)

        task = asyncio.get_running_loop().create_task(run())
        self.shadows.add(task)
        task.add_done_callback(self.shadows.discard)

    # ------------------------------------------------------------------ the table

    async def set(self, spec: RouteSpec | None, by: str) -> RouteTable | None:
        """Validate, resolve, store and apply a new table (None: back to the deployed
        version alone). A ref that does not resolve is a 400 naming it; a registry that
        cannot be reached is a 503."""
        if spec is None:
            await self._registry(self.store.save, None)
            self._apply(None, {}, None)
            return None
        refs = [*spec.routes, *([spec.shadow] if spec.shadow else [])]
        resolved = {ref: await self._registry(self._resolve_ref, ref) for ref in refs}
        table = build_table(spec, {ref: version for ref, (version, _) in resolved.items()}, by)
        variants = {version: variant for version, variant in resolved.values()}
        text = table.model_dump_json()
        await self._registry(self.store.save, text)
        self._apply(table, variants, text)
        log.info("routing table set by %s: %s", by, text)
        return table

    async def refresh(self) -> None:
        """Apply the stored table if it changed (another replica, or the CLI, set it).

        A table set here while the store was read wins: the read may predate it."""
        generation = self.generation
        text = await asyncio.to_thread(self.store.load)
        if text == self.stored or self.generation != generation:
            return
        if not text:
            self._apply(None, {}, text)
            return
        try:
            table = RouteTable.model_validate_json(text)
            variants = {
                v: self.variants.get(v) or (await asyncio.to_thread(self.resolve, v))[1]
                for v in table.versions()
            }
        except (ValueError, ScaledlError) as exc:
            log.error("stored routing table not applied, keeping the current one: %s", exc)
            self.stored = text  # do not retry the same text every poll
            return
        if self.generation == generation:
            self._apply(table, variants, text)
            log.info("routing table applied from the store: %s", text)

    async def rebind(self) -> None:
        """Resolve the table's versions again: what their tiers run changed (INT8 twins
        switched on or off), so versions already bound must run as they would now."""
        table, text, generation = self.table, self.stored, self.generation
        if table is None:
            return
        variants = {v: (await asyncio.to_thread(self.resolve, v))[1] for v in table.versions()}
        if self.generation == generation:
            self._apply(table, variants, text)
            log.info("routing table rebound: %s", ", ".join(variants))

    async def watch(self, poll_s: float) -> None:
        """Refresh from the store every ``poll_s`` seconds, for as long as the replica lives."""
        while True:
            await asyncio.sleep(poll_s)
            try:
                await self.refresh()
            except Exception:  # a store hiccup must not end the watch
                log.exception("reading the routing table failed; retrying in %g s", poll_s)

    def _apply(
        self, table: RouteTable | None, variants: dict[str, RoutedCascade], text: str | None
    ) -> None:
        """The new table and its variants, swapped in together (one event-loop step)."""
        versions = table.versions() if table else []
        self.variants = {v: variants[v] for v in versions}
        self.table, self.stored = table, text
        self.generation += 1

    def _resolve_ref(self, ref: str) -> tuple[str, RoutedCascade]:
        try:
            return self.resolve(version_of(ref) or ref)  # v7 and 7 name version 7
        except NotFound as exc:
            raise InvalidRequest(f"route {ref!r}: {exc.message}") from None

    async def _registry(self, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)`` in a thread; a registry that fails is a 503, not a 500."""
        try:
            return await asyncio.to_thread(fn, *args)
        except ScaledlError:
            raise
        except Exception as exc:
            log.exception("the registry failed while setting the routing table")
            raise ServiceUnavailable(
                f"the registry could not be reached ({type(exc).__name__}): retry shortly"
            ) from exc


def build_table(spec: RouteSpec, versions: dict[str, str], by: str) -> RouteTable:
    """The table ``spec`` asks for, its refs resolved to ``versions`` (ref -> version):
    what ``PUT /routes`` and the rollout controller store. An inconsistent one (a version
    twice, a shadow that also takes traffic) is a 400 saying why."""
    try:
        return RouteTable(
            routes=[
                RouteEntry(ref=ref, version=versions[ref], weight=weight)
                for ref, weight in spec.routes.items()
            ],
            shadow=RouteEntry(ref=spec.shadow, version=versions[spec.shadow], weight=0)
            if spec.shadow
            else None,
            updated_at=datetime.now(UTC).isoformat(timespec="seconds"),
            updated_by=by,
        )
    except ValueError as exc:
        raise InvalidRequest(f"invalid routing table: {error_text(exc)}") from None


def error_text(exc: ValueError) -> str:
    """A validation error as one line for a person (pydantic's lists every detail)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(e["msg"].removeprefix("Value error, ") for e in errors())
    return str(exc)
