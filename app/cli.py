"""The command line: ``scaledl`` / ``python -m app``. Each stage also runs as a Ray job:
``ray job submit --working-dir . -- python -m app <stage> ...``."""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app import reports
from app.errors import ConfigError, find_scaledl_error
from app.routes_cli import route_cli
from app.settings import Settings, load_settings

cli = typer.Typer(
    name="scaledl",
    help="A deep-learning platform on Ray: raw files to a monitored, autoscaled HTTP service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_cli = typer.Typer(help="Ingest raw data into versioned datasets.", no_args_is_help=True)
models_cli = typer.Typer(help="Registered models and their aliases.", no_args_is_help=True)
keys_cli = typer.Typer(help="API keys of the HTTP service.", no_args_is_help=True)
serve_cli = typer.Typer(help="Serve a workload's calibrated cascade over HTTP.")
cli.add_typer(data_cli, name="data")
cli.add_typer(models_cli, name="models")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(serve_cli, name="serve")
cli.add_typer(route_cli, name="route")


@functools.cache
def console() -> Console:
    # Rich assumes 80 columns when output is not a terminal (CI, `ray job logs`): too
    # narrow for the report tables.
    return Console(width=None if sys.stdout.isatty() else 140)


WorkloadOpt = Annotated[str, typer.Option("--workload", "-w", help="Workload name, e.g. digits.")]


@dataclass(frozen=True)
class _State:
    config: Path | None
    verbose: bool

    def settings(self, **overrides: Any) -> Settings:
        settings = load_settings(self.config, **overrides)
        settings.storage_root.mkdir(parents=True, exist_ok=True)
        return settings


@cli.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML settings file (or SCALEDL_CONFIG).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's own logs.")] = False,
) -> None:
    if not verbose:
        # MLflow sets its own level when imported; this is the knob it reads.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        logging.getLogger("alembic").setLevel(logging.WARNING)
    ctx.obj = _State(config, verbose)


# ---------------------------------------------------------------------------- data


@data_cli.command("generate")
def data_generate(
    workload: WorkloadOpt,
    rows: Annotated[int, typer.Option(help="Records to write.")],
    out: Annotated[Path, typer.Option(help="Folder for the shards (must not hold any yet).")],
    fault_rate: Annotated[
        float, typer.Option(help="Share of records that break exactly one contract rule.")
    ] = 0.0,
    faults: Annotated[
        str | None,
        typer.Option(help="Comma-separated fault kinds to inject (default: all of them)."),
    ] = None,
    drift: Annotated[float, typer.Option(help="Shift of the distributions, 0 = none.")] = 0.0,
    fmt: Annotated[str, typer.Option("--format", help="parquet, csv or jsonl.")] = "parquet",
    seed: Annotated[int, typer.Option(help="Same seed, same files.")] = 0,
    rows_per_shard: Annotated[int, typer.Option(help="Records per file.")] = 250_000,
) -> None:
    """Write realistic raw files (with faults and drift on request) for a workload."""
    from app.workloads import get_workload
    from data.generate import FAULTS, generate_transactions

    if get_workload(workload).name != "transactions":
        raise ConfigError(f"no generator for {workload!r}: only --workload transactions has one")
    kinds = tuple(k.strip() for k in faults.split(",")) if faults else FAULTS
    try:
        with console().status(f"writing {rows:,} {fmt} records…"):
            report = generate_transactions(
                out,
                rows=rows,
                seed=seed,
                fault_rate=fault_rate,
                faults=kinds,
                drift=drift,
                fmt=fmt,
                rows_per_shard=rows_per_shard,
            )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    console().print(reports.generate_table(report))


@data_cli.command("ingest")
def data_ingest(
    ctx: typer.Context,
    workload: WorkloadOpt,
    source: Annotated[
        str | None,
        typer.Option(
            help="Raw files: a Parquet/CSV/JSONL file or folder, as a path or a URI such as "
            "s3://bucket/raw/ (default: the workload's built-in set)."
        ),
    ] = None,
    dev: Annotated[
        bool, typer.Option("--dev", help="Generate a throwaway PII key if none is set.")
    ] = False,
) -> None:
    """Validate, pseudonymize, split and version raw data; bad rows go to quarantine."""
    from app.runtime import ray_session
    from app.workloads import get_workload
    from data.pipeline import ingest
    from data.sources import open_source

    state: _State = ctx.obj
    settings = state.settings(dev=dev or None)
    wl = get_workload(workload)
    raw = open_source(source) if source else None
    with ray_session(settings, verbose=state.verbose):
        if sys.stderr.isatty():  # Ray Data's own progress bar, on a terminal only
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = True
        result = ingest(settings, wl, raw)
    console().print(reports.ingest_table(result))
    for line in reports.quarantine_lines(result):
        console().print(line)
    console().print(f"version {result.manifest.version} at {result.path}")


@data_cli.command("versions")
def data_versions(ctx: typer.Context, workload: WorkloadOpt) -> None:
    """List the dataset versions of a workload, newest first."""
    from app.workloads import get_workload
    from data.versions import DatasetStore

    settings = ctx.obj.settings()
    table = Table("version", "created", "rows in", "valid", "quarantined", "parent")
    for m in DatasetStore(settings.datasets_dir).manifests(get_workload(workload).name):
        table.add_row(
            m.version,
            f"{m.created_at:%Y-%m-%d %H:%M}",
            f"{m.rows_in:,}",
            f"{m.rows_valid:,}",
            f"{m.rows_quarantined:,}",
            m.parent or "—",
        )
    console().print(table)


@data_cli.command("show")
def data_show(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="Version id, a prefix of one, or latest.")],
    workload: WorkloadOpt,
    as_json: Annotated[bool, typer.Option("--json", help="The whole manifest as JSON.")] = False,
) -> None:
    """Explain a dataset version: lineage, files and their counts, quarantine, columns."""
    from app.workloads import get_workload
    from data.versions import DatasetStore

    settings = ctx.obj.settings()
    manifest = DatasetStore(settings.datasets_dir).get(get_workload(workload).name, version)
    if as_json:
        console().print_json(manifest.model_dump_json())
        return
    for part in reports.dataset_summary(manifest):
        console().print(part)


# ---------------------------------------------------------------------------- train


@cli.command("train")
def train(
    ctx: typer.Context,
    workload: WorkloadOpt,
    tier: Annotated[str, typer.Option(help="cheap or expensive.")],
    dataset_version: Annotated[str, typer.Option(help="Dataset version or latest.")] = "latest",
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
    workers: Annotated[int | None, typer.Option(help="Override train.num_workers.")] = None,
    zero_stage: Annotated[int | None, typer.Option(help="Override train.zero_stage.")] = None,
    pipeline_stages: Annotated[
        int | None, typer.Option(help="Override train.pipeline_stages.")
    ] = None,
    run_name: Annotated[str | None, typer.Option(help="Name of a new run.")] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="Continue this earlier run from its latest checkpoint, as it was."),
    ] = None,
) -> None:
    """Train a tier with Ray Train + DeepSpeed, evaluate it on the test split, register it
    (and its INT8 variant) in MLflow."""
    from app.runtime import ray_session
    from app.workloads import get_workload
    from data.versions import DatasetStore
    from train.run import check_layout, train_tier

    state: _State = ctx.obj
    overrides = _drop_none(
        epochs=epochs, num_workers=workers, zero_stage=zero_stage, pipeline_stages=pipeline_stages
    )
    settings = state.settings(train=overrides)
    wl = get_workload(workload)
    wl.check_tier(tier)
    version = None
    if not resume:  # fail before starting Ray
        check_layout(wl, tier, settings.train)
        version = DatasetStore(settings.datasets_dir).get(wl.name, dataset_version).version
    with (
        ray_session(settings, verbose=state.verbose),
        console().status(f"training {wl.name}-{tier}…"),
    ):
        outcome = train_tier(
            settings, wl, tier, dataset_ref=version or "latest", run_name=run_name, resume=resume
        )
    console().print(reports.training_table([outcome]))


@cli.command("calibrate")
def calibrate_cmd(
    ctx: typer.Context,
    workload: WorkloadOpt,
    cheap: Annotated[str, typer.Option(help="Cheap tier version or alias.")] = "challenger",
    expensive: Annotated[str, typer.Option(help="Expensive tier version or alias.")] = "challenger",
    margin: Annotated[float | None, typer.Option(help="Override calibrate.margin.")] = None,
    promote: Annotated[
        bool, typer.Option(help="Make the cascade and both its tiers the champions.")
    ] = False,
) -> None:
    """Choose the cascade threshold on the validation split and register the pair."""
    from app.cascade_spec import promote_cascade
    from app.registry import Registry
    from app.runtime import ray_session
    from app.workloads import get_workload
    from train.calibrate import calibrate

    state: _State = ctx.obj
    settings = state.settings(calibrate=_drop_none(margin=margin))
    wl = get_workload(workload)
    registry = Registry(settings.tracking_uri)
    for tier, ref in (("cheap", cheap), ("expensive", expensive)):  # fail before Ray starts
        registry.resolve(wl.registered_model_name(tier), ref)
    with ray_session(settings, verbose=state.verbose), console().status("calibrating…"):
        spec, ref = calibrate(settings, wl, cheap=cheap, expensive=expensive)
    if promote:
        promote_cascade(registry, spec, ref)
    console().print(reports.calibration_table(spec, ref))


# ---------------------------------------------------------------------------- models


@models_cli.command("list")
def models_list(ctx: typer.Context, workload: WorkloadOpt) -> None:
    """Versions of both tiers with their aliases and test accuracy."""
    from app.registry import Registry
    from app.workloads import TIERS, get_workload

    settings = ctx.obj.settings()
    wl = get_workload(workload)
    registry = Registry(settings.tracking_uri)
    table = Table("model", "version", "aliases", "dataset", "test acc")
    for tier in TIERS:
        for ref, aliases in registry.versions(wl.registered_model_name(tier)):
            acc = registry.run_metrics(ref).get("test_accuracy")
            table.add_row(
                ref.name,
                ref.version,
                ", ".join(aliases),
                ref.tags.get("dataset_version", "?"),
                f"{acc:.4f}" if acc is not None else "—",
            )
    console().print(table)


@models_cli.command("promote")
def models_promote(
    ctx: typer.Context,
    name: Annotated[
        str, typer.Argument(help="Registered model, e.g. digits-cascade or digits-cheap.")
    ],
    version: Annotated[str, typer.Argument(help="Version number or alias, e.g. challenger.")],
) -> None:
    """Point a model's champion alias at a version (the old one stays previous-champion).

    Serving loads the champion of <workload>-cascade, which pins both tier versions:
    promote a cascade to change what serves, then run `scaledl serve` again."""
    from app.registry import CHAMPION, Registry

    settings = ctx.obj.settings()
    registry = Registry(settings.tracking_uri)
    target = registry.resolve(name, version)
    previous = registry.promote(name, target.version)
    console().print(f"{name}: {CHAMPION} -> {target.version} (was {previous or 'unset'})")


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
    state: _State = ctx.obj
    settings = state.settings(serve=_drop_none(cascade_ref=cascade))
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
            endpoint = deploy(settings, workload, access.keys)
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
    from app.runtime import FAST_TRANSPORT
    from app.serve_config import serve_config, to_yaml
    from app.serving import check_models, resolve_access

    state: _State = ctx.obj
    settings = state.settings(serve=_drop_none(cascade_ref=cascade))
    access = resolve_access(settings, dev=False)
    if access.generated:  # SCALEDL_DEV: a key nobody could ever send
        raise ConfigError(
            "a Serve config needs keys someone holds: create one with "
            "`scaledl keys create --scope predict` or set SCALEDL_API_KEY"
        )
    check_models(settings, workload)
    transport = FAST_TRANSPORT if settings.serve.fast_transport else None
    typer.echo(to_yaml(serve_config(settings, workload, access.keys), transport), nl=False)


# ---------------------------------------------------------------------------- demo


@cli.command("demo")
def demo(
    ctx: typer.Context,
    keep: Annotated[bool, typer.Option(help="Keep serving after the report, until Ctrl-C.")] = True,
    epochs: Annotated[
        int | None, typer.Option(help="Override train.epochs (reduced mode).")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Concurrent HTTP clients.")] = 16,
) -> None:
    """Ingest digits, train both tiers, serve the cascade, send the test split over HTTP."""
    from app.demo import run_demo

    state: _State = ctx.obj
    settings = state.settings(train=_drop_none(epochs=epochs), dev=True)
    run_demo(settings, console(), keep=keep, verbose=state.verbose, concurrency=concurrency)


# ---------------------------------------------------------------------------- entry


def _drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def main() -> None:
    try:
        cli()
    except Exception as exc:  # the one place errors become exit codes
        found = find_scaledl_error(exc)
        if found is None:
            raise
        Console(stderr=True).print(
            f"[bold red]error:[/] {found.message}", highlight=False, soft_wrap=True
        )
        sys.exit(found.exit_code)
