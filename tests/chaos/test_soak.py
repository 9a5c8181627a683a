"""Soak: 20,000 requests at about 70 % of the capacity measured just before, from `hey`.
The replicas' memory stays flat and the p99 does not creep."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest

from app.serving import Endpoint
from tests.chaos.conftest import hey, load_row, serve_processes

REQUESTS = 20_000
CLIENTS = 32


@pytest.mark.slow
def test_20000_requests_at_70_percent_keep_memory_flat_and_p99_steady(
    service: Endpoint, test_rows: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, _ = test_rows
    body = tmp_path / "one-row.json"
    body.write_text(json.dumps({"instances": [x[1].tolist()]}))
    capacity = hey(service.predict_url, body, clients=64, sent=2000).goodput
    replicas = serve_processes("ServeReplica:digits:")
    rss: dict[int, list[int]] = {p.pid: [] for p in replicas}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            for p in replicas:
                try:
                    rss[p.pid].append(p.memory_info().rss)
                except psutil.Error:  # a replica replaced meanwhile: asserted below
                    pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run = hey(service.predict_url, body, clients=CLIENTS, sent=REQUESTS,
                  per_client_qps=0.7 * capacity / CLIENTS)  # fmt: skip
    finally:
        done.set()
        sampler.join()
    # p99 of the first and the last quarter of the run, by when each request was sent
    order = np.argsort(run.offsets)
    quarter = len(order) // 4
    first, last = (float(np.percentile(run.times[order[s]], 99)) for s in
                   (slice(None, quarter), slice(-quarter, None)))  # fmt: skip
    growth = {pid: np.mean(v[-len(v) // 4 :]) / np.mean(v[: len(v) // 4]) for pid, v in rss.items()}
    worst = max(growth.values())
    row = load_row(
        f"soak at 70 % ({0.7 * capacity:.0f} req/s)", run,
        note=f"{run.seconds:.0f} s; p99 {first * 1000:.0f} ms in the first quarter, "
        f"{last * 1000:.0f} ms in the last; replica RSS last/first quarter at most "
        f"{worst:.3f}x over {len(replicas)} replicas",
    )  # fmt: skip
    print(row)
    assert run.statuses[200] == run.sent, run.statuses
    assert all(len(v) >= 8 for v in rss.values()), "a replica went away during the soak"
    assert worst <= 1.1, growth
    assert last <= 2 * first + 0.05, (first, last)  # no creep, beyond a loaded host's noise
