"""`scaledl cluster launcher`: a Ray cluster launcher config that Ray's own schema and
checks accept, whose pools (node labels) are the ones the settings' work selects, and
the node labels reaching the Ray Train and Serve placement they are meant for. No cloud
here: the config is checked, not launched (cluster/autoscaler/README.md)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from app.errors import ConfigError
from app.kuberay import to_yaml
from app.launcher import BATCH, POOL, SERVE, launcher_config, pool_settings
from app.runtime import FAST_TRANSPORT
from app.settings import Settings, load_settings
from serve_graphs.args import GraphArgs
from serve_graphs.builder import INGRESS, build_app, tier_deployment
from tests.unit.test_serve_config import calibrated, config_of

SECRET = "a-cluster-key-of-16+chars"


@pytest.fixture
def settings(tmp_path: Path, clean_env: None) -> Settings:
    settings = load_settings(storage_root=tmp_path / "store", api_key=SECRET, **pool_settings())
    calibrated(settings, cheap="3", expensive="2", threshold=0.8)
    return settings


def generated(settings: Settings, **options: object) -> dict:
    config = launcher_config(settings, config_of(settings), FAST_TRANSPORT, image="img:1",
                             **options)  # fmt: skip
    return yaml.safe_load(to_yaml(config, "scaledl cluster launcher", "ray up"))  # as written


def test_rays_own_schema_and_checks_accept_the_config(settings: Settings) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # As `ray up` takes it: the AWS defaults merged in, then ray-schema.json, the head
    # type and the node types' bounds checked.
    filled = prepare_config(generated(settings))
    validate_config(filled)
    assert filled["head_node_type"] == "head"
    assert set(filled["available_node_types"]) == {"head", "batch", "serve"}
    assert filled["docker"]["image"] == "img:1" and filled["provider"]["type"] == "aws"


def test_a_spot_pool_trains_an_on_demand_pool_serves_and_the_head_runs_no_work(
    settings: Settings,
) -> None:
    types = generated(settings)["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["batch"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert types["batch"]["min_workers"] == 0  # no spot node while nothing trains
    assert "InstanceMarketOptions" not in types["serve"]["node_config"]
    assert "InstanceMarketOptions" not in types["head"]["node_config"]
    assert (types["batch"]["labels"], types["serve"]["labels"]) == (BATCH, SERVE)
    # Sized from the replica bounds: min 1 + 1 tier replicas (0.5 CPU) and an ingress
    # (0.25) fit one 4-vCPU node; at most 2 + 2 and 1 still do.
    assert (types["serve"]["min_workers"], types["serve"]["max_workers"]) == (1, 1)


def test_every_node_starts_with_the_settings_that_pick_its_pools(settings: Settings) -> None:
    """What each job's driver and each replica read as it starts: the same storage
    root, the pools' selectors, the token mode and the transport."""
    config = generated(settings)
    for command in (config["head_start_ray_commands"][-1],
                    config["worker_start_ray_commands"][-1]):  # fmt: skip
        words = shlex.split(command.split(";", 1)[1])
        assert words[0] == "env"
        env = dict(w.split("=", 1) for w in words[1 : words.index("ray")])
        assert env["SCALEDL_STORAGE_ROOT"] == str(settings.storage_root)
        assert json.loads(env["SCALEDL_TRAIN__NODE_LABELS"]) == BATCH
        assert json.loads(env["SCALEDL_SERVE__NODE_LABELS"]) == SERVE
        assert env["RAY_AUTH_MODE"] == "token"
        assert FAST_TRANSPORT.items() <= env.items()
        reread = load_settings(
            storage_root=env["SCALEDL_STORAGE_ROOT"],
            train={"node_labels": json.loads(env["SCALEDL_TRAIN__NODE_LABELS"])},
        )
        assert reread.train.node_labels == {POOL: "batch"}


def test_the_serve_config_puts_every_replica_on_the_serving_pool(settings: Settings) -> None:
    """serve.node_labels travel in the config's args and become each deployment's label
    selector when the application is built, flattened as `serve deploy` flattens it."""
    from ray.serve._private.build_app import build_app as flatten

    args = GraphArgs.model_validate(config_of(settings)["applications"][0]["args"])
    built = flatten(build_app(args), name="digits", make_deployment_handle=lambda d, a: None)
    options = {d.name: d.ray_actor_options for d in built.deployments}
    assert set(options) == {INGRESS, tier_deployment("cheap"), tier_deployment("expensive")}
    assert all(o["label_selector"] == SERVE for o in options.values()), options


def test_settings_without_the_pools_or_with_a_relative_root_are_refused(
    tmp_path: Path, clean_env: None
) -> None:
    plain = load_settings(storage_root=tmp_path / "store", api_key=SECRET)
    calibrated(plain, cheap="3", expensive="2", threshold=0.8)
    with pytest.raises(ConfigError, match="pool_settings"):
        launcher_config(plain, config_of(plain), FAST_TRANSPORT, image="img:1")
    relative = load_settings(storage_root="store", api_key=SECRET, **pool_settings())
    with pytest.raises(ConfigError, match="SCALEDL_STORAGE_ROOT=/data/scaledl"):
        launcher_config(relative, config_of(plain), FAST_TRANSPORT, image="img:1")


def test_a_bad_node_label_names_the_setting_and_rays_rule(clean_env: None) -> None:
    with pytest.raises(ConfigError, match=r"train\.node_labels.*not a Ray label selector"):
        load_settings(train={"node_labels": {"bad key!": "x"}})
