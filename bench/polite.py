"""A closed-loop HTTP load generator that honours Retry-After, as a well-behaved client
does: after a 429 or 503 that carries it, that connection waits that long (plus up to
10 % jitter, so the waiters do not come back as one wave) before its next request.

``hey`` and ``wrk`` send the next request at once, so a fast 503 turns into more load.
This one shows what a burst of polite clients gets. Keep-alive connections, one request
at a time on each; a connection the server closes is opened again. Run as a process of
its own, so that its CPU shows apart from the servers'. Raw asyncio streams, not httpx:
the same burst through one httpx.AsyncClient (512 pooled connections) made 76 requests a
second on a full core, against 950-1,005 on 0.2 of a core with this (2026-12-07)::

    python -m bench.polite '{"url": ..., "body": ..., "key": ..., "connections": 512,
                             "seconds": 15}'

prints the same JSON as ``bench.overload.burst``: statuses, latency by status, and
``waited_s`` (the seconds its connections spent honouring Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from urllib.parse import urlsplit

TIMEOUT_S = 20.0  # as hey's -t 20: far past the graph's request timeout


def request_bytes(url: str, body: str, key: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    payload = body.encode()
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return parts.hostname or "127.0.0.1", parts.port or 80, head.encode() + payload


class ClosedIdle(ConnectionError):
    """The server had closed the kept-alive connection before this request: not an
    answer missing, a connection to open again (as HTTP clients do)."""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bool]:
    """Status, headers (lower-case names) and whether the server keeps the connection."""
    status_line = await reader.readline()
    if not status_line:
        raise ClosedIdle
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError(f"no status line: {status_line[:40]!r}")
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    keep = parts[0] == b"HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readline()).split(b";")[0], 16):
            await reader.readexactly(size + 2)  # the chunk and its CRLF
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass  # trailers, up to the blank line
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:  # the body ends with the connection
        await reader.read()
        keep = False
    return int(parts[1]), headers, keep


async def one_connection(
    target: tuple[str, int, bytes], deadline: float, seen: dict[str, list[float]], waits: list
) -> None:
    host, port, request = target
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def exchange() -> tuple[int, dict[str, str], bool]:
        nonlocal connection
        for fresh in (connection is None, True):  # a closed idle connection: once more
            if fresh:
                connection = await asyncio.open_connection(host, port)
            reader, writer = connection
            writer.write(request)
            await writer.drain()
            try:
                return await read_response(reader)
            except ClosedIdle:
                writer.close()
                if fresh:
                    raise
        raise AssertionError("unreachable")

    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            status, headers, keep = await asyncio.wait_for(exchange(), TIMEOUT_S)
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError):
            seen.setdefault("no answer", []).append(time.monotonic() - started)
            if connection is not None:
                connection[1].close()
            connection = None
            await asyncio.sleep(0.1)  # not a tight loop against a refusing server
            continue
        seen.setdefault(str(status), []).append(time.monotonic() - started)
        if not keep and connection is not None:
            connection[1].close()
            connection = None
        retry_after = headers.get("retry-after")
        if status in (429, 503) and retry_after and retry_after.isdigit():
            wait = min(int(retry_after) * random.uniform(1.0, 1.1), deadline - time.monotonic())
            if wait > 0:
                waits.append(wait)
                await asyncio.sleep(wait)
    if connection is not None:
        connection[1].close()


def summary(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1], 1)}


async def polite_burst(url: str, body: str, key: str, connections: int, seconds: float) -> dict:
    target = request_bytes(url, body, key)
    seen: dict[str, list[float]] = {}
    waits: list[float] = []
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(
        *(one_connection(target, deadline, seen, waits) for _ in range(connections))
    )
    elapsed = time.monotonic() - started
    return {
        "connections": connections,
        "seconds": elapsed,
        "responses": sum(len(v) for k, v in seen.items() if k != "no answer"),
        "statuses": {k: len(v) for k, v in sorted(seen.items())},
        "ms": {k: summary([s * 1000 for s in v]) for k, v in sorted(seen.items())},
        "waited_s": round(sum(waits), 1),
    }


def main() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a socket per connection
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    plan = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(polite_burst(**plan))))


if __name__ == "__main__":
    main()
