"""``scaledl cluster``: the way from one machine to a Kubernetes cluster (KubeRay)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli.base import CliState, WorkloadOpt, console

cluster_cli = typer.Typer(
    help="Configs for a real cluster (KubeRay, or the Ray cluster launcher).", no_args_is_help=True
)


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


@cluster_cli.command("launcher")
def launcher_cmd(
    ctx: typer.Context,
    workload: WorkloadOpt,
    image: Annotated[
        str, typer.Option(help="Container image with this repository installed (pip install .).")
    ],
    out: Annotated[Path, typer.Option(help="Folder to write the configs into.")] = Path(
        "cluster/autoscaler/generated"
    ),
    region: Annotated[str, typer.Option(help="AWS region.")] = "us-west-2",
    head_type: Annotated[str, typer.Option(help="On-demand head instance type.")] = "m5.large",
    batch_type: Annotated[
        str, typer.Option(help="Spot instance type for training and batch work.")
    ] = "c5.2xlarge",
    serve_type: Annotated[str, typer.Option(help="On-demand instance type for serving.")] = (
        "c5.xlarge"
    ),
    batch_max_nodes: Annotated[int, typer.Option(help="Most spot nodes at once.")] = 4,
) -> None:
    """Write the Ray cluster launcher's config (`ray up cluster.yaml`): an on-demand head
    that runs no work, a spot pool for training and batch, an on-demand pool for
    serving; and serve.yaml, the Serve config whose replicas run on the serving pool
    (`serve deploy serve.yaml` once the models are trained). From the settings `scaledl
    serve config` reads, with the pools' node labels added."""
    from app.cli.serve import deployable_config
    from app.kuberay import to_yaml
    from app.launcher import launcher_config, pool_settings
    from app.runtime import transport_env
    from app.serve_config import to_yaml as serve_yaml

    state: CliState = ctx.obj
    settings = state.settings(**pool_settings())
    config = deployable_config(settings, workload)
    transport = transport_env(settings)
    cluster = launcher_config(
        settings,
        config,
        transport,
        image=image,
        region=region,
        head_type=head_type,
        batch_type=batch_type,
        serve_type=serve_type,
        batch_max_nodes=batch_max_nodes,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.yaml").write_text(
        to_yaml(cluster, "scaledl cluster launcher", "ray up -y <this file>")
    )
    (out / "serve.yaml").write_text(serve_yaml(config, transport))
    for name in ("cluster.yaml", "serve.yaml"):
        console().print(f"wrote {out / name}")
