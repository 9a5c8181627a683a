"""``scaledl keys`` and ``scaledl serve``: the HTTP service's API keys, and deploying the
Serve application (or printing it as a Serve config for `serve deploy`)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from app.cli import reports
from app.cli.base import CliState, WorkloadOpt, console, drop_none
from app.errors import ConfigError
from app.settings import Settings

keys_cli = typer.Typer(help="API keys of the HTTP service.", no_args_is_help=True)
serve_cli = typer.Typer(help="Serve a workload's calibrated cascade over HTTP.")


# ---------------------------------------------------------------------------- keys


@keys_cli.command("create")
def keys_create(
    ctx: typer.Context,
    scope: Annotated[str, typer.Option(help="predict (inference routes) or admin (all).")],
    key_id: Annotated[
        str | None, typer.Option("--id", help="Who holds the key (default: generated).")
    ] = None,
) -> None:
    """Create an API key: its hash goes into the keys file, the key is printed once."""
    from app.keys import SCOPES, create_key

    if scope not in SCOPES:
        raise ConfigError(f"unknown scope {scope!r}: use one of {', '.join(SCOPES)}")
    settings = ctx.obj.settings()
    key, secret = create_key(settings.keys_file, scope, key_id)  # type: ignore[arg-type]
    console().print(f"key {key.id} ({key.scope}) added to {settings.keys_file}")
    console().print(secret, highlight=False, soft_wrap=True)
    console().print("store it now: only its SHA-256 is kept", style="dim")


@keys_cli.command("revoke")
def keys_revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="The key's id, as `scaledl keys list` shows.")],
) -> None:
    """Revoke an API key: its line leaves the keys file.

    A running service re-reads the file when it changes: it refuses the key within
    seconds, without a restart."""
    from app.keys import revoke_key

    settings = ctx.obj.settings()
    key = revoke_key(settings.keys_file, key_id)
    console().print(f"key {key.id} ({key.scope}) revoked: removed from {settings.keys_file}")


@keys_cli.command("list")
def keys_list(ctx: typer.Context) -> None:
    """The keys in the keys file: ids and scopes (secrets are never stored)."""
    from app.keys import read_keys_file

    settings = ctx.obj.settings()
    table = Table("id", "scope", "sha256 (prefix)", title=str(settings.keys_file))
    for key in read_keys_file(settings.keys_file):
        table.add_row(key.id, key.scope, key.sha256[:12])
    console().print(table)


# ---------------------------------------------------------------------------- serve


@serve_cli.callback(invoke_without_command=True)
def serve_cmd(
    ctx: typer.Context,
    workload: Annotated[
        str | None, typer.Option("--workload", "-w", help="Workload name, e.g. digits.")
    ] = None,
    dev: Annotated[
        bool, typer.Option(help="Development: generate and print an API key if none is set.")
    ] = False,
    cascade: Annotated[
        str | None,
        typer.Option(help="Calibrated cascade to serve: alias or version (serve.cascade_ref)."),
    ] = None,
    keep: Annotated[bool, typer.Option(help="Keep serving until Ctrl-C.")] = True,
) -> None:
    """Deploy the Serve application (ingress + cascade + batched tiers) and print its URLs.

    `scaledl serve config` prints the same application as a Serve config YAML instead."""
    from app.runtime import ray_session
    from app.serving import check_models, deploy, resolve_access, serve_until_interrupted

    if ctx.invoked_subcommand is not None:
        return
    if workload is None:
        raise ConfigError("scaledl serve needs --workload, e.g. --workload digits")
    state: CliState = ctx.obj
    settings = state.settings(serve=drop_none(cascade_ref=cascade))
    if not keep and not settings.ray_address:
        raise ConfigError(
            "--no-keep leaves the application running on a cluster this command does not "
            "own; here it would start (and stop) its own: set RAY_ADDRESS to a running "
            "cluster (`ray start --head`), or drop --no-keep"
        )
    access = resolve_access(settings, dev=dev)
    check_models(settings, workload)
    with ray_session(settings, verbose=state.verbose) as ray_info:
        with console().status("deploying…"):
            endpoint = deploy(settings, workload, access.static_keys, keys_file=access.keys_file)
        shown_key = access.client_key if access.generated else None
        for line in reports.url_lines(endpoint, ray_info.dashboard_url, shown_key):
            console().print(line, soft_wrap=True)
        if keep:
            console().print("serving; press Ctrl-C to stop")
            serve_until_interrupted()


@serve_cli.command("config")
def serve_config_cmd(
    ctx: typer.Context,
    workload: WorkloadOpt,
    cascade: Annotated[
        str | None,
        typer.Option(help="Calibrated cascade to serve: alias or version (serve.cascade_ref)."),
    ] = None,
) -> None:
    """Print the Serve config YAML for `serve deploy` (e.g. > cluster/serve.yaml)."""
    from app.runtime import transport_env
    from app.serve_config import to_yaml

    state: CliState = ctx.obj
    settings = state.settings(serve=drop_none(cascade_ref=cascade))
    typer.echo(to_yaml(deployable_config(settings, workload), transport_env(settings)), nl=False)


def deployable_config(settings: Settings, workload: str) -> dict:
    """The Serve config of `scaledl serve config` (and of `scaledl cluster manifests`):
    for keys someone holds, and models that exist."""
    from app.serve_config import serve_config
    from app.serving import check_models, resolve_access

    access = resolve_access(settings, dev=False)
    if access.generated:  # SCALEDL_DEV: a key nobody could ever send
        raise ConfigError(
            "a Serve config needs keys someone holds: create one with "
            "`scaledl keys create --scope predict` or set SCALEDL_API_KEY"
        )
    check_models(settings, workload)
    return serve_config(settings, workload, access.static_keys, keys_file=access.keys_file)


@serve_cli.command("transport")
def serve_transport_cmd(ctx: typer.Context) -> None:
    """Print the transport variables (serve.fast_transport) as `export NAME=value` lines.

    Every process of a cluster reads them as it starts, so a cluster you join needs them
    in the environment of each `ray start`: `eval "$(scaledl serve transport)"` first.
    Prints nothing with serve.fast_transport=false (Ray's stock proxy)."""
    from app.runtime import export_lines, transport_env

    typer.echo(export_lines(transport_env(ctx.obj.settings())), nl=False)
