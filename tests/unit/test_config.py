"""Config is validated once, with clear errors; every YAML under ray_configs/ validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from cluster.config import EmberConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "ray_configs").glob("*.yaml"))
MODEL = {"id": "accounts/acme/models/tiny"}


def test_there_are_serve_configs():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "sim.yaml", "gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_ray_config_validates(path):
    doc = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(doc)
    for app in doc["applications"]:
        assert app["import_path"] == "cluster.builder:build_app"
        EmberConfig.model_validate(app["args"])
    if path.name != "gpu.yaml":
        assert doc["http_options"]["host"] == "127.0.0.1"  # local runs stay on loopback


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"models": []}, "at least 1"),
        ({"models": [{"id": "llama"}]}, "accounts/<owner>/models/<slug>"),
        ({"models": [MODEL, MODEL]}, "appears twice"),
        ({"models": [{**MODEL, "engine": {"kind": "vllm", "block_size": 20}}]}, "multiple of 16"),
        ({"models": [{**MODEL, "num_replicas": 2, "autoscaling": {}}]}, "not both"),
        ({"models": [{**MODEL, "autoscaling": {"min_replicas": 3, "max_replicas": 2}}]}, "min_replicas"),
        ({"models": [{**MODEL, "engine": {"kind": "tpu"}}]}, "kind"),
        ({"models": [MODEL], "store": {"url": "mysql://x"}}, "memory://"),
        ({"models": [MODEL], "ingress": {"max_body_bytes": 10}}, "max_body_bytes"),
        ({"models": [{**MODEL, "typo_field": 1}]}, "typo_field"),
    ],
)
def test_bad_configs_are_rejected_with_a_reason(bad, fragment):
    with pytest.raises(ValidationError) as e:
        EmberConfig.model_validate(bad)
    assert fragment in str(e.value)


def test_defaults_and_derived_names():
    cfg = EmberConfig.model_validate({"models": [MODEL, {"id": "accounts/acme/routers/tiny-fast"}]})
    assert cfg.model("accounts/acme/models/tiny").deployment_name == "pool-acme-models-tiny"
    assert cfg.model("accounts/acme/routers/tiny-fast").owner == "acme"
    assert cfg.model("accounts/acme/models/other") is None
    assert cfg.store.url == "memory://"


def test_lifecycle_needs_14_days_notice_and_a_served_replacement():
    dep = {"status": "deprecated", "deprecated_on": "2026-11-01", "removal_date": "2026-11-14"}
    with pytest.raises(ValidationError, match="less than 14 days"):
        EmberConfig.model_validate({"models": [{**MODEL, "lifecycle": dep}]})
    ok = {**dep, "removal_date": "2026-11-15"}
    EmberConfig.model_validate({"models": [{**MODEL, "lifecycle": ok}]})
    with pytest.raises(ValidationError, match="replacement"):
        EmberConfig.model_validate({"models": [{**MODEL, "lifecycle": {**ok, "replacement": "accounts/x/models/y"}}]})
    with pytest.raises(ValidationError, match="needs deprecated_on"):
        EmberConfig.model_validate({"models": [{**MODEL, "lifecycle": {"status": "removed"}}]})


def test_shipped_configs_offer_priority_a_fast_variant_and_autoscaling():
    for path in CONFIGS:
        for app in yaml.safe_load(path.read_text())["applications"]:
            cfg = EmberConfig.model_validate(app["args"])
            assert any(m.pricing.priority is not None for m in cfg.models), path.name
            fast = [m for m in cfg.models if m.id.startswith("accounts/ember/routers/") and m.id.endswith("-fast")]
            assert fast, path.name
            base = {m.id.split("/")[-1]: m for m in cfg.models if "/models/" in m.id}
            for f in fast:
                slug = f.id.split("/")[-1][: -len("-fast")]
                assert slug in base and f.engine.max_num_seqs < base[slug].engine.max_num_seqs
            assert any(m.autoscaling is not None and m.autoscaling.policy == "ember" for m in cfg.models)
    sim = yaml.safe_load((CONFIGS[0].parent / "sim.yaml").read_text())["applications"][0]
    model = EmberConfig.model_validate(sim["args"]).models[0]
    assert (model.autoscaling.min_replicas, model.autoscaling.max_replicas) == (1, 4)
    assert sim["autoscaling_policy"]["policy_function"] == "deployments.autoscaling:EmberAppPolicy"


def test_autoscaling_knobs():
    auto = EmberConfig.model_validate({"models": [{**MODEL, "autoscaling": {"max_replicas": 3}}]}).models[0].autoscaling
    assert auto.policy == "ember" and auto.gate_follows_replicas and auto.replica_start_s == 30
    assert auto.starting_replicas == 1 and set(auto.knobs()) >= {"target_utilization", "hysteresis"}
    from policies.autoscale import Knobs

    Knobs.from_dict(auto.knobs())  # every knob is one the policy knows
    for bad in ({"policy": "other"}, {"target_utilization": 0}, {"hysteresis": 1}, {"replica_start_s": -1}):
        with pytest.raises(ValidationError):
            EmberConfig.model_validate({"models": [{**MODEL, "autoscaling": bad}]})
    with pytest.raises(ValidationError):
        EmberConfig.model_validate({"models": [{**MODEL, "graceful_shutdown_timeout_s": 0}]})


def test_tool_call_parser_is_one_ember_knows():
    from deployments.tool_calls import TOOL_CALL_PARSERS

    base = {"models": [{"id": "accounts/ember/models/m"}]}
    assert EmberConfig.model_validate(base).models[0].tool_call_parser is None
    ok = {"models": [{"id": "accounts/ember/models/m", "tool_call_parser": "hermes"}]}
    assert EmberConfig.model_validate(ok).models[0].tool_call_parser in TOOL_CALL_PARSERS
    with pytest.raises(ValidationError, match="tool_call_parser"):
        EmberConfig.model_validate({"models": [{"id": "accounts/ember/models/m", "tool_call_parser": "llama3_json"}]})
