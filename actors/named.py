"""How scaledl's long-lived actors are made: one per cluster, by name, detached (they
outlive the job or the replica that first asked), restarted by Ray if their process dies,
and on no reserved CPU (they wait far more than they compute)."""

from __future__ import annotations

from typing import Any

import ray

NAMESPACE = "scaledl"


def named_actor(cls: type, name: str, *args: Any) -> ray.actor.ActorHandle:
    """The cluster's actor ``name`` of ``cls``, created with ``args`` on first use; a
    later caller gets the running one, and its ``args`` are not used."""
    options = ray.remote(cls).options(
        name=name,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
    )
    return options.remote(*args)
