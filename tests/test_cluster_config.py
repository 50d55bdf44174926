"""The shipped Ray cluster configs are valid for `ray up` (checked against Ray's own schema)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml
from conftest import REPO


def test_cluster_configs_match_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    configs = sorted((REPO / "configs" / "ray").glob("*.yaml"))
    assert configs
    for path in configs:
        config = yaml.safe_load(path.read_text())
        jsonschema.validate(config, schema)
        assert config["head_node_type"] in config["available_node_types"]
