"""Faults injected into one cascade version on purpose (``serve.faults``, tests and
development only): a share of its requests fails, or each answers later. Rollout tests
make a challenger bad with it, and chaos tests a tier slow."""

from __future__ import annotations

import asyncio
import random

from app.errors import ScaledlError
from app.sections import Fault


class InjectedFault(ScaledlError):
    """A request failed by ``serve.faults``: a 500, counted as the version's error."""

    status_code = 500


async def inject(fault: Fault | None, version: str, rng: random.Random | None = None) -> None:
    """Delay, then maybe fail, one request of ``version`` as ``fault`` says."""
    if fault is None:
        return
    if fault.delay_ms:
        await asyncio.sleep(fault.delay_ms / 1000)
    if fault.fail_share and (rng or random).random() < fault.fail_share:
        raise InjectedFault(f"fault injected into version {version} (serve.faults)")
