"""``scaledl cluster``: the way from one machine to a Kubernetes cluster (KubeRay)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli.base import CliState, WorkloadOpt, console

cluster_cli = typer.Typer(help="Manifests for a real cluster (KubeRay).", no_args_is_help=True)


@cluster_cli.command("manifests")
def manifests_cmd(
    ctx: typer.Context,
    workload: WorkloadOpt,
    image: Annotated[
        str, typer.Option(help="Container image with this repository installed (pip install .).")
    ],
    out: Annotated[Path, typer.Option(help="Folder to write the manifests into.")] = Path(
        "cluster/kuberay/generated"
    ),
    volume_claim: Annotated[
        str,
        typer.Option(help="ReadWriteMany PersistentVolumeClaim mounted at the storage root."),
    ] = "scaledl-store",
    redis_address: Annotated[
        str, typer.Option(help="Redis for GCS fault tolerance (host:port).")
    ] = "redis:6379",
    host: Annotated[
        str | None, typer.Option(help="Public host name of the Ingress (default: any).")
    ] = None,
    ingress_class: Annotated[
        str | None, typer.Option(help="ingressClassName of the Ingress (default: the cluster's).")
    ] = None,
    ray_version: Annotated[
        str | None, typer.Option(help="The image's Ray version (default: this one's).")
    ] = None,
    worker_cpus: Annotated[int, typer.Option(help="CPUs of each serving worker pod.")] = 4,
) -> None:
    """Write the RayService, its public Ingress and a RayJob per stage, from the settings
    `scaledl serve config` reads (run it with the cluster's settings: SCALEDL_STORAGE_ROOT
    is where every pod mounts the shared volume)."""
    from app.cli.serve import deployable_config
    from app.kuberay import manifests, to_yaml
    from app.runtime import transport_env

    state: CliState = ctx.obj
    settings = state.settings()
    config = deployable_config(settings, workload)
    written = manifests(
        settings,
        workload,
        config,
        transport_env(settings),
        image=image,
        volume_claim=volume_claim,
        redis_address=redis_address,
        host=host,
        ingress_class=ingress_class,
        ray_version=ray_version,
        worker_cpus=worker_cpus,
    )
    out.mkdir(parents=True, exist_ok=True)
    for name, manifest in written.items():
        (out / name).write_text(to_yaml(manifest))
        console().print(f"wrote {out / name}")
