"""``scaledl monitor``: the distribution's Prometheus for the local Ray cluster.

It runs ``cluster/prometheus/`` as it is (the scrape config on Ray's service-discovery
file, the recording and alert rules) on loopback, with its data under the storage root,
so one machine is watched the way a cluster is: the same rules, the same series. Nothing
is downloaded: the binary is the Debian package's (``apt-get install prometheus``).

Prometheus is a child of this command and lives exactly as long as it: stopped by its pid
on Ctrl-C or SIGTERM, and (Linux) killed by the kernel if this process dies without
getting to stop it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from app.cli.base import CliState, console
from app.errors import ConfigError, ServiceUnavailable
from app.runtime import sigterm_as_interrupt

# The config and rules this command runs, in the checkout (an editable install's source).
PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "cluster" / "prometheus"
# ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
SD_FILE_NAME = "prom_metrics_service_discovery.json"
INSTALL_HINT = "install the distribution's package: `apt-get install prometheus` (it has promtool)"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 5


@dataclass(frozen=True)
class MonitorPlan:
    """Everything one run of Prometheus needs, checked before it starts."""

    prometheus: str  # the binary
    port: int
    source: Path  # the prometheus.yml the config is made from
    config: dict[str, Any]  # the generated config, rule files and discovery file absolute
    rule_files: tuple[Path, ...]
    sd_files: tuple[Path, ...]  # Ray's discovery file(s) the scrape reads
    home: Path  # <storage_root>/prometheus: the config copy, the data, the log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.home / "prometheus.yml"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log_file(self) -> Path:
        return self.home / "prometheus.log"


def find_binaries() -> tuple[str, str]:
    """``prometheus`` and ``promtool`` from PATH; both come with the same package."""
    found = {name: shutil.which(name) for name in ("prometheus", "promtool")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} not found on PATH: scaledl runs the distribution's "
            f"Prometheus, nothing is downloaded; {INSTALL_HINT}"
        )
    return found["prometheus"], found["promtool"]  # type: ignore[return-value]


def default_ray_temp_dir() -> Path:
    """Where a Ray started here keeps its sessions and the discovery file link, chosen as
    Ray chooses it (``ray._common.utils.get_default_ray_temp_dir``), without importing Ray."""
    if "RAY_TMPDIR" in os.environ:
        return Path(os.environ["RAY_TMPDIR"]) / "ray"
    if sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        return Path(os.environ["TMPDIR"]) / "ray"
    return Path("/tmp/ray")


def check_port_free(port: int) -> None:
    """Refuse a port something already listens on, before anything starts. SO_REUSEADDR
    as Go sets it, so a port a stopped Prometheus left in TIME_WAIT counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise _port_error(port, exc.errno) from None


def _port_error(port: int, code: int | None) -> ConfigError:
    if code == errno.EACCES:
        return ConfigError(f"port {port} needs root here: pass --port 1024 or above, e.g. 9090")
    return ConfigError(
        f"port {port} on 127.0.0.1 is already in use (another Prometheus, or `scaledl "
        f"monitor` already running?): stop it, or pass --port with a free port, e.g. "
        f"--port {port + 1 if port < 65535 else 9091}"
    )


def read_config(prometheus_dir: Path) -> tuple[dict[str, Any], tuple[Path, ...]]:
    """The folder's ``prometheus.yml`` and the rule files it names (relative to the
    folder, as Prometheus resolves them; globs allowed)."""
    path = prometheus_dir / "prometheus.yml"
    if not path.is_file():
        raise ConfigError(
            f"no prometheus.yml in {prometheus_dir}: pass --prometheus-dir a folder laid out "
            "like the checkout's cluster/prometheus/ (prometheus.yml, rules/*.yml)"
        )
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc}): fix it") from None
    rule_files: list[Path] = []
    for entry in config.get("rule_files") or []:
        pattern = Path(entry) if Path(entry).is_absolute() else prometheus_dir / entry
        matches = sorted(pattern.parent.glob(pattern.name))
        if not matches:
            raise ConfigError(f"{path} names rule file {entry!r}, which does not exist: fix it")
        rule_files.extend(m.resolve() for m in matches)
    return config, tuple(rule_files)


def check_rules(promtool: str, rule_files: tuple[Path, ...]) -> None:
    """``promtool check rules`` per file, so a broken rule stops here with promtool's own
    message rather than as a Prometheus that exits at start with a line in its log."""
    for path in rule_files:
        result = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            said = (result.stderr.strip() or result.stdout.strip()).replace("\n", " ")
            raise ConfigError(
                f"rule file {path} fails `promtool check rules`: {said} — fix the rule "
                f"(`promtool check rules {path}` checks it again)"
            )


def point_at(
    config: dict[str, Any], rule_files: tuple[Path, ...], ray_temp_dir: Path
) -> tuple[dict[str, Any], tuple[Path, ...]]:
    """The config to run: rule files absolute (the copy lives elsewhere), and each file_sd
    entry on Ray's discovery file moved to this Ray temp root (``ray start --temp-dir``)."""
    sd_file = (ray_temp_dir / SD_FILE_NAME).resolve()
    out = {**config, "rule_files": [str(p) for p in rule_files]}
    jobs, sd_files = [], []
    for job in config.get("scrape_configs") or []:
        discovery = []
        for sd in job.get("file_sd_configs") or []:
            files = [
                str(sd_file) if Path(f).name == SD_FILE_NAME else f for f in sd.get("files", [])
            ]
            sd_files.extend(Path(f) for f in files if Path(f).name == SD_FILE_NAME)
            discovery.append({**sd, "files": files})
        jobs.append({**job, "file_sd_configs": discovery} if discovery else job)
    if jobs:
        out["scrape_configs"] = jobs
    return out, tuple(dict.fromkeys(sd_files))


def plan(
    prometheus: str,
    promtool: str,
    *,
    port: int,
    prometheus_dir: Path,
    ray_temp_dir: Path,
    storage_root: Path,
) -> MonitorPlan:
    """Check everything a user can get wrong, before a process starts."""
    check_port_free(port)
    config, rule_files = read_config(prometheus_dir)
    check_rules(promtool, rule_files)
    config, sd_files = point_at(config, rule_files, ray_temp_dir)
    home = storage_root.resolve() / "prometheus"
    source = (prometheus_dir / "prometheus.yml").resolve()
    return MonitorPlan(prometheus, port, source, config, rule_files, sd_files, home)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec hook: the kernel sends Prometheus SIGTERM when this process dies (Linux
    PR_SET_PDEATHSIG), so a ``kill -9`` of the CLI cannot leave it running."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def hook() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the hook ran
            os._exit(1)

    return hook


def _log_tail(plan: MonitorPlan) -> str:
    try:
        lines = plan.log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-LOG_TAIL_LINES:])


def _exited_error(plan: MonitorPlan, code: int, when: str) -> ConfigError | ServiceUnavailable:
    tail = _log_tail(plan)
    if "address already in use" in tail:
        return _port_error(plan.port, errno.EADDRINUSE)
    if "lock DB directory" in tail:
        return ConfigError(
            f"another Prometheus holds {plan.data_dir}: stop it, or give this one another "
            "storage root (SCALEDL_STORAGE_ROOT)"
        )
    return ServiceUnavailable(
        f"Prometheus exited {when} (code {code}): {tail or 'no log'}; fix what its log "
        f"{plan.log_file} says, then run `scaledl monitor` again"
    )


# Loopback never goes through an HTTP(S)_PROXY from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _ready(url: str) -> bool:
    try:
        with _DIRECT.open(f"{url}/-/ready", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to Prometheus's pid (it flushes and exits), SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        proc.wait()


@contextmanager
def exclusive(plan: MonitorPlan) -> Iterator[None]:
    """One Prometheus per data folder, held by a lock for this command's life: two on one
    TSDB corrupt it, and Debian's build takes no lock of its own by default (its
    ``--storage.tsdb.use-lockfile`` is a flag that upstream builds lack)."""
    plan.home.mkdir(parents=True, exist_ok=True)
    with (plan.home / "monitor.lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise ConfigError(
                f"another `scaledl monitor` (pid {holder}) runs Prometheus on {plan.data_dir}: "
                "stop it, or give this one another storage root (SCALEDL_STORAGE_ROOT)"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


@contextmanager
def running(plan: MonitorPlan) -> Iterator[subprocess.Popen]:
    """Prometheus started from the plan and ready on its port; stopped on the way out."""
    plan.data_dir.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Written by `scaledl monitor` at each start, from {plan.source}: edit that file,\n"
        "# not this one. Here the rule files are absolute and Ray's discovery file is this run's.\n"
    )
    plan.config_file.write_text(header + yaml.safe_dump(plan.config, sort_keys=False))
    with plan.log_file.open("w") as log:
        proc = subprocess.Popen(
            [
                plan.prometheus,
                f"--config.file={plan.config_file}",
                f"--storage.tsdb.path={plan.data_dir}",
                f"--web.listen-address=127.0.0.1:{plan.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C reaches this command only, which then stops it.
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(plan.url):
            if proc.poll() is not None:
                raise _exited_error(plan, proc.returncode, "at start")
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"Prometheus did not get ready on {plan.url} within {READY_TIMEOUT_S:.0f} "
                    f"s: see its log {plan.log_file}"
                )
            time.sleep(0.2)
        yield proc
    finally:
        _stop(proc)


def wait_until_stopped(proc: subprocess.Popen, plan: MonitorPlan) -> None:
    """Block until Ctrl-C or SIGTERM, as `scaledl serve` does; unlike
    ``serve_until_interrupted`` it also wakes when Prometheus dies, and says so."""
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        return
    raise _exited_error(plan, code, "while running")


def dashboard_env(url: str, grafana: str | None) -> dict[str, str]:
    """What the Ray dashboard reads, when its head starts, to find Prometheus (and Grafana)
    (``ray/dashboard/modules/metrics/metrics_head.py``)."""
    env = {"RAY_PROMETHEUS_HOST": url}
    if grafana:
        env["RAY_GRAFANA_HOST"] = grafana
    return env


def _rule_counts(rule_files: tuple[Path, ...]) -> tuple[int, int]:
    records = alerts = 0
    for path in rule_files:
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups") or []:
            for rule in group.get("rules") or []:
                records += "record" in rule
                alerts += "alert" in rule
    return records, alerts


def report_lines(plan: MonitorPlan, grafana: str | None) -> list[str]:
    records, alerts = _rule_counts(plan.rule_files)
    lines = [
        f"Prometheus  {plan.url}   (/targets, /alerts, /rules)",
        f"rules       {records} recording, {alerts} alerting, from "
        + ", ".join(str(p) for p in plan.rule_files),
    ]
    for sd in plan.sd_files:
        lines.append(f"scrapes     the Ray nodes listed in {sd}")
        if not sd.exists():
            lines.append(
                "            (not there yet: a head with its dashboard writes it, e.g. "
                "`scaledl serve` or `ray start --head`)"
            )
    lines += [
        f"data        {plan.data_dir}   (log {plan.log_file})",
        "For the Ray dashboard's metrics, set these in the environment of `ray start --head` "
        "(or of `scaledl serve` / `scaledl demo`, which start a local head): the dashboard "
        "reads them only when it starts.",
        *(f"  export {k}={v}" for k, v in dashboard_env(plan.url, grafana).items()),
    ]
    if not grafana:
        lines.append(
            "The Metrics tab's charts are Grafana panels: pass --grafana URL once one runs "
            "(cluster/grafana/README.md)."
        )
    return lines


def monitor_cmd(
    ctx: typer.Context,
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port of Prometheus on 127.0.0.1.")
    ] = 9090,
    ray_temp_dir: Annotated[
        Path | None,
        typer.Option(
            help="Ray's temp root, where the discovery file is (`ray start --temp-dir`; "
            "default as Ray picks it: $RAY_TMPDIR/ray, else $TMPDIR/ray, else /tmp/ray)."
        ),
    ] = None,
    prometheus_dir: Annotated[
        Path,
        typer.Option(help="Folder with prometheus.yml and the rule files it names."),
    ] = PROMETHEUS_DIR,
    grafana: Annotated[
        str | None,
        typer.Option(help="A running Grafana's URL, for RAY_GRAFANA_HOST."),
    ] = None,
) -> None:
    """Run Prometheus for the local Ray cluster with scaledl's rules, until Ctrl-C.

    Prints its URL and what to set for the Ray dashboard's metrics."""
    if grafana is not None and not grafana.startswith(("http://", "https://")):
        raise ConfigError(f"--grafana {grafana!r} is not a URL: pass e.g. http://127.0.0.1:3000")
    state: CliState = ctx.obj
    settings = state.settings()
    prometheus, promtool = find_binaries()
    the_plan = plan(
        prometheus,
        promtool,
        port=port,
        prometheus_dir=prometheus_dir,
        ray_temp_dir=ray_temp_dir or default_ray_temp_dir(),
        storage_root=settings.storage_root,
    )
    with sigterm_as_interrupt(), exclusive(the_plan), running(the_plan) as proc:
        for line in report_lines(the_plan, grafana):
            console().print(line, soft_wrap=True, highlight=False, markup=False)
        console().print("monitoring; press Ctrl-C to stop")
        wait_until_stopped(proc, the_plan)
    console().print("Prometheus stopped")
