"""The chaos tier: faults under a bounded load from a client on loopback, every request
counted.

A request is *lost* when it gets no answer, or any answer but a success or an explicit
429/503 with Retry-After. Each scenario adds a row to the table printed at the end of
the run (:func:`pytest_terminal_summary`): requests, succeeded, shed, lost, and the
recovery times, until the first success after the fault and until full capacity.

The tier shares the integration tier's Ray cluster and trained platform
(tests/ray_platform.py): `make test` runs both in one pytest session.
"""

from __future__ import annotations

import asyncio
import csv
import io
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from app.keys import dev_key
from app.serving import Endpoint, deploy
from app.settings import Settings, load_settings
from tests.conftest import free_port
from tests.ray_platform import AUTH, KEY, Platform, wait_for_serve_gone

FULL = 0.8  # a second with this share of the successes a second before the fault is "full"
WARM_S = 4.0  # load before the fault: its last 3 s are the baseline
RECOVER_S = 60.0  # Ray's chaos tests give resources 60 s to return


@dataclass(frozen=True)
class Answer:
    started: float  # seconds since the load began
    ended: float
    status: int  # 0: no answer at all (a connection error, the client's timeout)
    retry_after: bool
    degraded: bool = False
    expensive: bool = False  # the expensive tier answered it
    error: str = ""  # what the client raised, when no answer came
    # Who answered a non-200: "haproxy" for HAProxy's own error file (no Server header;
    # Ray 2.60's HAProxy answers its 502, 503 and 504 with a plain 500), else the
    # replica's server (uvicorn).
    via: str = ""

    @property
    def outcome(self) -> str:
        if self.status == 200:
            return "succeeded"
        if self.status in (429, 503) and self.retry_after:
            return "shed"
        return "lost"


@dataclass
class Load:
    """A closed loop of ``clients`` on loopback, each posting one row at a time (the test
    split, round robin) until the block ends. Runs on a thread of its own."""

    url: str
    rows: np.ndarray
    clients: int = 8
    timeout_s: float = 20.0  # above serve.request_timeout_s: a hang shows as lost
    answers: list[Answer] = field(default_factory=list)

    def __enter__(self) -> Load:
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 10)

    def now(self) -> float:
        return time.monotonic() - self._t0

    async def _run(self) -> None:
        bodies = [{"instances": [row.tolist()]} for row in self.rows]
        limits = httpx.Limits(max_connections=self.clients)
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
            await asyncio.gather(*(self._client(client, bodies, i) for i in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient, bodies: list, i: int) -> None:
        while not self._stop.is_set():
            started = self.now()
            try:
                resp = await client.post(self.url, json=bodies[i % len(bodies)], headers=AUTH)
                tiers = (
                    [(p["tier"], p["degraded"]) for p in resp.json()["predictions"]]
                    if resp.status_code == 200
                    else []
                )
                answer = Answer(started, self.now(), resp.status_code,
                                "retry-after" in resp.headers, any(d for _, d in tiers),
                                any(t == "expensive" for t, _ in tiers),
                                via=resp.headers.get("server", "haproxy"))  # fmt: skip
            except (httpx.HTTPError, ValueError) as exc:
                answer = Answer(started, self.now(), 0, False, error=f"{type(exc).__name__}: {exc}")
            self.answers.append(answer)
            i += self.clients
            if answer.outcome == "shed":  # as a well-behaved client: after Retry-After
                await asyncio.sleep(float(resp.headers["retry-after"]))

    def rate(self, start: float, end: float) -> float:
        """Successes a second that ended in [start, end)."""
        done = sum(a.status == 200 and start <= a.ended < end for a in self.answers)
        return done / (end - start)

    def wait_recovered(self, fault_at: float, baseline: float, max_s: float) -> None:
        """Until 3 s in a row after the fault ran at full capacity, or ``max_s``."""
        deadline = fault_at + max_s
        while self.now() < deadline:
            time.sleep(0.5)
            now = self.now()
            if now - fault_at > 4 and self.rate(now - 3, now) >= FULL * baseline:
                if _first_success(self.answers, fault_at) is not None:
                    return


def warmed(load: Load) -> tuple[float, float]:
    """The fault's time and the baseline rate (successes a second) just before it."""
    time.sleep(WARM_S)
    now = load.now()
    baseline = load.rate(now - 3, now)
    assert baseline > 0, "no success before the fault: the service is not serving"
    return now, baseline


def running(deployment: str, app: str = "digits") -> int:
    """Replicas of ``deployment`` the Serve controller calls RUNNING."""
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def _first_success(answers: list[Answer], after: float) -> float | None:
    return min((a.ended for a in answers if a.status == 200 and a.started >= after), default=None)


@dataclass(frozen=True)
class Row:
    scenario: str
    requests: int
    succeeded: int
    shed: int
    lost: int
    first_success_s: float | None  # after the fault
    full_capacity_s: float | None
    note: str = ""


ROWS: list[Row] = []  # this session's scenarios, for the table


def record(scenario: str, load: Load, fault_at: float, baseline: float, note: str = "") -> Row:
    """The scenario's row: counts, and recovery measured from the answers. Full
    capacity: the end of the last 3 s window (in steps of 1 s) after the fault whose
    rate was below ``FULL`` x the baseline (0 if none was)."""
    answers = list(load.answers)
    counts = Counter(a.outcome for a in answers)
    first = _first_success(answers, fault_at)
    end = max(a.ended for a in answers)
    low = [
        t + 3 for t in np.arange(fault_at, end - 3, 1.0) if load.rate(t, t + 3) < FULL * baseline
    ]
    row = Row(
        scenario,
        len(answers),
        counts["succeeded"],
        counts["shed"],
        counts["lost"],
        None if first is None else max(0.0, first - fault_at),
        (max(low) - fault_at) if low else 0.0,
        note,
    )
    ROWS.append(row)
    lost = Counter(
        (a.status, a.via, a.retry_after, a.error, round(a.started - fault_at, 1))
        for a in answers
        if a.outcome == "lost"
    )
    print(f"{row}; lost (status, via, retry-after, error, sent at): {dict(lost)}; "
          f"baseline {baseline:.0f}/s")  # fmt: skip
    return row


def load_row(scenario: str, run: HeyRun, note: str) -> Row:
    """The row of a load without a fault (hey's), counted as a scenario's: lost is what
    got no answer, or any answer but 200, 429 or 503; no recovery to time."""
    ok, shed = run.statuses[200], run.statuses[503] + run.statuses[429]
    row = Row(scenario, run.sent, ok, shed, run.sent - ok - shed, math.nan, math.nan, note)
    ROWS.append(row)
    return row


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("chaos: every request counted")

    def s(x: float | None) -> str:
        return "never" if x is None else "-" if math.isnan(x) else f"{x:.1f}"

    write("| scenario | requests | succeeded | shed | lost | first success s | full capacity s |")
    write("|---|---:|---:|---:|---:|---:|---:|")
    for r in ROWS:
        write(
            f"| {r.scenario} | {r.requests} | {r.succeeded} | {r.shed} | {r.lost} "
            f"| {s(r.first_success_s)} | {s(r.full_capacity_s)} |"
        )
    for r in ROWS:
        if r.note:
            write(f"- {r.scenario}: {r.note}")


@dataclass(frozen=True)
class HeyRun:
    sent: int
    statuses: Counter  # status -> responses; 0: no answer (hey's errors)
    seconds: float  # from the first request sent to the last answer
    offsets: np.ndarray  # when each answered request was sent, s since hey started
    times: np.ndarray  # how long its answer took, s
    statuses_of: np.ndarray  # its status

    @property
    def latency(self) -> dict[int, np.ndarray]:
        """Status -> seconds of each answer."""
        return {s: self.times[self.statuses_of == s] for s in set(self.statuses_of.tolist())}

    @property
    def goodput(self) -> float:
        return self.statuses[200] / self.seconds


def hey(url: str, body: Path, *, clients: int, sent: int, per_client_qps: float = 0) -> HeyRun:
    """About ``sent`` requests (a whole number per client) from ``clients`` connections
    (each at most ``per_client_qps`` a second when set), every answer's status and
    latency (hey's CSV). hey leaves a request that got no answer out of the CSV: the
    requests sent minus the rows is their count."""
    sent = max(sent // clients, 1) * clients  # what hey sends: n / c per client
    exe = shutil.which("hey")
    if exe is None:
        pytest.fail("hey is not on PATH: `apt-get install hey` (.ci/run does it)")
    cmd = [exe, "-n", str(sent), "-c", str(clients), "-m", "POST", "-T", "application/json",
           "-H", f"Authorization: Bearer {KEY}", "-D", str(body), "-t", "20",
           "-o", "csv"]  # fmt: skip
    if per_client_qps:
        cmd += ["-q", f"{per_client_qps:.2f}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=300, check=True)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    statuses = Counter(int(r["status-code"]) for r in rows)
    if sent > len(rows):
        statuses[0] = sent - len(rows)
    offsets = np.array([float(r["offset"]) for r in rows])
    times = np.array([float(r["response-time"]) for r in rows])
    by_status = np.array([int(r["status-code"]) for r in rows])
    seconds = float((offsets + times).max() - offsets.min())
    return HeyRun(sent, statuses, seconds, offsets, times, by_status)


def serve_processes(title: str) -> list[psutil.Process]:
    """This host's Ray worker processes whose title starts with ``ray::<title>``, as
    ``ps`` shows them (e.g. ``ServeReplica:digits:cheap-tier``, ``ServeController``)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith(f"ray::{title}"):
            found.append(proc)
    return found


def kill_one(title: str) -> int:
    """SIGKILL one process titled ``ray::<title>`` (a crash, an OOM kill); its pid, once
    it is dead. ``kill`` returns before the kernel has closed the process's sockets, and
    a request routed to it in that window dies with it: it was in flight on it."""
    procs = serve_processes(title)
    assert procs, f"no process titled ray::{title}"
    victim = procs[0]
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if victim.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.005)
    else:
        raise AssertionError(f"ray::{title} (pid {victim.pid}) outlived SIGKILL by 10 s")
    return victim.pid


def chaos_settings(storage_root: Path, port: int, **serve: object) -> Settings:
    """A trained store, served as for high availability: two replicas of each tier and
    of the ingress, so that a dead one has a twin to take its requests."""
    two = {"min_replicas": 2, "max_replicas": 2}
    return load_settings(
        storage_root=storage_root,
        serve={
            "port": port,
            "cheap_replicas": two,
            "expensive_replicas": two,
            "ingress_replicas": two,
            **serve,
        },
    )


@pytest.fixture(scope="session")
def service(platform: Platform) -> Iterator[Endpoint]:
    """The platform's cascade, deployed once for the tier (after the integration tier's
    modules, which shut theirs down)."""
    from ray import serve

    yield deploy(
        chaos_settings(platform.settings.storage_root, free_port()), "digits", [dev_key(KEY)]
    )
    serve.shutdown()
    wait_for_serve_gone()


__all__ = [
    "Answer",
    "HeyRun",
    "Load",
    "Row",
    "RECOVER_S",
    "chaos_settings",
    "hey",
    "kill_one",
    "load_row",
    "record",
    "running",
    "serve_processes",
    "warmed",
]
