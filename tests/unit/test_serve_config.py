"""`scaledl serve config`: a Serve config YAML that Ray accepts and the builder reads."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from app.keys import create_key, read_keys_file
from app.serve_config import BUILDER, serve_config, to_yaml
from app.settings import load_settings
from serve_graphs.args import GraphArgs


def test_the_generated_config_is_valid_and_carries_the_settings(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    _, secret = create_key(keys_file, "predict", "web")
    settings = load_settings(
        storage_root=tmp_path,
        serve={"port": 8123, "cascade_ref": "7", "batch": {"max_batch_size": 32}},
    )
    text = to_yaml(serve_config(settings, "digits", read_keys_file(keys_file)))
    assert secret not in text
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = config.applications
    assert (app.import_path, app.route_prefix) == (BUILDER, "/")
    assert config.http_options.port == 8123
    args = GraphArgs.model_validate(app.args)
    assert args.serve.cascade_ref == "7" and args.serve.batch.max_batch_size == 32
    assert [k.id for k in args.api_keys] == ["web"]
    assert args.tracking_uri == settings.tracking_uri
