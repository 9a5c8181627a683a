"""Load from ``wrk``: one thread, N keep-alive connections, POSTs of a set of bodies in turn.

The Lua script formats every request once in ``init`` and hands them out in turn, and
reports wrk's own summary as one JSON line from ``done()``; no per-response hook, so wrk
spends as little CPU as it can.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MARK = "WRKJSON "
DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\\n',
    "WRKJSON ", summary.requests, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    return path


@dataclass(frozen=True)
class Result:
    """One measured run. ``rate`` counts answers below 400 only; ``errors`` are wrk's
    status errors (HTTP >= 400) plus its socket errors (connect, read, write, timeout)."""

    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return max(self.requests - self.errors, 0) / self.seconds


def lua_script(bodies: list[str], key: str | None) -> str:
    """POSTs of ``bodies`` in turn (requests pre-formatted once, so wrk stays cheap)."""
    lines = [
        'wrk.method = "POST"',
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if key:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {key}"')
    lines.append("local bodies = {" + ",".join(f"[==[{b}]==]" for b in bodies) + "}")
    lines += [
        "local requests, i = {}, 0",
        "init = function(args)",
        "  for k, b in ipairs(bodies) do requests[k] = wrk.format(nil, nil, nil, b) end",
        "end",
        "request = function()",
        "  i = i % #requests + 1",
        "  return requests[i]",
        "end",
    ]
    return "\n".join(lines) + DONE


def run(url: str, script: Path, connections: int, seconds: float, timeout_s: int = 5) -> Result:
    cmd = [
        require_wrk(),
        "-t1",
        f"-c{connections}",
        f"-d{max(round(seconds), 1)}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next((x for x in out.splitlines() if x.startswith(MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {out[-2000:]}")
    s = json.loads(line[len(MARK) :])
    return Result(
        requests=s["requests"],
        seconds=s["duration_us"] / 1e6,
        errors=s["status"] + s["connect"] + s["read"] + s["write"] + s["timeout"],
        p50_ms=s["p50_us"] / 1000,
        p99_ms=s["p99_us"] / 1000,
    )


def probe(url: str, body: str, key: str | None, timeout_s: float = 120) -> dict:
    """The first 200 answer, waiting out start-up (proxies and routes come up late)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        request = urllib.request.Request(url, body.encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return json.loads(resp.read())["predictions"][0]
        except OSError as exc:  # refused, 404/503 while starting
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"{url} gave no 200 within {timeout_s:g} s: {last}")


def measure(
    url: str,
    bodies: list[str],
    key: str | None,
    concurrency: list[int],
    seconds: float,
    warmup: float,
) -> dict[int, tuple[Result, dict[str, float]]]:
    """At each concurrency: a warmup run (discarded), then the measured one with the
    CPU each process used meanwhile."""
    results = {}
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(lua_script(bodies, key))
        f.flush()
        for c in concurrency:
            if warmup > 0:
                run(url, Path(f.name), c, warmup)
            before = cpu_seconds()
            result = run(url, Path(f.name), c, seconds)
            results[c] = result, cpu_split(before, cpu_seconds(), result.seconds)
    return results


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (process label, CPU seconds so far); Ray workers by their title."""
    import psutil

    seen = {}
    for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        cmd, times = p.info["cmdline"] or [""], p.info["cpu_times"]
        if times is None:
            continue
        label = p.info["name"]
        if cmd[0].startswith("ray::"):  # ray::ServeReplica:app:Deployment.method_running
            label = cmd[0].split(" ")[0].removeprefix("ray::").removeprefix("ServeReplica:")
            label = label.split(".")[0]
        seen[p.pid] = (label, times.user + times.system)
    return seen


def cpu_split(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """Cores each process label used between two snapshots (1.0 = one core busy)."""
    used: dict[str, float] = {}
    for pid, (label, total) in after.items():
        start = before.get(pid, (label, 0.0))[1]
        used[label] = used.get(label, 0.0) + (total - start) / seconds
    return {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.03}
