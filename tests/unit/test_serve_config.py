"""`scaledl serve config`: a Serve config YAML that Ray accepts and the builder reads."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from app.cascade_spec import CascadeSpec, SplitResult
from app.keys import create_key, key_sha256
from app.registry import Registry
from app.runtime import FAST_TRANSPORT
from app.serve_config import BUILDER, serve_config, to_yaml
from app.serving import resolve_access
from app.settings import Settings, load_settings
from serve_graphs.args import GraphArgs

RESULT = SplitResult(
    cascade_accuracy=0.99, escalated_share=0.1, cheap_accuracy=0.95, expensive_accuracy=0.99
)


def calibrated(settings: Settings, cheap: str, expensive: str, threshold: float) -> None:
    """Register a cascade (its tiers need not exist to write a config)."""
    registry = Registry(settings.tracking_uri, settings.artifacts_dir)
    spec = CascadeSpec(
        workload="digits", cheap_version=cheap, expensive_version=expensive,
        threshold=threshold, margin=0.005, val=RESULT, test=RESULT,
    )  # fmt: skip
    run = registry.start_run(f"cascade-{cheap}", params={}, tags={})
    ref = registry.register(
        "digits-cascade", spec.save(settings.storage_root / cheap), run_id=run, tags={}
    )
    registry.promote(ref.name, ref.version)


def config_of(settings: Settings) -> dict:
    """The config `scaledl serve config` prints for these settings."""
    access = resolve_access(settings, dev=False)
    return serve_config(settings, "digits", access.static_keys, keys_file=access.keys_file)


def test_the_generated_config_is_valid_and_carries_the_settings(
    tmp_path: Path, clean_env: None
) -> None:
    settings = load_settings(
        storage_root=tmp_path,
        api_key="an-env-key-of-16+chars",
        serve={
            "port": 8123,
            "batch": {"max_batch_size": 32},
            "expensive_replicas": {"min_replicas": 0},
        },
    )
    _, secret = create_key(settings.keys_file, "predict", "web")
    calibrated(settings, cheap="3", expensive="2", threshold=0.8)
    text = to_yaml(config_of(settings), FAST_TRANSPORT)
    assert secret not in text and "an-env-key-of-16+chars" not in text
    assert key_sha256(secret) not in text  # the file is named, not copied: it is re-read
    assert "re-read by the service when it changes" in text
    assert (
        "#   export RAY_SERVE_ENABLE_HA_PROXY=1\n" in text
    )  # the transport, recorded for ray start
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = config.applications
    assert (app.import_path, app.route_prefix) == (BUILDER, "/")
    assert config.http_options.port == 8123
    args = GraphArgs.model_validate(app.args)
    assert args.keys_file == str(settings.keys_file)
    assert [k.id for k in args.api_keys] == ["env"]
    assert args.tracking_uri == settings.tracking_uri
    configs = {d.name: d.user_config for d in app.deployments}
    assert configs["cheap-tier"] == {
        "model": {"registered_name": "digits-cheap", "model_ref": "3"},
        "batch": {"max_batch_size": 32, "batch_wait_timeout_s": 0.0},
    }
    assert configs["expensive-tier"]["model"]["model_ref"] == "2"
    assert configs["Ingress"] == {
        "threshold": 0.8,
        "cascade_version": "1",
        "cheap_version": "digits-cheap/3",
        "int8_tiers": [],
        "max_batch_size": 32,
        "cold_start_tiers": ["expensive"],  # min_replicas 0
        "faults": {},
    }
    scaling = {d.name: d.autoscaling_config for d in app.deployments}
    assert scaling["expensive-tier"]["min_replicas"] == 0  # set below: scales to zero
    assert scaling["cheap-tier"]["max_replicas"] == 2


def test_a_new_cascade_or_key_changes_only_user_configs_so_serve_swaps_in_place(
    tmp_path: Path, clean_env: None
) -> None:
    """Serve restarts replicas when an app's args change and reconfigures them when only
    user_configs do: a promoted cascade, or a new key, must leave the args alone."""
    settings = load_settings(storage_root=tmp_path)
    create_key(settings.keys_file, "predict", "web")
    calibrated(settings, cheap="1", expensive="1", threshold=0.8)
    before = config_of(settings)["applications"][0]
    calibrated(settings, cheap="2", expensive="1", threshold=0.7)
    create_key(settings.keys_file, "admin", "ops")
    after = config_of(settings)["applications"][0]
    assert after["args"] == before["args"]
    assert after["deployments"] != before["deployments"]
    assert {d["name"]: d["user_config"] for d in after["deployments"]}["Ingress"] == {
        "threshold": 0.7,
        "cascade_version": "2",
        "cheap_version": "digits-cheap/2",
        "int8_tiers": [],
        "max_batch_size": 64,
        "cold_start_tiers": [],
        "faults": {},
    }


def test_serve_transport_prints_the_variables_a_joined_clusters_ray_start_needs(
    tmp_path: Path,
) -> None:
    """`eval "$(scaledl serve transport)"` before `ray start` (README), in a real shell,
    sets every transport variable to its value, spaces and all; nothing is printed when
    serve.fast_transport is off."""
    from tests.unit.test_cli_errors import scaledl

    on = scaledl("serve", "transport", cwd=tmp_path)
    assert on.returncode == 0, on.stderr
    names = " ".join(FAST_TRANSPORT)
    shell = subprocess.run(
        ["bash", "-c", f'eval "$1"; for n in {names}; do printf "%s=%s\\0" "$n" "${{!n}}"; done',
         "bash", on.stdout],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert dict(kv.split("=", 1) for kv in shell.stdout.split("\0")[:-1]) == FAST_TRANSPORT
    assert any(" " in value for value in FAST_TRANSPORT.values())  # what `export $(…)` broke
    off = scaledl(
        "serve", "transport", cwd=tmp_path, env={"SCALEDL_SERVE__FAST_TRANSPORT": "false"}
    )
    assert off.returncode == 0 and off.stdout == "", off.stdout + off.stderr
