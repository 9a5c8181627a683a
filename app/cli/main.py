"""The command line: ``scaledl`` / ``python -m app``. Each stage also runs as a Ray job:
``ray job submit --working-dir . -- python -m app <stage> ...``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.cli import reports
from app.cli.base import CliState, WorkloadOpt, console, drop_none
from app.cli.cluster import cluster_cli
from app.cli.monitor import monitor_cmd
from app.cli.rollouts import rollout_cli
from app.cli.routes import route_cli
from app.cli.serve import keys_cli, serve_cli
from app.errors import ConfigError, find_scaledl_error
from app.runtime import take_back_sigint

cli = typer.Typer(
    name="scaledl",
    help="A deep-learning platform on Ray: raw files to a monitored, autoscaled HTTP service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_cli = typer.Typer(help="Ingest raw data into versioned datasets.", no_args_is_help=True)
models_cli = typer.Typer(help="Registered models and their aliases.", no_args_is_help=True)
cli.add_typer(data_cli, name="data")
cli.add_typer(models_cli, name="models")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(serve_cli, name="serve")
cli.add_typer(route_cli, name="route")
cli.add_typer(rollout_cli, name="rollout")
cli.add_typer(cluster_cli, name="cluster")
cli.command("monitor")(monitor_cmd)


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
    ctx.obj = CliState(config, verbose)


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
    parent: Annotated[
        str | None,
        typer.Option(
            help="The version this one derives from (id or unique prefix). Default: the "
            "newest version whose input files the new one extends, else none."
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

    state: CliState = ctx.obj
    settings = state.settings(dev=dev or None)
    wl = get_workload(workload)
    raw = open_source(source) if source else None
    with ray_session(settings, verbose=state.verbose):
        if sys.stderr.isatty():  # Ray Data's own progress bar, on a terminal only
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = True
        result = ingest(settings, wl, raw, parent_ref=parent)
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

    state: CliState = ctx.obj
    overrides = drop_none(
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

    state: CliState = ctx.obj
    settings = state.settings(calibrate=drop_none(margin=margin))
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


# ---------------------------------------------------------------------------- demo


@cli.command("demo")
def demo(
    ctx: typer.Context,
    keep: Annotated[bool, typer.Option(help="Keep serving after the report, until Ctrl-C.")] = True,
    epochs: Annotated[
        int | None, typer.Option(help="Override train.epochs (reduced mode).")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Concurrent HTTP clients.")] = 16,
    monitor: Annotated[
        bool,
        typer.Option(
            help="Also run Prometheus with scaledl's rules (`scaledl monitor`) while the "
            "demo runs, and show its charts in the Ray dashboard."
        ),
    ] = False,
    monitor_port: Annotated[int, typer.Option(help="Prometheus's port with --monitor.")] = 9090,
) -> None:
    """Ingest digits, train both tiers, serve the cascade, send the test split over HTTP."""
    from app.cli.demo import run_demo

    state: CliState = ctx.obj
    settings = state.settings(train=drop_none(epochs=epochs), dev=True)
    run_demo(
        settings,
        console(),
        keep=keep,
        verbose=state.verbose,
        concurrency=concurrency,
        monitor_port=monitor_port if monitor else None,
    )


# ---------------------------------------------------------------------------- entry


def main() -> None:
    take_back_sigint()
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
