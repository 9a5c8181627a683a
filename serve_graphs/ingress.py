"""Ingress: the HTTP entry (FastAPI) with auth, validation and the cascade inside it."""

from __future__ import annotations

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.workloads import get_workload
from serve_graphs.api import build_api
from serve_graphs.args import GraphArgs
from serve_graphs.cascade import Cascade, TierAnswer, TierFn


def tier_fn(handle: DeploymentHandle) -> TierFn:
    async def call(instances: np.ndarray) -> TierAnswer:
        probs, version = await handle.predict.remote(instances)
        return TierAnswer(probs, version)

    return call


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(
        self, cheap: DeploymentHandle, expensive: DeploymentHandle, args: dict, threshold: float
    ) -> None:
        self.args = GraphArgs.model_validate(args)
        self.cascade = Cascade(tier_fn(cheap), tier_fn(expensive), threshold)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(
            get_workload(self.args.workload),
            self.cascade,
            api_key_sha256=self.args.api_key_sha256,
            max_instances=self.args.max_instances_per_request,
        )
