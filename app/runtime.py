"""Joining or starting Ray, once, at the edge."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from app.errors import ConfigError
from app.settings import Settings

MIN_LOCAL_CPUS = 4


@dataclass(frozen=True)
class RayInfo:
    address: str
    dashboard_url: str | None
    started_here: bool


# Ray 2.60's faster Serve transport: HAProxy as the HTTP proxy, the ingress replica
# answering HTTP itself, gRPC between deployments, and Ray's throughput bundle (user code
# and the router on the replica's own event loop, Serve logs to files only, the heap
# frozen for the GC after start-up). Request-path log lines are still written one by one
# (the bundle would buffer 1,000 of them): it measured no slower (bench/serve.py).
# An ingress replica that stops (shutdown, a redeploy that replaces it, a scale-down)
# stays reachable for a window so that load balancers deregister it; only Ray's own
# HAProxy routes to it, which reloads within about a second of the change, and a late
# connection after the window is refused and retried elsewhere by HAProxy. Ray's
# default window, 30 s, is for balancers outside Ray; 5 s here cuts 25 s from every
# stop and replacement of an ingress replica.
# HAProxy replays a request on the other ingress replica when the one it sent it to
# closed the connection with no answer or a garbled one (a crash), not only when it could
# not connect: Ray's default, conn-failure, turned such a request into a closed
# connection or a 500 (HAProxy's 502, which Ray maps to 500). A prediction is
# idempotent, and a replica that closes without answering did not finish the request.
# What it does not replay, and the counts measured, are in README.md, "Faults"; the
# chaos test asserts its bounds. It applies to every route
# (Ray writes it in HAProxy's defaults): an admin POST whose replica died before
# answering is replayed too. HAProxy keeps a copy only of a request that fits its buffer
# (Ray sets tune.bufsize 16384): a larger one is not replayed.
FAST_TRANSPORT = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
}


def export_lines(variables: dict[str, str]) -> str:
    """``export NAME=value`` lines, quoted for a POSIX shell (a value may hold spaces):
    `eval "$(scaledl serve transport)"` sets them."""
    import shlex

    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in variables.items())


def transport_env(settings: Settings) -> dict[str, str]:
    """The variables of the transport ``settings`` choose (serve.fast_transport): what a
    local cluster starts with, and what a cluster to join needs at each `ray start`."""
    return dict(FAST_TRANSPORT) if settings.serve.fast_transport else {}


@contextmanager
def ray_session(settings: Settings, *, verbose: bool = False) -> Iterator[RayInfo]:
    """Join ``settings.ray_address`` (or RAY_ADDRESS), or start a local cluster.

    A local cluster gets at least 4 logical CPUs, so that two trainers, Ray Data and the
    Serve replicas can all be placed on a laptop; they share the real cores.
    """
    import ray

    if ray.is_initialized():  # already connected (an embedding program, a test)
        yield RayInfo(ray.get_runtime_context().gcs_address, None, False)
        return
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    if not verbose:
        _quiet_libraries()
    before: set[int] = set()
    owned = not settings.ray_address
    if owned:
        os.environ.update(transport_env(settings))  # the cluster's processes read them
        before = adopt_orphans()
        ctx = ray.init(
            num_cpus=settings.ray_num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_CPUS),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            **quiet,
        )
    else:
        check_reachable(settings.ray_address)
        ctx = ray.init(address=settings.ray_address, **quiet)
    dashboard = f"http://{ctx.dashboard_url}" if ctx.dashboard_url else None
    stop = Sigterm()
    try:
        with sigterm_as_interrupt(stop):
            yield RayInfo(ctx.address_info["gcs_address"], dashboard, owned)
    finally:
        if owned and stop.received:
            # It may have reached the whole process group, the raylet's too. A driver
            # whose raylet goes first can abort in ray.shutdown, before any cleanup;
            # and the raylet drains for up to 30 s on SIGTERM. Stop the cluster now.
            stop_descendants(before, timeout_s=1.0)
        ray.shutdown()
        if owned:
            stop_descendants(before)


# A local cluster's processes descend from this one, but not all in its process group:
# the workers run in groups of their own, and so does what they start, such as the HTTP
# proxy's HAProxy. A SIGTERM to this process group (systemd, a CI runner) stops the
# raylet at once; the proxy actor dies with it, and its HAProxy, orphaned, went on
# holding the Serve port. As the "child subreaper" of its descendants (Linux), this
# process inherits such orphans instead of init, and stops them when the session ends.
PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> set[int]:
    """Become the subreaper of this process's descendants; return the ones already
    running (not the session's, so never stopped by :func:`stop_descendants`)."""
    import psutil

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    return {p.pid for p in psutil.Process().children(recursive=True)}


def stop_descendants(keep: set[int], timeout_s: float = 5.0) -> list[int]:
    """SIGTERM every descendant not in ``keep``, SIGKILL what is left after
    ``timeout_s``, and reap them all; return the pids that were stopped."""
    import psutil

    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in keep]
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout_s)
    return [p.pid for p in left]


@dataclass
class Sigterm:
    received: bool = False


@contextmanager
def sigterm_as_interrupt(stop: Sigterm | None = None) -> Iterator[None]:
    """While it lasts, SIGTERM (systemd, Kubernetes, `kill`) stops the process as Ctrl-C
    does, with a KeyboardInterrupt, and is noted in ``stop``. It replaces the handler
    ``ray.init`` sets, which exits the same way (SystemExit) but leaves no note. Main
    thread only: Python runs handlers there. (Ctrl-C itself: :func:`take_back_sigint`.)"""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(*_: object) -> None:
        if stop is not None:
            stop.received = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def take_back_sigint() -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt, even where the process inherited it
    ignored: a command started with `&` in a shell script does, and Python then keeps
    it so. `kill -INT` to the process group of such a `scaledl serve` left it serving,
    and its cluster running. The CLI calls it first thing, for every command."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` that nothing answers on is a ConfigError now, not minutes of retries.

    ``ray.init`` keeps retrying an unreachable GCS for minutes; other address forms
    (``auto``, ``ray://``) are left to Ray.
    """
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one with "
            "`ray start --head`, fix RAY_ADDRESS / SCALEDL_RAY_ADDRESS, or unset both to "
            "run on a local cluster"
        ) from None


def _quiet_libraries() -> None:
    """Keep Ray Data/Train/Serve chatter out of the CLI's own output (they still log to files)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    for name in ("ray.data", "ray.train", "ray.serve", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
