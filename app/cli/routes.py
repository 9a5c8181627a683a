"""``scaledl route``: the routing table of a running service (A/B, canary, shadow).

The commands talk to the service's admin routes over HTTP with an admin key, as any
operator tool would: nothing is redeployed, and the table is stored in the registry, so
every ingress replica applies it within ``serve.routes_poll_s`` seconds.

    scaledl route set digits champion=90 challenger=10 --shadow v7
    scaledl route show digits
    scaledl route clear digits
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from rich.table import Table

from app.cli.base import console
from app.errors import ConfigError, ScaledlError, ServiceUnavailable

route_cli = typer.Typer(
    help="A/B, canary and shadow routing of a running service, without redeploying.",
    no_args_is_help=True,
)

UrlOpt = Annotated[
    str | None,
    typer.Option(help="The service's base URL (default: http://<serve.host>:<serve.port>)."),
]
# The admin key never goes on the command line, where `ps` and shell history would keep
# it: it comes from SCALEDL_API_KEY or a file, as `ray job submit` takes its token.
KeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        help="A file holding the admin API key (default: the SCALEDL_API_KEY variable).",
        show_default=False,
    ),
]
Workload = Annotated[str, typer.Argument(help="Model (workload) name, e.g. digits.")]


class RemoteError(ScaledlError):
    """The service refused the call: its status and its message."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


def parse_routes(routes: list[str], shadow: str | None):  # noqa: ANN201 - a RouteSpec
    """``["champion=90", "challenger=10"]`` -> the admin route's request body.

    Only the shape is checked here (the weights' sum too); the service checks the rest.
    """
    from serve_graphs.decide.routing import RouteSpec

    weights: dict[str, int] = {}
    for item in routes:
        ref, sep, weight = item.partition("=")
        if not sep or not ref:
            raise ValueError(f"{item!r}: write each route as <version or alias>=<percent>")
        if not weight.strip().isdigit():
            raise ValueError(f"{item!r}: the weight must be a whole percent, 0 to 100")
        weights[ref] = int(weight)
    return RouteSpec(routes=weights, shadow=shadow)


def _call(
    ctx: typer.Context,
    method: str,
    workload: str,
    url: str | None,
    key_file: Path | None,
    body: dict | None = None,
    path: str = "routes",
) -> dict[str, Any]:
    """``method`` on the admin route ``/v1/models/<workload>/<path>``: its JSON answer,
    or the service's error as a RemoteError carrying its status and message."""
    import httpx

    settings = ctx.obj.settings()
    secret = _admin_key(key_file, settings.api_key)
    base = (url or settings.serve.base_url).rstrip("/")
    target = f"{base}/v1/models/{workload}/{path}"
    try:
        resp = httpx.request(
            method, target, json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=30
        )
    except httpx.HTTPError as exc:
        raise ServiceUnavailable(
            f"no service answered at {base} ({exc}): start it with `scaledl serve`, or pass --url"
        ) from None
    if resp.is_success:
        return resp.json()
    try:
        message = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:200]
    raise RemoteError(resp.status_code, f"{method} {target}: {resp.status_code} {message}")


def _admin_key(key_file: Path | None, from_env: SecretStr | None) -> str:
    if key_file is None:
        if from_env is None:
            raise ConfigError(
                "this command needs an admin key: set SCALEDL_API_KEY, or pass --key-file "
                "with a file that holds it (`scaledl keys create --scope admin` prints a new one)"
            )
        return from_env.get_secret_value()
    try:
        secret = key_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"--key-file {key_file} cannot be read ({exc.strerror}): pass the file that holds "
            "the admin key, or set SCALEDL_API_KEY instead"
        ) from None
    if not secret:
        raise ConfigError(f"--key-file {key_file} is empty: write the admin key into it")
    return secret


def _show(view: dict[str, Any]) -> None:
    table = view["table"]
    title = "routing table" if table else f"no table: every request to version {view['deployed']}"
    live = view["stats"]
    columns = ("requests", "error_rate", "p50_ms", "p99_ms", "escalated_share", "agreement")
    out = Table("version", "ref", "weight", *(c.replace("_", " ") for c in columns), title=title)
    deployed = {"ref": "deployed", "version": view["deployed"], "weight": 100}
    entries = table["routes"] if table else [deployed]
    shadow = table["shadow"] if table else None
    for entry in [*entries, *([{**shadow, "weight": "shadow"}] if shadow else [])]:
        seen = live["versions"].get(entry["version"], {})
        seen = {**seen, "agreement": seen.get("shadow", {}).get("agreement")}
        numbers = ("-" if seen.get(c) is None else str(seen[c]) for c in columns)
        out.add_row(entry["version"], entry["ref"], str(entry["weight"]), *numbers)
    console().print(out)
    scope = live.get("off") or f"the last {live['window_s']:g} s, every ingress replica"
    console().print(f"figures: {scope}", style="dim")
    if table:
        console().print(f"set {table['updated_at']} by {table['updated_by']}", style="dim")


@route_cli.command("set")
def route_set(
    ctx: typer.Context,
    workload: Workload,
    routes: Annotated[
        list[str], typer.Argument(help="<version or alias>=<percent> ..., summing to 100.")
    ],
    shadow: Annotated[
        str | None, typer.Option(help="A version that gets a copy of the traffic.")
    ] = None,
    url: UrlOpt = None,
    key_file: KeyFileOpt = None,
) -> None:
    """Set the routing table: e.g. `champion=90 challenger=10 --shadow v7`."""
    from serve_graphs.decide.routing import error_text

    try:
        spec = parse_routes(routes, shadow)
    except ValueError as exc:
        raise ConfigError(error_text(exc)) from None
    _show(_call(ctx, "PUT", workload, url, key_file, spec.model_dump()))


@route_cli.command("show")
def route_show(
    ctx: typer.Context, workload: Workload, url: UrlOpt = None, key_file: KeyFileOpt = None
) -> None:
    """The routing table, and per-version requests, errors, latency and shadow agreement."""
    _show(_call(ctx, "GET", workload, url, key_file))


@route_cli.command("clear")
def route_clear(
    ctx: typer.Context, workload: Workload, url: UrlOpt = None, key_file: KeyFileOpt = None
) -> None:
    """Drop the table: every request goes to the deployed cascade again."""
    _show(_call(ctx, "DELETE", workload, url, key_file))
