"""The model registry facade over MLflow (a sqlite file by default).

Versions live under ``<workload>-<tier>`` (and ``-int8`` twins), calibrated pairs under
``<workload>-cascade``. Aliases name the ones in use: ``champion`` is the approved version
(serving loads the cascade's champion, which pins both tier versions), ``challenger`` the
newest candidate. Stages are deprecated in MLflow, so aliases are the only pointers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import ModelNotFound

if TYPE_CHECKING:
    from mlflow import MlflowClient

EXPERIMENT = "scaledl"
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"


@dataclass(frozen=True)
class ModelRef:
    """One registered model version."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str]

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


class Registry:
    def __init__(self, tracking_uri: str, artifacts_dir: Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.artifacts_dir = artifacts_dir

    @cached_property
    def client(self) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def start_run(self, run_name: str, *, params: dict[str, Any], tags: dict[str, str]) -> str:
        """An MLflow run for one training run; training logs its steps into it."""
        from mlflow.entities import Param, RunTag

        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=tags)
        self.client.log_batch(
            run.info.run_id,
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], *, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def finish_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def register(
        self,
        name: str,
        model_dir: Path,
        *,
        run_id: str,
        artifact_path: str = "model",
        tags: dict[str, str],
    ) -> ModelRef:
        """Store ``model_dir`` in the run, register it as a new version of ``name``.

        The new version becomes ``challenger``; the first version of a name also becomes
        ``champion`` so that a fresh platform can serve without a manual promotion.
        """
        from mlflow.exceptions import MlflowException

        self.client.log_artifacts(run_id, str(model_dir), artifact_path=artifact_path)
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        artifact_uri = self.client.get_run(run_id).info.artifact_uri
        mv = self.client.create_model_version(
            name, source=f"{artifact_uri}/{artifact_path}", run_id=run_id, tags=tags
        )
        version = str(mv.version)
        self.client.set_registered_model_alias(name, CHALLENGER, version)
        if CHAMPION not in self._aliases(name):
            self.client.set_registered_model_alias(name, CHAMPION, version)
        return self.resolve(name, version)

    def resolve(self, name: str, ref: str = CHAMPION) -> ModelRef:
        """A version by number or alias, or ModelNotFound saying how to get one."""
        from mlflow.exceptions import MlflowException

        ref = str(ref)
        try:
            if ref.isdigit():
                mv = self.client.get_model_version(name, ref)
            else:
                mv = self.client.get_model_version_by_alias(name, ref)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise ModelNotFound(
                f"model {name!r} has no version or alias {ref!r}: {_how_to_register(name)} "
                "or pick one from `scaledl models list`"
            ) from None
        return ModelRef(name, str(mv.version), mv.source, mv.run_id, dict(mv.tags))

    def int8_twin(self, name: str, version: str) -> ModelRef:
        """The INT8 variant registered together with ``name`` version ``version``."""
        twin = f"{name}-int8"
        for ref, _ in self.versions(twin):
            if ref.tags.get("fp32_version") == str(version):
                return ref
        raise ModelNotFound(
            f"{name} version {version} has no INT8 twin in {twin}: {_how_to_register(twin)}, "
            "or drop the tier from serve.int8_tiers"
        )

    def download(self, ref: ModelRef) -> Path:
        """A local folder holding the version's model files."""
        from mlflow.artifacts import download_artifacts

        return Path(download_artifacts(artifact_uri=ref.source, tracking_uri=self.tracking_uri))

    def run_metrics(self, ref: ModelRef) -> dict[str, float]:
        if ref.run_id is None:
            return {}
        return dict(self.client.get_run(ref.run_id).data.metrics)

    def promote(self, name: str, version: str) -> str | None:
        """Make ``version`` the champion; the one it replaces is kept as previous-champion."""
        target = self.resolve(name, version)
        aliases = self._aliases(name)
        previous = aliases.get(CHAMPION)
        if previous is not None and previous != target.version:
            self.client.set_registered_model_alias(name, PREVIOUS_CHAMPION, previous)
        self.client.set_registered_model_alias(name, CHAMPION, target.version)
        return previous

    def model_tag(self, name: str, key: str) -> str | None:
        """A tag of the registered model ``name`` (not of a version), or None, also when
        no such model is registered yet."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name).tags.get(key)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # a broken registry must not read as "no tag"
            return None

    def set_model_tag(self, name: str, key: str, value: str | None) -> None:
        """Set a tag of the registered model ``name``; None deletes it."""
        if value is not None:
            self.client.set_registered_model_tag(name, key, value)
        elif self.model_tag(name, key) is not None:
            self.client.delete_registered_model_tag(name, key)

    def versions(self, name: str) -> list[tuple[ModelRef, list[str]]]:
        """Every version of ``name``, newest first, with the aliases pointing at it."""
        by_version: dict[str, list[str]] = {}
        for alias, version in self._aliases(name).items():
            by_version.setdefault(version, []).append(alias)
        found = self.client.search_model_versions(f"name = '{name}'")
        refs = [ModelRef(name, str(m.version), m.source, m.run_id, dict(m.tags)) for m in found]
        refs.sort(key=lambda r: int(r.version), reverse=True)
        return [(r, sorted(by_version.get(r.version, []))) for r in refs]

    def _aliases(self, name: str) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        try:
            aliases = self.client.get_registered_model(name).aliases
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # a broken registry must not read as "no aliases yet"
            return {}
        return {alias: str(version) for alias, version in aliases.items()}

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            return experiment.experiment_id
        location = self.artifacts_dir.resolve().as_uri() if self.artifacts_dir else None
        return self.client.create_experiment(EXPERIMENT, artifact_location=location)


def _how_to_register(name: str) -> str:
    """The command that registers a version of ``name`` (<workload>-<tier>[-int8] or
    <workload>-cascade)."""
    base = name.removesuffix("-int8")
    workload, _, kind = base.rpartition("-")
    if kind == "cascade":
        return f"calibrate a pair with `scaledl calibrate --workload {workload}`"
    twin = " (it registers the INT8 twin too)" if base != name else ""
    return f"train one with `scaledl train --workload {workload} --tier {kind}`{twin}"
