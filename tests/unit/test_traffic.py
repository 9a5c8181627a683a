"""The demo's load generator reports failed requests instead of crashing on them."""

from __future__ import annotations

import asyncio

import numpy as np

from app.cli.traffic import send_instances
from tests.conftest import free_port


def test_unreachable_service_counts_every_request_as_failed() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/models/digits/predict"  # nothing listens
    report = asyncio.run(send_instances(url, "key", np.zeros((5, 64)), np.zeros(5), concurrency=2))
    assert report.answered == 0
    assert report.errors == {"ConnectError": 5}
